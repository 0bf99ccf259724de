"""Throughput of the training input pipeline, next to a bare tf.data decode-and-crop loop.

  python -m resnext_jax.input_benchmark [--batch_size=128 --image_size=224 --batches=30]

Generates ImageNet-like JPEGs (500x375, about 80 KB) in a temporary image folder, then
alternately times the bare loop (read file, `sample_distorted_bounding_box`,
`decode_and_crop_jpeg`, resize, flip, batch: the least a JPEG training pipeline does) and
our training iterator over the same files (the folder preparation is not timed), with
the recipe's host augmentations if asked for (--auto_augment, --random_erasing). Each is
timed `--rounds` times and its best run counts, which damps the noise of a shared machine;
images per CPU-second of this process are printed too, a second view that other load on the
machine moves less. The last line is `images_per_sec=<float>` for our pipeline.

Our pipeline samples crops as torchvision and mmcls do; their mean area (~43% of a 500x375
image) is larger than that of TF's `sample_distorted_bounding_box` in the bare loop (~39%),
so ours decodes and resizes about a tenth more pixels per image.
"""

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image
import tensorflow as tf

from resnext_jax.data import pipeline
from resnext_jax.training import default_config

_WIDTH, _HEIGHT = 500, 375


def write_images(root: str, count: int, seed: int = 0) -> list[str]:
  """Writes `count` photo-like JPEGs (smooth colour fields plus grain) into two classes."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(count):
    folder = os.path.join(root, f'class_{i % 2}')
    os.makedirs(folder, exist_ok=True)
    coarse = Image.fromarray(rng.uniform(0, 255, (12, 16, 3)).astype(np.uint8))
    smooth = np.asarray(coarse.resize((_WIDTH, _HEIGHT), Image.BICUBIC), np.float32)
    pixels = np.clip(smooth + rng.normal(0, 13, smooth.shape), 0, 255).astype(np.uint8)
    path = os.path.join(folder, f'{i:05d}.jpg')
    Image.fromarray(pixels).save(path, quality=90)
    paths.append(path)
  return paths


def bare_loop(paths: list[str], batch_size: int, image_size: int) -> tf.data.Dataset:
  """Read, random crop from the compressed JPEG, resize, flip, batch; nothing else."""
  def preprocess(path):
    data = tf.io.read_file(path)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.image.extract_jpeg_shape(data), tf.zeros([1, 0, 4]), area_range=(0.08, 1.0),
        aspect_ratio_range=(3 / 4, 4 / 3), max_attempts=10, use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(data, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size])
    return tf.cast(tf.image.random_flip_left_right(image), tf.uint8)

  ds = tf.data.Dataset.from_tensor_slices(paths).repeat()
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def measure(iterator, batch_size: int, batches: int, warmup: int = 3) -> tuple[float, float]:
  """(images per second, images per CPU-second of this process) over `batches` batches."""
  for _ in range(warmup):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(iterator)
  images = batches * batch_size
  return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batches', type=int, default=30, help='timed batches per run')
  parser.add_argument('--rounds', type=int, default=3, help='timed runs of each; best counts')
  parser.add_argument('--num_files', type=int, default=256)
  parser.add_argument('--auto_augment', default='',
                      help="the recipe's host augmentation: 'trivial_augment_wide' or "
                           "'rand_augment' (config.auto_augment)")
  parser.add_argument('--random_erasing', type=float, default=0.0,
                      help='the chance of an erased box (config.random_erasing)')
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as root:
    paths = write_images(os.path.join(root, 'train'), args.num_files)
    write_images(os.path.join(root, 'validation'), 2, seed=1)
    mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1e3
    extra = ''.join(f', {k} {v}' for k, v in (('auto_augment', args.auto_augment),
                                               ('random_erasing', args.random_erasing)) if v)
    print(f'{len(paths)} JPEGs of {_WIDTH}x{_HEIGHT}, {mean_kb:.0f} KB on average; '
          f'batch {args.batch_size}, image size {args.image_size}{extra}, '
          f'{os.cpu_count()} CPUs')
    config = default_config.get_config()
    config.update(
        dataset=pipeline.IMAGE_FOLDER, data_dir=root, train_split='train',
        eval_split='validation', batch_size=args.batch_size, eval_batch_size=args.batch_size,
        image_size=args.image_size, seed=0, cache_dir=os.path.join(root, 'cache'),
        auto_augment=args.auto_augment, random_erasing=args.random_erasing)
    pipeline.get_dataset_info(config)  # Preparation (a scan) is not timed.

    bare, ours = [], []
    for _ in range(args.rounds):
      bare.append(measure(iter(bare_loop(paths, args.batch_size, args.image_size)),
                          args.batch_size, args.batches))
      ours.append(measure(pipeline.create_train_iterator(config),
                          args.batch_size, args.batches))
  bare_rate, bare_cpu = np.max(bare, axis=0)
  ours_rate, ours_cpu = np.max(ours, axis=0)
  print(f'per CPU-second: bare {bare_cpu:.1f}, ours {ours_cpu:.1f} images '
        f'(ratio {ours_cpu / bare_cpu:.3f})')
  print(f'bare_tfdata_images_per_sec={bare_rate:.1f}')
  print(f'ratio={ours_rate / bare_rate:.3f}')
  print(f'images_per_sec={ours_rate:.1f}')


if __name__ == '__main__':
  main()
