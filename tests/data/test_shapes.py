"""The built-in 'shapes' dataset: deterministic generation, its layout, and its way through
the image-folder pipeline."""

import hashlib
import os

import ml_collections
import numpy as np
import pytest

from resnext_jax.data import dataset, pipeline, shapes


def _digests(root) -> dict[str, str]:
  digests = {}
  for parent, _, files in os.walk(root):
    for name in files:
      path = os.path.join(parent, name)
      with open(path, 'rb') as f:
        digests[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return digests


@pytest.fixture
def small_splits(monkeypatch):
  monkeypatch.setattr(shapes, 'SPLIT_SIZES', {'train': 3, 'validation': 2})


def test_generation_is_deterministic_and_in_the_image_folder_layout(tmp_path, small_splits):
  first = shapes.ensure_generated(str(tmp_path / 'a'))
  second = shapes.ensure_generated(str(tmp_path / 'b'))
  digests = _digests(first)
  assert digests == _digests(second)
  for split, count in (('train', 3), ('validation', 2)):
    assert sorted(os.listdir(os.path.join(first, split))) == list(shapes.CLASS_NAMES)
    for name in shapes.CLASS_NAMES:
      assert len(os.listdir(os.path.join(first, split, name))) == count
  # Different splits hold different images.
  assert digests['train/circle/circle_0000.jpg'] != digests['validation/circle/circle_0000.jpg']


def test_existing_copy_is_reused_and_foreign_folders_are_left_alone(tmp_path, small_splits):
  root = shapes.ensure_generated(str(tmp_path / 'shapes'))
  image = os.path.join(root, 'train', 'star', 'star_0000.jpg')
  before = os.stat(image).st_mtime_ns
  assert shapes.ensure_generated(root) == root
  assert os.stat(image).st_mtime_ns == before

  foreign = tmp_path / 'photos'
  os.makedirs(foreign)
  (foreign / 'holiday.jpg').write_bytes(b'')
  with pytest.raises(FileExistsError, match='not empty'):
    shapes.ensure_generated(str(foreign))


def test_default_location_is_under_home(monkeypatch, tmp_path):
  monkeypatch.setenv('HOME', str(tmp_path))
  assert shapes.default_dir().startswith(str(tmp_path / '.cache'))


@pytest.mark.slow  # Generates and checks all 3,500 images: 15-40 s on 2 busy cores.
def test_shapes_flow_through_the_image_folder_pipeline(tmp_path):
  config = ml_collections.ConfigDict(dict(
      dataset=shapes.NAME, data_dir=str(tmp_path / 'shapes'), train_split='train',
      eval_split='validation', batch_size=32, eval_batch_size=100, image_size=32, seed=0,
      cache_dir=str(tmp_path / 'cache')))
  info = pipeline.get_dataset_info(config)
  assert info == dataset.DatasetInfo(
      num_classes=5, num_train_examples=3000, num_eval_examples=500,
      class_names=shapes.CLASS_NAMES)
  batch = next(pipeline.create_train_iterator(config))
  assert batch['image'].shape == (32, 32, 32, 3) and batch['image'].dtype == np.uint8
  assert len(set(batch['label'].tolist())) > 1  # Shuffled across classes.
  labels = np.concatenate([b['label'] for b in pipeline.create_eval_iterator(config)])
  np.testing.assert_array_equal(np.bincount(labels), [100] * 5)
