"""Workdirs, scan caches, starting weights, converted weights and tfds data in a gs://
bucket: the real code paths (etils.epath / tf.io.gfile, Orbax with TensorStore, tf.summary,
array_record's reader) against a Cloud Storage emulator on 127.0.0.1
(tests/gcs_emulator.py)."""

import os
import signal
import subprocess

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import torch
import torchvision
from etils import epath

from resnext_jax import convert
from resnext_jax.data import pipeline
from resnext_jax.training import checkpoints
from tests.gcs_emulator import GcsEmulator
from tests.helpers import ROOT, leaves, read_metrics, tiny_config, train_command

STEPS = 12


@pytest.fixture(scope='module')
def gcs():
  with GcsEmulator(apply_env=True) as emulator:  # this process and its children use it
    yield emulator


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  shapes = str(tmp_path_factory.mktemp('shapes'))
  pipeline.get_dataset_info(tiny_config(shapes))
  return shapes


@pytest.mark.slow
def test_a_run_in_a_bucket_stops_resumes_and_loads_like_a_local_one(gcs, shapes_dir, tmp_path):
  workdir = f'{gcs.url}/runs/rx'
  command = train_command(workdir, shapes_dir, STEPS) + [
      '--config.checkpoint_every_steps=4', '--config.eval_every_steps=6',
      f'--config.cache_dir={gcs.url}/cache']
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  output = []
  for line in process.stdout:  # SIGTERM once a few steps have run
    output.append(line)
    if 'step 5/' in line:
      process.send_signal(signal.SIGTERM)
  process.wait(timeout=300)
  assert process.returncode == 0, ''.join(output[-30:])
  stopped = checkpoints.TrainingCheckpoints(workdir).latest_step()
  assert 5 <= stopped < STEPS, ''.join(output[-30:])

  rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resumed from {workdir}/checkpoints/{stopped}' in rerun.stderr

  local = str(tmp_path / 'local')
  subprocess.run(train_command(local, shapes_dir, STEPS) + ['--config.eval_every_steps=6'],
                 cwd=ROOT, check=True, capture_output=True, timeout=300)
  for a, b in zip(leaves(checkpoints.load_variables(workdir)),
                  leaves(checkpoints.load_variables(local))):
    np.testing.assert_array_equal(a, b)
  assert [r['step'] for r in read_metrics(workdir) if 'eval_top1' in r] == [6, 12]
  names = {p.name for p in epath.Path(workdir).iterdir()}
  assert {'checkpoints', 'config.json', 'model.json', 'metrics.jsonl'} <= names
  assert any(n.startswith('events.out.tfevents') for n in names)  # TensorBoard's
  assert list(epath.Path(gcs.url, 'cache', 'image_folder').glob('*.json'))  # the scan cache

  # Finetuning from the bucket's run, into the bucket.
  finetuned = f'{gcs.url}/runs/ft'
  result = subprocess.run(
      train_command(finetuned, shapes_dir, 2) + [f'--config.init_from={workdir}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'from {workdir}' in result.stderr


def test_the_converter_writes_into_a_bucket(gcs, tmp_path):
  path = str(tmp_path / 'resnext50.pth')
  torch.save(torchvision.models.resnext50_32x4d().state_dict(), path)  # random weights
  output = f'{gcs.url}/converted/resnext50'
  variables = convert.convert_file(path, output, 'resnext50_32x4d')
  loaded = checkpoints.load_variables(output)
  for a, b in zip(leaves(loaded), leaves(variables)):
    np.testing.assert_array_equal(a, b)
  assert checkpoints.read_model_info(output)['arch'] == 'resnext50_32x4d'
  with pytest.raises(checkpoints.CheckpointError, match='exists and is not empty'):
    convert.convert_file(path, output, 'resnext50_32x4d')


class TinyPatterns(tfds.core.GeneratorBasedBuilder):
  """Two classes of 16 px images, for tfds data in a bucket."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(16, 16, 3)),
        'label': tfds.features.ClassLabel(num_classes=2)}), supervised_keys=('image', 'label'))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(32), 'validation': self._generate_examples(8)}

  def _generate_examples(self, count):
    for i in range(count):
      yield i, {'image': np.full((16, 16, 3), 40 + 160 * (i % 2), np.uint8), 'label': i % 2}


def test_tfds_data_prepared_into_a_bucket_is_read_from_it(gcs, tmp_path):
  local = str(tmp_path / 'tfds')
  tfds.builder('tiny_patterns', data_dir=local, file_format='array_record').download_and_prepare()
  remote = f'{gcs.url}/tensorflow_datasets'
  for root, _, files in os.walk(local):
    for name in files:
      target = os.path.join(remote, os.path.relpath(os.path.join(root, name), local))
      tf.io.gfile.makedirs(os.path.dirname(target))
      tf.io.gfile.copy(os.path.join(root, name), target, overwrite=True)
  config = tiny_config('', dataset='tiny_patterns', data_dir=remote)
  info = pipeline.get_dataset_info(config)
  assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (32, 8, 2)
  batch = next(pipeline.create_train_iterator(config))
  assert batch['image'].shape == (16, 16, 16, 3)

  unprepared = tiny_config('', dataset='tiny_patterns', data_dir=f'{gcs.url}/empty')
  with pytest.raises(ValueError, match='cannot be prepared there: array_record files are '
                                       'written to local disk only'):
    pipeline.get_dataset_info(unprepared)
