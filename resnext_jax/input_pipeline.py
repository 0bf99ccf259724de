"""Input pipeline: tfds datasets, image folders and the built-in dataset, as uint8 batches.

Sources (`config.dataset`):
  * any tfds image classification dataset, e.g. 'imagenet2012', read from `config.data_dir`
    and prepared there first (from the files in `config.manual_dir`) if it is not yet;
  * 'image_folder': the user's images in `config.data_dir`/<split>/<class>/<image>
    (JPEG, PNG, BMP or GIF; grayscale or colour), class names taken from the folders;
  * 'shapes': the built-in dataset (see `builtin_dataset`), generated into the image-folder
    layout on first use.

Why tf.data driven by a stateless sampler, rather than grain or tf.data's shuffle buffer:
  * The example at position p of the training stream is a pure function of (seed, p): epoch
    p // n, a per-epoch permutation seeded with (seed, epoch), and augmentation seeded with
    (seed, p). The iterator's whole state is the number of examples consumed: one integer,
    the same on every process, and a restore starts reading right there without replaying
    the epoch. A shuffle buffer cannot do that, and tf.data's own iterator checkpoints hold
    the buffered data, per process.
  * Decoding runs in tf.data's C++ thread pool, in parallel and outside the GIL, with
    `decode_and_crop_jpeg`, which decodes only the part of the JPEG inside the crop. grain
    0.2 decodes in Python worker processes, and its loader state carries each process' shard
    options, so it differs between processes. Records are still read by random access: tfds
    datasets through their array_record files (the reader grain uses), folders by file name.
  * Global batch k holds the stream positions [kB, (k+1)B); process i decodes its slice
    [kB + ib, kB + (i+1)b) where b = B / process_count. Processes read disjoint data, and the
    sequence of global batches does not depend on the number of processes.

Preprocessing follows mmcls' ImageNet recipe: train = RandomResizedCrop (area 0.08-1,
aspect 3/4-4/3, ten tries then a centre crop, as torchvision and mmcls sample it) taken from the
compressed JPEG, bilinear resize, horizontal flip with p=0.5; eval = resize the shorter side
to image_size / 0.875, centre crop. Batches leave the host as uint8; the train step normalises
them on the device (four times less host-to-device traffic than float32).
"""

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Iterator

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnext_jax import builtin_dataset

IMAGE_FOLDER = 'image_folder'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
EVAL_CROP_FRACTION = 0.875  # Eval resizes the shorter side to image_size / this, then crops.
CROP_ASPECT_RATIOS = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# The files each manual-download tfds dataset needs in `config.manual_dir`.
MANUAL_FILES = {'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')}

# TF only ever runs on the host here: keep it off the accelerators that JAX owns.
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF's devices were set up already; too late to hide them.
  pass


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset before reading it."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  class_names: tuple[str, ...] | None  # Folder names or synsets, to name predictions.


def get_dataset_info(config) -> DatasetInfo:
  """Describes the configured dataset, preparing it first if that has not been done."""
  return _get_source(config).info


def create_train_iterator(config, *, start_step: int = 0) -> 'TrainIterator':
  """Infinite iterator over this process' part of each global training batch.

  `start_step=k` starts where k batches from scratch would have left off, without reading
  them.
  """
  return _train_iterator(config, start_step=start_step, process_index=jax.process_index(),
                         process_count=jax.process_count())


def create_eval_iterator(config) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `config.eval_split`, padded so every process yields as many batches.

  Across all processes every example is yielded exactly once with `mask` True; padding
  examples are zero images with `mask` False.
  """
  return _eval_iterator(config, process_index=jax.process_index(),
                        process_count=jax.process_count())


def make_global_batch(local_batch: dict[str, np.ndarray],
                      sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Assembles the processes' local batches into global arrays split on the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


class TrainIterator:
  """Yields local training batches; its position is the number of examples consumed.

  The tf.data pipeline is built on the first `next`, so that `set_state` right after
  creation costs nothing.
  """

  def __init__(self, make_dataset: Callable[[int], tf.data.Dataset], *, global_batch: int,
               seed: int, num_examples: int, examples_seen: int):
    self._make_dataset = make_dataset
    self._global_batch = global_batch
    self._seed = seed
    self._num_examples = num_examples
    self._examples_seen = examples_seen
    self._iterator = None

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._make_dataset(self._examples_seen).as_numpy_iterator()
    batch = next(self._iterator)
    self._examples_seen += self._global_batch
    return batch

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable, and the same on every process after the same number of steps."""
    return {'examples_seen': self._examples_seen, 'seed': self._seed,
            'num_examples': self._num_examples}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues from a `get_state()` result, possibly saved with another batch size."""
    for key, current in (('seed', self._seed), ('num_examples', self._num_examples)):
      if int(state[key]) != current:
        raise ValueError(
            f'The saved input state has {key}={state[key]} but this run has {current}: the '
            'checkpoint comes from a run on other data or with another seed, so the data '
            'order cannot be continued. Resume with the same config.dataset / '
            'config.train_split / config.seed, or start in a fresh workdir.')
    self._examples_seen = int(state['examples_seen'])
    self._iterator = None


# ---------------------------------------------------------------------------------------
# Pipelines.


def _train_iterator(config, *, start_step: int, process_index: int,
                    process_count: int) -> TrainIterator:
  source = _get_source(config)
  split = source.splits[config.train_split]
  global_batch = config.batch_size
  local_batch = _local_batch_size(global_batch, process_count, 'config.batch_size')
  seed = int(config.seed)
  image_size = config.image_size
  min_area = config.get('train_crop_min_area', 0.08)
  order = _EpochOrder(split.num_examples, seed)

  def make_dataset(examples_seen: int) -> tf.data.Dataset:
    def positions(step):
      first = examples_seen + step * global_batch + process_index * local_batch
      return first + tf.range(local_batch, dtype=tf.int64)

    def preprocess(position, encoded, label):
      seed_pair = tf.stack([tf.constant(seed, tf.int64), position])
      image = preprocess_train(encoded, seed_pair, image_size=image_size, min_area=min_area)
      return {'image': image, 'label': label}

    ds = tf.data.Dataset.counter().map(positions)
    ds = ds.map(lambda p: (p, *split.load(order(p))), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.unbatch().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds, local_batch)

  return TrainIterator(make_dataset, global_batch=global_batch, seed=seed,
                       num_examples=split.num_examples,
                       examples_seen=start_step * global_batch)


def _eval_iterator(config, *, process_index: int,
                   process_count: int) -> Iterator[dict[str, np.ndarray]]:
  split = _get_source(config).splits[config.eval_split]
  global_batch = config.eval_batch_size
  local_batch = _local_batch_size(global_batch, process_count, 'config.eval_batch_size')
  image_size = config.image_size
  n = split.num_examples
  num_batches = -(-n // global_batch)

  def positions(step):
    first = step * global_batch + process_index * local_batch
    return first + tf.range(local_batch, dtype=tf.int64)

  def load(position):
    mask = position < n
    encoded, label = split.load(tf.minimum(position, n - 1))
    return encoded, tf.where(mask, label, 0), mask

  def preprocess(encoded, label, mask):
    image = tf.cond(mask, lambda: preprocess_eval(encoded, image_size=image_size),
                    lambda: tf.zeros([image_size, image_size, 3], tf.uint8))
    return {'image': image, 'label': label, 'mask': mask}

  ds = tf.data.Dataset.range(num_batches).map(positions)
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.unbatch().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  return _finish(ds, local_batch).as_numpy_iterator()


def _finish(ds: tf.data.Dataset, local_batch: int) -> tf.data.Dataset:
  ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _local_batch_size(global_batch: int, process_count: int, name: str) -> int:
  if global_batch % process_count:
    raise ValueError(
        f'{name}={global_batch} is not divisible by the number of processes '
        f'({process_count}); each process reads an equal part of the global batch. '
        f'Use a multiple of {process_count}.')
  return global_batch // process_count


class _EpochOrder:
  """Maps training-stream positions to example indices: a fresh permutation each epoch."""

  def __init__(self, num_examples: int, seed: int):
    self._num_examples = num_examples
    self._seed = seed
    # An epoch's permutation is drawn once; a batch spans at most a few epochs.
    self._permutation = functools.lru_cache(maxsize=2)(self._draw_permutation)

  def __call__(self, positions: tf.Tensor) -> tf.Tensor:
    indices = tf.numpy_function(self._indices, [positions], tf.int64, stateful=False)
    return tf.ensure_shape(indices, positions.shape)

  def _indices(self, positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(positions, self._num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      indices[where] = self._permutation(int(epoch))[offsets[where]]
    return indices

  def _draw_permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._num_examples)


# ---------------------------------------------------------------------------------------
# Preprocessing (TF graph functions, run inside tf.data).


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Any supported encoded image -> uint8 RGB [h, w, 3] (grayscale and RGBA converted)."""
  return tf.cond(tf.io.is_jpeg(encoded),
                 lambda: tf.io.decode_jpeg(encoded, channels=3),
                 lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


def preprocess_train(encoded: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                     min_area: float = 0.08) -> tf.Tensor:
  """Random-resized crop (decoding only the crop of a JPEG), resize, random flip."""
  # All the randomness of one example in one draw: crop tries, crop place, flip.
  uniforms = tf.random.stateless_uniform([2 * CROP_ATTEMPTS + 3], seed)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = _random_crop_window(shape[0], shape[1], uniforms[:-1], min_area)
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack(window), channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = _random_crop_window(shape[0], shape[1], uniforms[:-1], min_area)
    return image[y:y + h, x:x + w]

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image = _to_uint8(tf.image.resize(image, [image_size, image_size], method='bilinear'))
  return tf.cond(uniforms[-1] < 0.5, lambda: tf.reverse(image, [1]), lambda: image)


def preprocess_eval(encoded: tf.Tensor, *, image_size: int) -> tf.Tensor:
  """Resize the shorter side to image_size / 0.875, then take the central square."""
  image = decode_image(encoded)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  short_side = round(image_size / EVAL_CROP_FRACTION)
  new_shape = tf.cast(tf.round(shape * (short_side / tf.reduce_min(shape))), tf.int32)
  new_shape = tf.maximum(new_shape, short_side)  # Guards the short side against rounding.
  image = tf.image.resize(image, new_shape, method='bilinear')
  top = (new_shape[0] - image_size) // 2
  left = (new_shape[1] - image_size) // 2
  return _to_uint8(image[top:top + image_size, left:left + image_size])


def _random_crop_window(height: tf.Tensor, width: tf.Tensor, uniforms: tf.Tensor,
                        min_area: float) -> tuple[tf.Tensor, ...]:
  """(top, left, crop height, crop width) sampled as torchvision's RandomResizedCrop does.

  Up to ten tries of a random area fraction in [min_area, 1] and a log-uniform aspect ratio in
  [3/4, 4/3]; the first that fits is placed uniformly at random. If none fits, the centred
  crop of the whole image with its aspect ratio clamped to that range. `uniforms` holds
  2 * CROP_ATTEMPTS + 2 draws from [0, 1).
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  lo, hi = CROP_ASPECT_RATIOS
  areas = h * w * (min_area + (1 - min_area) * uniforms[:CROP_ATTEMPTS])
  ratios = tf.exp(math.log(lo) + math.log(hi / lo) * uniforms[CROP_ATTEMPTS:2 * CROP_ATTEMPTS])
  crop_w = tf.round(tf.sqrt(areas * ratios))
  crop_h = tf.round(tf.sqrt(areas / ratios))
  fits = (crop_w >= 1) & (crop_w <= w) & (crop_h >= 1) & (crop_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # The first try that fits.
  found = tf.reduce_any(fits)

  aspect = w / h
  fallback_w = tf.where(aspect > hi, tf.round(h * hi), w)
  fallback_h = tf.where(aspect < lo, tf.round(w / lo), h)
  crop_h = tf.where(found, crop_h[first], fallback_h)
  crop_w = tf.where(found, crop_w[first], fallback_w)

  def offset(u, free):  # Uniform over the 0 .. free offsets; centred for the fallback.
    return tf.cast(tf.where(found, tf.minimum(tf.floor(u * (free + 1)), free),
                            tf.floor(free / 2)), tf.int32)

  top = offset(uniforms[2 * CROP_ATTEMPTS], h - crop_h)
  left = offset(uniforms[2 * CROP_ATTEMPTS + 1], w - crop_w)
  return top, left, tf.cast(crop_h, tf.int32), tf.cast(crop_w, tf.int32)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds bilinear output, which stays within [0, 255], to the nearest uint8."""
  return tf.cast(image + 0.5, tf.uint8)


# ---------------------------------------------------------------------------------------
# Sources: each split is a list of records readable by index.


@dataclasses.dataclass(frozen=True)
class _Split:
  """A split readable by example index from inside a tf.data graph."""
  num_examples: int
  # int64 indices [b] -> (encoded images: string [b], labels: int32 [b]).
  load: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


@dataclasses.dataclass(frozen=True)
class _Source:
  info: DatasetInfo
  splits: dict[str, _Split]


def _get_source(config) -> _Source:
  """The configured dataset, prepared on first use and remembered for this process."""
  return _cached_source(
      config.dataset, config.get('data_dir', '') or '', config.get('manual_dir', '') or '',
      config.train_split, config.eval_split, config.get('cache_dir', '') or '')


@functools.lru_cache(maxsize=None)
def _cached_source(dataset: str, data_dir: str, manual_dir: str, train_split: str,
                   eval_split: str, cache_dir: str) -> _Source:
  cache_dir = os.path.expanduser(cache_dir or os.path.join('~', '.cache', 'resnext_jax'))
  if dataset == builtin_dataset.NAME:
    root = builtin_dataset.ensure_generated(data_dir or builtin_dataset.default_dir())
    return _image_folder_source(root, (train_split, eval_split), cache_dir)
  if dataset == IMAGE_FOLDER:
    if not data_dir:
      raise ValueError("config.dataset='image_folder' needs config.data_dir=ROOT, the folder "
                       'holding ROOT/<split>/<class>/<image> (e.g. ROOT/train/cat/1.jpg).')
    return _image_folder_source(data_dir, (train_split, eval_split), cache_dir)
  return _tfds_source(dataset, data_dir, manual_dir, (train_split, eval_split))


def _numpy_load(read: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]):
  """Wraps a numpy batch reader as a graph function."""
  def load(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    records, labels = tf.numpy_function(read, [indices], (tf.string, tf.int32),
                                        stateful=False)
    return tf.ensure_shape(records, indices.shape), tf.ensure_shape(labels, indices.shape)
  return load


# --- tfds ---


def _tfds_source(name: str, data_dir: str, manual_dir: str, splits: tuple[str, ...]) -> _Source:
  builder = tfds.builder(name, data_dir=data_dir or None)
  if not builder.is_prepared():
    _prepare_tfds(builder, manual_dir)
    builder = tfds.builder(name, data_dir=data_dir or None)
  info = builder.info
  if not info.supervised_keys or len(info.supervised_keys) != 2:
    raise ValueError(f'tfds dataset {name!r} has no (image, label) supervised keys; it is not '
                     'an image classification dataset.')
  image_key, label_key = info.supervised_keys
  label_feature = info.features[label_key]
  image_spec = info.features[image_key].get_serialized_info()
  if not isinstance(label_feature, tfds.features.ClassLabel) or image_spec.shape != ():
    raise ValueError(f'tfds dataset {name!r} does not store one encoded image ({image_key!r}) '
                     f'and one class label ({label_key!r}) per example.')
  parse_spec = {image_key: tf.io.FixedLenFeature([], tf.string),
                label_key: tf.io.FixedLenFeature([], tf.int64)}

  def split_of(split: str) -> _Split:
    if split.split('[')[0] not in info.splits:
      raise ValueError(f'tfds dataset {name!r} in {builder.data_dir} has no split {split!r}; '
                       f'it has {sorted(info.splits)}. Set config.train_split / '
                       'config.eval_split accordingly.')
    try:
      records = builder.as_data_source(
          split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except NotImplementedError as e:
      raise ValueError(
          f'{name!r} is prepared in {builder.data_dir} as {info.file_format.value} only, which '
          'cannot be read by index. Convert it once with `tfds convert_format '
          f'--dataset_version_dir={builder.data_dir} --out_file_format=array_record`.') from e

    def read(indices):
      return np.array(records.__getitems__(indices.tolist()), dtype=object)

    def load(indices):
      serialized = tf.numpy_function(read, [indices], tf.string, stateful=False)
      parsed = tf.io.parse_example(tf.ensure_shape(serialized, indices.shape), parse_spec)
      return parsed[image_key], tf.cast(parsed[label_key], tf.int32)

    if not len(records):
      raise ValueError(f'Split {split!r} of tfds dataset {name!r} in {builder.data_dir} is empty.')
    return _Split(len(records), load)

  split_data = {s: split_of(s) for s in splits}
  return _Source(
      DatasetInfo(num_classes=label_feature.num_classes,
                  num_train_examples=split_data[splits[0]].num_examples,
                  num_eval_examples=split_data[splits[1]].num_examples,
                  class_names=tuple(label_feature.names)),
      split_data)


def _prepare_tfds(builder, manual_dir: str) -> None:
  """Runs tfds' own builder into array_record files, from `manual_dir` if it needs one."""
  name = builder.name
  how = (f'`tfds build {name} --data_dir={builder.data_dir_root} --manual_dir=<folder> '
         '--file_format=array_record`')
  instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
  if instructions:
    needed = MANUAL_FILES.get(name, ())
    missing = [f for f in needed if not os.path.isfile(os.path.join(manual_dir, f))]
    if not manual_dir or not os.path.isdir(manual_dir) or missing:
      files = ', '.join(needed) or 'the files below'
      raise FileNotFoundError(
          f'tfds dataset {name!r} is not prepared in {builder.data_dir_root}, and it must be '
          f'prepared from files you download yourself: {files}. Put them in one folder and set '
          'config.manual_dir to it; the dataset is then prepared on first use (hours for '
          f'ImageNet), or beforehand with {how}.'
          + (f' Missing in {manual_dir}: {", ".join(missing)}.' if manual_dir else '')
          + f'\ntfds says:\n{instructions}')
  if jax.process_count() > 1:
    raise RuntimeError(
        f'tfds dataset {name!r} is not prepared in {builder.data_dir_root}. Prepare it once '
        f'before a multi-process run, e.g. with {how}, so the processes do not all build it.')
  logging.info('Preparing tfds dataset %s into %s (array_record files) ...', name,
               builder.data_dir_root)
  builder.download_and_prepare(
      file_format='array_record',
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))


# --- Image folders ---


def _image_folder_source(root: str, splits: tuple[str, ...], cache_dir: str) -> _Source:
  """Scans and validates ROOT/<split>/<class>/<image> for each split; classes must agree."""
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(
        f'Image folder {root} does not exist. config.data_dir must be a folder holding '
        '<split>/<class>/<image>, e.g. ROOT/train/cat/1.jpg and ROOT/validation/cat/2.jpg.')
  class_names = {split: _class_folders(root, split) for split in splits}
  names = class_names[splits[0]]
  for split in splits[1:]:
    if class_names[split] != names:
      lines = []
      for a, b in ((splits[0], split), (split, splits[0])):
        for c in sorted(set(class_names[a]) - set(class_names[b])):
          lines.append(f'  class {c!r} is in {os.path.join(root, a)} but '
                       f'{os.path.join(root, b, c)} does not exist')
      raise ValueError('The splits of image folder ' + root + ' have different classes:\n'
                       + '\n'.join(lines) + '\nEvery split needs a folder for every class.')

  split_data = {}
  for split in splits:
    files, labels = _scan_split(os.path.join(root, split), names, cache_dir)
    paths = np.array(files, dtype=object)
    labels = np.array(labels, dtype=np.int32)

    def read(indices, paths=paths, labels=labels):
      records = np.empty(len(indices), dtype=object)
      for j, i in enumerate(indices):
        with open(paths[i], 'rb') as f:
          records[j] = f.read()
      return records, labels[indices]

    split_data[split] = _Split(len(paths), _numpy_load(read))
  return _Source(
      DatasetInfo(num_classes=len(names),
                  num_train_examples=split_data[splits[0]].num_examples,
                  num_eval_examples=split_data[splits[1]].num_examples,
                  class_names=names),
      split_data)


def _class_folders(root: str, split: str) -> tuple[str, ...]:
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != '.')
    raise FileNotFoundError(
        f'Split folder {split_dir} does not exist (folders in {root}: {found or "none"}). '
        'Create it with one subfolder per class, or set config.train_split / '
        'config.eval_split to existing ones.')
  names = tuple(sorted(e.name for e in os.scandir(split_dir)
                       if e.is_dir() and e.name[0] != '.'))
  if not names:
    raise ValueError(f'{split_dir} has no class folders. Put each image in '
                     f'{split_dir}/<class name>/, one folder per class.')
  return names


def _scan_split(split_dir: str, class_names: tuple[str, ...],
                cache_dir: str) -> tuple[list[str], list[int]]:
  """Readable images of one split and their labels; unreadable ones reported and skipped.

  Every image is decoded once, the first time it is seen. The verdicts are cached (keyed by
  path, size and modification time) in `cache_dir`, so later runs only list the folder.
  """
  candidates = []  # (path, label, size, mtime)
  for label, name in enumerate(class_names):
    class_dir = os.path.join(split_dir, name)
    before = len(candidates)
    for parent, dirs, files in os.walk(class_dir, followlinks=True):
      dirs[:] = sorted(d for d in dirs if d[0] != '.')
      for file in sorted(files):
        if file[0] != '.' and file.lower().endswith(IMAGE_EXTENSIONS):
          path = os.path.join(parent, file)
          stat = os.stat(path)
          candidates.append((path, label, stat.st_size, stat.st_mtime_ns))
    if len(candidates) == before:
      raise ValueError(f'Class folder {class_dir} holds no images '
                       f'({", ".join(IMAGE_EXTENSIONS)}). Add some, or remove the class from '
                       'every split.')

  key = hashlib.sha1(split_dir.encode()).hexdigest()[:16]
  cache_path = os.path.join(cache_dir, 'image_folder', f'{key}.json')
  cache = _read_json(cache_path).get('files', {})
  verdicts = {}
  unchecked = []
  for path, _, size, mtime in candidates:
    cached = cache.get(path)
    if cached is not None and cached[:2] == [size, mtime]:
      verdicts[path] = cached[2]
    else:
      unchecked.append(path)
  if unchecked:
    readable = _readable(unchecked, split_dir)
    verdicts.update((p, p in readable) for p in unchecked)
    _write_json(cache_path, {'split_dir': split_dir, 'files': {
        p: [size, mtime, verdicts[p]] for p, _, size, mtime in candidates}})

  bad = [p for p, *_ in candidates if not verdicts[p]]
  if bad:
    shown = '\n  '.join(bad[:20]) + (f'\n  ... and {len(bad) - 20} more' if len(bad) > 20 else '')
    logging.warning('Skipping %d unreadable image(s) in %s (verdicts cached in %s):\n  %s',
                    len(bad), split_dir, cache_path, shown)
  kept = [(p, label) for p, label, *_ in candidates if verdicts[p]]
  missing = set(range(len(class_names))) - {label for _, label in kept}
  if missing:
    folders = ', '.join(os.path.join(split_dir, class_names[i]) for i in sorted(missing))
    raise ValueError(f'No readable image in {folders}. Replace the unreadable files listed above.')
  return [p for p, _ in kept], [label for _, label in kept]


def _readable(paths: list[str], where: str) -> set[str]:
  """The paths that TF reads and decodes without error, decoded in parallel."""
  logging.info('Checking %d new or changed image(s) in %s ...', len(paths), where)
  ds = tf.data.Dataset.from_tensor_slices(paths)
  ds = ds.map(lambda p: (p, tf.shape(decode_image(tf.io.read_file(p)))),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  readable = set()
  last_log = time.monotonic()
  for path, _ in ds.ignore_errors(log_warning=False).as_numpy_iterator():
    readable.add(path.decode())
    if time.monotonic() - last_log > 30:
      logging.info('... %d / %d checked', len(readable), len(paths))
      last_log = time.monotonic()
  return readable


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _write_json(path: str, data: dict[str, Any]) -> None:
  """Writes atomically, so that concurrent processes never read half a file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(data, f)
  os.replace(tmp, path)
