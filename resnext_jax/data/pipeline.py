"""The input pipeline: tfds datasets, image folders and the built-in dataset, as uint8 batches.

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

Preprocessing: `preprocessing.py`, then the recipe's optional augmentations (`augment.py`:
TrivialAugmentWide / RandAugment, random erasing), seeded from the same (seed, p); where
the records come from: `tfds_source.py`, `image_folder.py`, `shapes.py`.
"""

import functools
import os
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from resnext_jax.data import augment, shapes
from resnext_jax.data.dataset import DatasetInfo, Source
from resnext_jax.data.image_folder import image_folder_source
from resnext_jax.data.preprocessing import (check_eval_preprocessing, default_resize_size,
                                            preprocess_eval, preprocess_train)
from resnext_jax.data.tfds_source import tfds_source

IMAGE_FOLDER = 'image_folder'


def get_dataset_info(config) -> DatasetInfo:
  """Describes the configured dataset, preparing it first if that has not been done."""
  return get_source(config).info


def create_train_iterator(config, *, start_step: int = 0) -> 'TrainIterator':
  """Infinite iterator over this process' part of each global training batch.

  `start_step=k` starts where k batches from scratch would have left off, without reading
  them.
  """
  return _train_iterator(config, start_step=start_step, process_index=jax.process_index(),
                         process_count=jax.process_count())


def create_eval_iterator(config, *, resize_size: int | None = None,
                         interpolation: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `config.eval_split`, padded so every process yields as many batches.

  Across all processes every example is yielded exactly once with `mask` True; padding
  examples are zero images with `mask` False. `resize_size` and `interpolation` replace
  config.eval_resize_size and config.eval_interpolation when given.
  """
  return _eval_iterator(config, process_index=jax.process_index(),
                        process_count=jax.process_count(), resize_size=resize_size,
                        interpolation=interpolation)


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


def _train_iterator(config, *, start_step: int, process_index: int,
                    process_count: int) -> TrainIterator:
  source = get_source(config)
  split = source.splits[config.train_split]
  global_batch = config.batch_size
  local_batch = _local_batch_size(global_batch, process_count, 'config.batch_size')
  seed = int(config.seed)
  image_size = train_image_size(config)
  min_area = config.get('train_crop_min_area', 0.08)
  augment_image = _augmentation(config)
  erasing = config.get('random_erasing', 0.0)
  order = _EpochOrder(split.num_examples, seed)

  def make_dataset(examples_seen: int) -> tf.data.Dataset:
    def positions(step):
      first = examples_seen + step * global_batch + process_index * local_batch
      return first + tf.range(local_batch, dtype=tf.int64)

    def preprocess(position, encoded, label):
      seed_pair = tf.stack([tf.constant(seed, tf.int64), position])
      image = preprocess_train(encoded, seed_pair, image_size=image_size, min_area=min_area)
      # The augmentations fold their own tags into the pair: draws apart from the crop's.
      if augment_image is not None:
        image = augment_image(image, seed_pair)
      if erasing:
        image = augment.random_erasing(image, seed_pair, erasing)
      return {'image': image, 'label': label}

    ds = tf.data.Dataset.counter().map(positions)
    ds = ds.map(lambda p: (p, *split.load(order(p))), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.unbatch().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds, local_batch)

  return TrainIterator(make_dataset, global_batch=global_batch, seed=seed,
                       num_examples=split.num_examples,
                       examples_seen=start_step * global_batch)


def train_image_size(config) -> int:
  """The train crop's size: config.train_image_size, or image_size (the eval crop)."""
  size = config.get('train_image_size', -1)
  return size if size > 0 else config.image_size


def _augmentation(config):
  """The (image, seed) -> image function of config.auto_augment, or None for none."""
  name = config.get('auto_augment', '')
  if not name:
    return None
  if name not in augment.AUGMENT_NAMES:
    raise ValueError(f'config.auto_augment={name!r}; use one of '
                     f'{", ".join(repr(n) for n in augment.AUGMENT_NAMES)}.')
  if name == 'rand_augment':
    return augment.build_augment(name, num_ops=config.rand_augment_num_ops,
                                 magnitude=config.rand_augment_magnitude)
  return augment.build_augment(name)


def _eval_iterator(config, *, process_index: int, process_count: int,
                   resize_size: int | None = None,
                   interpolation: str | None = None) -> Iterator[dict[str, np.ndarray]]:
  split = get_source(config).splits[config.eval_split]
  configured = config.get('eval_resize_size', -1)
  resize_size = resize_size or (configured if configured > 0 else
                                default_resize_size(config.image_size))
  interpolation = interpolation or config.get('eval_interpolation', '') or 'bilinear'
  check_eval_preprocessing(config.image_size, resize_size, interpolation)
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
    image = tf.cond(mask, lambda: preprocess_eval(encoded, image_size=image_size,
                                                  resize_size=resize_size,
                                                  interpolation=interpolation),
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



def get_source(config) -> Source:
  """The configured dataset, prepared on first use and remembered for this process."""
  return _cached_source(
      config.dataset, config.get('data_dir', '') or '', config.get('manual_dir', '') or '',
      config.train_split, config.eval_split, config.get('cache_dir', '') or '')


@functools.lru_cache(maxsize=None)
def _cached_source(dataset: str, data_dir: str, manual_dir: str, train_split: str,
                   eval_split: str, cache_dir: str) -> Source:
  cache_dir = os.path.expanduser(cache_dir or os.path.join('~', '.cache', 'resnext_jax'))
  if dataset == shapes.NAME:
    root = shapes.ensure_generated(data_dir or shapes.default_dir())
    return image_folder_source(root, (train_split, eval_split), cache_dir)
  if dataset == IMAGE_FOLDER:
    if not data_dir:
      raise ValueError("config.dataset='image_folder' needs config.data_dir=ROOT, the folder "
                       'holding ROOT/<split>/<class>/<image> (e.g. ROOT/train/cat/1.jpg).')
    return image_folder_source(data_dir, (train_split, eval_split), cache_dir)
  return tfds_source(dataset, data_dir, manual_dir, (train_split, eval_split))

