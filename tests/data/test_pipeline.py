"""Input pipeline tests on real, tiny data: generated image folders (JPEG, PNG, grayscale,
corrupt files) and ImageNet tars prepared by tfds' own imagenet2012 builder.

Each image carries its identity in its green channel (a solid level), so an example can be
recognised after cropping, resizing and flipping; the red channel holds a ramp, so that the
crops and flips themselves show in the pixels.
"""

import io
import json
import logging
import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from resnext_jax.data import dataset, image_folder, pipeline, preprocessing
from tests import helpers

_STEP = 18  # Green levels of example k: 15 + 18 k; JPEG keeps them within a few levels.


def _pixels(k: int, size=(24, 18)) -> np.ndarray:
  width, height = size
  pixels = np.zeros((height, width, 3), np.uint8)
  pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
  pixels[..., 1] = 15 + _STEP * k
  pixels[..., 2] = 128
  return pixels


def _encode(pixels: np.ndarray, fmt: str = 'JPEG', mode: str | None = None) -> bytes:
  image = Image.fromarray(pixels)
  if mode:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  return buffer.getvalue()


def _write(path, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _identity(images: np.ndarray) -> np.ndarray:
  """Recovers k from the green level of each image."""
  return np.round((images[..., 1].mean(axis=(1, 2)) - 15) / _STEP).astype(int)


def _config(tmp_path, **overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      dataset='image_folder', data_dir=str(tmp_path / 'data'), manual_dir='',
      train_split='train', eval_split='validation', batch_size=4, eval_batch_size=4,
      image_size=16, seed=0, cache_dir=str(tmp_path / 'cache')))
  config.update(overrides)
  return config


def _folder(tmp_path, counts: dict[str, int]) -> None:
  """A two-class folder whose split `s` holds `counts[s]` JPEGs with identities 0, 1, ..."""
  for split, count in counts.items():
    for k in range(count):
      _write(tmp_path / 'data' / split / 'ab'[k % 2] / f'{k}.jpg', _encode(_pixels(k)))


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(count)]


def _assert_same_batches(a, b) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


# --- Image folders ---


def test_image_folder_reads_png_and_grayscale_and_skips_corrupt_files(tmp_path, caplog):
  data = tmp_path / 'data'
  _write(data / 'train' / 'a' / 'rgb.jpg', _encode(_pixels(0)))
  _write(data / 'train' / 'a' / 'gray.jpg', _encode(_pixels(1), mode='L'))
  _write(data / 'train' / 'b' / 'rgba.png', _encode(_pixels(2), 'PNG', mode='RGBA'))
  _write(data / 'train' / 'b' / 'corrupt.jpg', b'this is not an image')
  _write(data / 'train' / 'b' / 'truncated.jpg', _encode(_pixels(3))[:300])
  _write(data / 'train' / 'b' / 'notes.txt', b'ignored: not an image extension')
  _write(data / 'validation' / 'a' / 'gray.png', _encode(_pixels(4), 'PNG', mode='L'))
  _write(data / 'validation' / 'b' / 'rgb.JPEG', _encode(_pixels(5)))
  config = _config(tmp_path, batch_size=3, eval_batch_size=2)

  with caplog.at_level(logging.WARNING):
    info = pipeline.get_dataset_info(config)
  assert info == dataset.DatasetInfo(num_classes=2, num_train_examples=3,
                                            num_eval_examples=2, class_names=('a', 'b'))
  assert 'corrupt.jpg' in caplog.text and 'truncated.jpg' in caplog.text

  batches = list(pipeline.create_eval_iterator(config))
  assert len(batches) == 1
  batch = batches[0]
  assert batch['image'].shape == (2, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32 and batch['mask'].dtype == bool
  np.testing.assert_array_equal(batch['label'], [0, 1])
  assert batch['mask'].all()
  gray = batch['image'][0].astype(int)  # A grayscale PNG becomes three equal channels.
  assert np.abs(gray[..., 0] - gray[..., 1]).max() <= 1
  assert _identity(batch['image'][1:]).tolist() == [5]

  batch = next(pipeline.create_train_iterator(config))
  assert batch['image'].shape == (3, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  assert sorted(batch['label'].tolist()) == [0, 0, 1]  # One epoch: every readable image.


def test_folder_scan_is_cached_and_only_new_files_are_decoded(tmp_path, monkeypatch, caplog):
  _folder(tmp_path, {'train': 4, 'validation': 2})
  _write(tmp_path / 'data' / 'train' / 'a' / 'bad.png', b'garbage')
  config = _config(tmp_path)
  root = config.data_dir
  image_folder.image_folder_source(root, ('train', 'validation'), config.cache_dir)

  checked = []
  real_readable = image_folder._readable
  monkeypatch.setattr(image_folder, '_readable',
                      lambda paths, where: checked.extend(paths) or real_readable(paths, where))
  with caplog.at_level(logging.WARNING):
    source = image_folder.image_folder_source(root, ('train', 'validation'), config.cache_dir)
  assert checked == []  # Verdicts, bad ones included, come from the cache.
  assert 'bad.png' in caplog.text
  assert source.info.num_train_examples == 4

  _write(tmp_path / 'data' / 'train' / 'b' / 'new.jpg', _encode(_pixels(7)))
  source = image_folder.image_folder_source(root, ('train', 'validation'), config.cache_dir)
  assert [os.path.basename(p) for p in checked] == ['new.jpg']
  assert source.info.num_train_examples == 5


@pytest.mark.parametrize('layout, error, message', [
    ({}, FileNotFoundError, 'does not exist'),
    ({'train/a/0.jpg': 'jpeg'}, FileNotFoundError, 'validation does not exist'),
    ({'train/a/0.jpg': 'jpeg', 'validation/': None}, ValueError, 'no class folders'),
    ({'train/a/0.jpg': 'jpeg', 'train/b/1.jpg': 'jpeg', 'validation/a/2.jpg': 'jpeg'},
     ValueError, "class 'b' is in"),
    ({'train/a/0.jpg': 'jpeg', 'validation/a/': None}, ValueError, 'holds no images'),
    ({'train/a/0.jpg': 'jpeg', 'validation/a/1.jpg': 'corrupt'}, ValueError,
     'No readable image'),
])
def test_image_folder_errors_name_the_path(tmp_path, layout, error, message):
  for name, kind in layout.items():
    path = tmp_path / 'data' / name
    if kind is None:
      os.makedirs(path, exist_ok=True)
    else:
      _write(path, _encode(_pixels(0)) if kind == 'jpeg' else b'corrupt')
  with pytest.raises(error, match=message) as e:
    pipeline.get_dataset_info(_config(tmp_path))
  assert str(tmp_path / 'data') in str(e.value)


def test_image_folder_without_data_dir_is_refused(tmp_path):
  with pytest.raises(ValueError, match='data_dir=ROOT'):
    pipeline.get_dataset_info(_config(tmp_path, data_dir=''))


# --- Exact evaluation across processes ---


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_sees_every_example_exactly_once(tmp_path, process_count):
  _folder(tmp_path, {'train': 2, 'validation': 7})
  config = _config(tmp_path, eval_batch_size=6)  # 7 examples: the last batch is padded.
  local = 6 // process_count
  per_process = [list(pipeline._eval_iterator(config, process_index=i,
                                              process_count=process_count))
                 for i in range(process_count)]
  assert {len(batches) for batches in per_process} == {2}  # ceil(7 / 6), on every process.

  seen = []
  padding = 0
  for batches in per_process:
    for batch in batches:
      assert batch['image'].shape == (local, 16, 16, 3)
      mask = batch['mask']
      seen += _identity(batch['image'][mask]).tolist()
      np.testing.assert_array_equal(batch['label'][mask], _identity(batch['image'][mask]) % 2)
      assert not batch['image'][~mask].any()
      padding += int((~mask).sum())
  assert sorted(seen) == list(range(7))
  assert padding == 2 * 6 - 7


# --- Determinism, resume, per-host sharding ---


def test_train_order_is_deterministic_and_resumes_exactly(tmp_path):
  _folder(tmp_path, {'train': 10, 'validation': 2})
  config = _config(tmp_path)
  reference = _take(pipeline.create_train_iterator(config), 6)
  _assert_same_batches(reference, _take(pipeline.create_train_iterator(config), 6))

  # One epoch (the first 10 positions) is a permutation of the 10 examples.
  first_epoch = np.concatenate([b['image'] for b in reference[:3]])[:10]
  assert sorted(_identity(first_epoch).tolist()) == list(range(10))
  # The next epoch is shuffled differently, and augmentation differs too.
  assert not np.array_equal(reference[0]['image'], reference[5]['image'])

  # Starting at step 3 gives the batches an uninterrupted run sees from step 3 on.
  _assert_same_batches(reference[3:], _take(
      pipeline.create_train_iterator(config, start_step=3), 3))

  # Saving after 2 batches and restoring into a fresh iterator continues exactly.
  iterator = pipeline.create_train_iterator(config)
  _take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))
  restored = pipeline.create_train_iterator(config)
  restored.set_state(state)
  _assert_same_batches(reference[2:], _take(restored, 4))
  assert restored.get_state()['examples_seen'] == 6 * 4

  other_seed = _take(pipeline.create_train_iterator(_config(tmp_path, seed=1)), 1)
  assert not np.array_equal(other_seed[0]['image'], reference[0]['image'])


def test_processes_read_disjoint_slices_of_the_same_global_batches(tmp_path):
  _folder(tmp_path, {'train': 10, 'validation': 2})
  config = _config(tmp_path)
  single = _take(pipeline.create_train_iterator(config), 3)
  iterators = [pipeline._train_iterator(config, start_step=0, process_index=i,
                                        process_count=2) for i in range(2)]
  local = [_take(it, 3) for it in iterators]
  for step in range(3):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([local[0][step][key], local[1][step][key]]), single[step][key])
  assert iterators[0].get_state() == iterators[1].get_state()


def test_state_from_other_data_and_indivisible_batches_are_refused(tmp_path):
  _folder(tmp_path, {'train': 10, 'validation': 2})
  iterator = pipeline.create_train_iterator(_config(tmp_path))
  with pytest.raises(ValueError, match='seed=5'):
    iterator.set_state({'examples_seen': 8, 'seed': 5, 'num_examples': 10})
  with pytest.raises(ValueError, match='batch_size=5 is not divisible'):
    pipeline._train_iterator(_config(tmp_path, batch_size=5), start_step=0,
                             process_index=0, process_count=2)
  with pytest.raises(ValueError, match='eval_batch_size=4 is not divisible'):
    pipeline._eval_iterator(_config(tmp_path), process_index=0, process_count=3)


# --- Preprocessing ---


def test_random_crop_window_follows_the_recipe():
  def window(height, width, seed, min_area=0.08):
    uniforms = tf.random.stateless_uniform([2 * preprocessing.CROP_ATTEMPTS + 2], [seed, 0])
    return [int(v) for v in preprocessing._random_crop_window(height, width, uniforms,
                                                               min_area)]

  for seed in range(50):
    top, left, h, w = window(375, 500, seed)
    assert 0 <= top <= 375 - h and 0 <= left <= 500 - w
    assert 0.08 * 0.97 <= h * w / (375 * 500) <= 1
    assert 3 / 4 * 0.97 <= w / h <= 4 / 3 * 1.03
  # No try fits a 10 x 1000 strip: the fallback is the centred crop of aspect 4/3.
  assert window(10, 1000, 0) == [0, (1000 - 13) // 2, 10, 13]
  top, left, h, w = window(375, 500, 0, min_area=0.5)
  assert h * w >= 0.5 * 0.97 * 375 * 500


def test_eval_preprocessing_resizes_the_short_side_and_crops_the_centre():
  pixels = np.zeros((100, 200, 3), np.uint8)
  pixels[:, 90:110] = 255  # A white bar in the centre, 20 of 200 columns.
  image = preprocessing.preprocess_eval(tf.constant(_encode(pixels, 'PNG')), image_size=56)
  assert image.shape == (56, 56, 3) and image.dtype == tf.uint8
  # Short side 100 -> 64 (56 / 0.875): the bar becomes 12.8 columns, centred in the crop.
  white = np.flatnonzero(image.numpy()[28, :, 0] > 128)
  assert 12 <= len(white) <= 14 and abs(white.mean() - 27.5) <= 0.5


def test_make_global_batch_shards_the_batch_axis():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  n = 2 * len(jax.devices())
  local = {'image': np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3),
           'label': np.arange(n, dtype=np.int32)}
  batch = pipeline.make_global_batch(local, sharding)
  for key, value in local.items():
    assert batch[key].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch[key]), value)


# --- tfds: ImageNet through tfds' own builder ---


def test_imagenet2012_is_prepared_by_tfds_from_manual_tars(tmp_path):
  # The real builder's layout: a tar of per-synset tars, and a flat tar of validation JPEGs
  # whose labels tfds looks up by sorted file name in its validation_labels.txt.
  labels_dir = tfds.core.tfds_path('datasets/imagenet2012')
  synsets = helpers.imagenet_synsets()
  val_synsets = (labels_dir / 'validation_labels.txt').read_text().split()
  train_synsets = [synsets[0], synsets[7], synsets[999]]
  manual = tmp_path / 'manual'
  expected = {}  # identity -> label
  train = {}
  for s, synset in enumerate(train_synsets):
    train[synset] = [_encode(_pixels(2 * s + i, (50, 40))) for i in range(2)]
    expected.update({2 * s + i: synsets.index(synset) for i in range(2)})
  validation = [_encode(_pixels(6 + i, (50, 40))) for i in range(3)]
  expected.update({6 + i: synsets.index(val_synsets[i]) for i in range(3)})
  helpers.write_imagenet_tars(str(manual), train, validation)

  config = _config(tmp_path, dataset='imagenet2012', data_dir=str(tmp_path / 'tfds'),
                   manual_dir=str(manual), batch_size=6, eval_batch_size=2)
  info = pipeline.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (1000, 6, 3)
  assert info.class_names == tuple(synsets)

  batch = next(pipeline.create_train_iterator(config))
  assert batch['image'].shape == (6, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  assert sorted(_identity(batch['image']).tolist()) == list(range(6))
  for k, label in zip(_identity(batch['image']), batch['label']):
    assert label == expected[k]

  batches = list(pipeline.create_eval_iterator(config))
  assert len(batches) == 2 and batches[1]['mask'].tolist() == [True, False]
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert sorted(_identity(images).tolist()) == [6, 7, 8]
  for k, label in zip(_identity(images), labels):
    assert label == expected[k]


def test_unprepared_imagenet_says_which_files_go_where(tmp_path):
  config = _config(tmp_path, dataset='imagenet2012', data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar') as e:
    pipeline.get_dataset_info(config)
  assert 'config.manual_dir' in str(e.value) and 'tfds build imagenet2012' in str(e.value)

  os.makedirs(tmp_path / 'manual')
  _write(tmp_path / 'manual' / 'ILSVRC2012_img_val.tar', b'')
  config.manual_dir = str(tmp_path / 'manual')
  with pytest.raises(FileNotFoundError, match='Missing in .*manual: ILSVRC2012_img_train.tar'):
    pipeline.get_dataset_info(config)
