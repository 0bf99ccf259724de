"""The main job end to end: train.py, configs, checkpoints, resume, NaN, finetuning. (SIGTERM:
test_faults.py, test_multihost.py and, for one process, test_remote_storage.py.)"""

import json
import logging
import os
import re
import time

import numpy as np
import pytest
import torch
import torchvision

from configs import resnext50
from resnext_jax import convert
from resnext_jax.model.resnext import ResNeXt
from resnext_jax.data import pipeline
from resnext_jax.training import checkpoints, run_config, steps, trainer
from resnext_jax.training.reporting import INPUT_BOUND_SHARE, PHASES
from tests import helpers
from tests.helpers import TINY_MODEL, config_with, leaves, read_metrics, tiny_config


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  """One copy of the built-in dataset for the whole module (generated on first use)."""
  return str(tmp_path_factory.mktemp('shapes'))


def test_end_to_end_on_the_builtin_dataset(shapes_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  final = trainer.train_and_evaluate(tiny_config(shapes_dir), workdir)
  records = read_metrics(workdir)
  train = [r for r in records if 'train_loss' in r]
  evals = [r for r in records if 'eval_top1' in r]
  assert [r['step'] for r in train] == [2, 4, 6]
  assert all(np.isfinite(r['train_loss']) and r['learning_rate'] == pytest.approx(0.1 * 16 / 256)
             for r in train)
  assert [r['step'] for r in evals] == [3, 6]
  assert all(r['eval_count'] == 500 for r in evals)  # every validation image, once
  assert final == {k: v for k, v in evals[-1].items() if k != 'step'}
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '6']
  assert json.load(open(os.path.join(workdir, 'config.json')))['dataset'] == 'shapes'
  variables = checkpoints.load_variables(workdir)
  assert variables['params']['fc']['kernel'].shape == (64, 5)
  # Rerunning the finished run resumes at its end and does no more steps.
  trainer.train_and_evaluate(tiny_config(shapes_dir), workdir)
  assert [r['step'] for r in read_metrics(workdir)] == [r['step'] for r in records]


def test_resumed_run_equals_uninterrupted_run_bitwise(shapes_dir, tmp_path):
  whole = str(tmp_path / 'whole')
  trainer.train_and_evaluate(tiny_config(shapes_dir), whole)
  split = str(tmp_path / 'split')
  trainer.train_and_evaluate(tiny_config(shapes_dir, num_train_steps=3), split)
  trainer.train_and_evaluate(tiny_config(shapes_dir), split)  # resumes at step 3
  for a, b in zip(leaves(checkpoints.load_variables(whole)),
                  leaves(checkpoints.load_variables(split))):
    np.testing.assert_array_equal(a, b)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shapes_dir, tmp_path):
  workdir = str(tmp_path / 'diverged')
  config = tiny_config(shapes_dir, learning_rate=1e36, checkpoint_every_steps=1,
                       log_every_steps=100, num_train_steps=20)
  with pytest.raises(trainer.TrainingDivergedError,
                     match=r'loss became (nan|inf) at step \d+; stopping \(the last good '
                           r'checkpoint is step \d+'):
    trainer.train_and_evaluate(config, workdir)
  kept = checkpoints.load_variables(workdir)
  assert all(np.all(np.isfinite(x)) for x in leaves(kept))


def test_batch_size_that_does_not_divide_over_devices_is_refused(shapes_dir, tmp_path):
  with pytest.raises(ValueError, match=r'batch_size=12 does not divide over the 8 devices'):
    trainer.train_and_evaluate(tiny_config(shapes_dir, batch_size=12), str(tmp_path))


def test_resuming_with_another_model_says_what_to_do(shapes_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(tiny_config(shapes_dir, num_train_steps=1,
                                         checkpoint_every_steps=1), workdir)
  other = tiny_config(shapes_dir)
  other.model = dict(TINY_MODEL, width_per_group=4)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'does not fit this config.*new --workdir.* \d+ arrays differ'
                           r'(.|\n)*\n  params/layer1_0/conv2/kernel: checkpoint '
                           r'\(3, 3, 2, 8\), this config \(3, 3, 4, 16\)'):
    trainer.train_and_evaluate(other, workdir)


TORCHVISION_TINY = dict(stage_sizes=(1, 1, 1, 1), cardinality=4, width_per_group=4,
                        base_planes=64)


@pytest.fixture(scope='module')
def converted_torchvision(tmp_path_factory):
  """A torchvision ResNeXt (10 classes) converted into a variables directory."""
  torch.manual_seed(0)
  model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck,
                                           [1, 1, 1, 1], groups=4, width_per_group=4,
                                           num_classes=10)
  variables = convert.convert_state_dict(model.state_dict(),
                                         ResNeXt(num_classes=10, **TORCHVISION_TINY))
  directory = str(tmp_path_factory.mktemp('converted') / 'weights')
  checkpoints.save_variables(variables, directory, model_info={'arch': 'tiny'})
  return directory, variables


def test_finetune_from_converted_torchvision_weights_with_a_new_head(
    shapes_dir, tmp_path, converted_torchvision, caplog):
  directory, source = converted_torchvision
  config = tiny_config(shapes_dir, init_from=directory, learning_rate=0.0,
                       weight_decay=0.0, num_train_steps=2, image_size=32)
  config.model = TORCHVISION_TINY
  workdir = str(tmp_path / 'finetune')
  trainer.train_and_evaluate(config, workdir)
  assert 'Not loaded (re-initialised)' in caplog.text
  assert 'params/fc/kernel: checkpoint (2048, 10), this config (2048, 5)' in caplog.text
  assert 'params/fc/bias: checkpoint (10,), this config (5,)' in caplog.text
  tuned = checkpoints.load_variables(workdir)
  assert tuned['params']['fc']['kernel'].shape == (2048, 5)
  # With a zero learning rate the backbone is exactly the converted one.
  np.testing.assert_array_equal(tuned['params']['layer3_0']['conv2']['kernel'],
                                source['params']['layer3_0']['conv2']['kernel'])


def test_eval_only_evaluates_converted_weights(shapes_dir, tmp_path, converted_torchvision):
  directory, _ = converted_torchvision
  config = tiny_config(shapes_dir, init_from=directory, eval_only=True, image_size=32,
                       num_classes=10)
  config.model = TORCHVISION_TINY
  workdir = str(tmp_path / 'eval')
  metrics = trainer.train_and_evaluate(config, workdir)
  assert metrics['eval_count'] == 500
  assert read_metrics(workdir) == [{'step': 0, **metrics}]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '0'))


@pytest.mark.slow
def test_resnext50_config_runs_on_imagenet_prepared_by_tfds(tmp_path):
  synsets = helpers.imagenet_synsets()
  rng = np.random.default_rng(0)
  jpeg = lambda: helpers.encode_jpeg(rng.integers(0, 255, (40, 50, 3), np.uint8))
  manual = str(tmp_path / 'manual')
  helpers.write_imagenet_tars(manual, {s: [jpeg() for _ in range(4)] for s in synsets[:4]},
                                [jpeg() for _ in range(10)])
  config = resnext50.get_config()
  config.update(data_dir=str(tmp_path / 'tfds'), manual_dir=manual, image_size=32,
                batch_size=8, eval_batch_size=8, num_train_steps=2, log_every_steps=1)
  workdir = str(tmp_path / 'run')
  metrics = trainer.train_and_evaluate(config, workdir)
  assert metrics['eval_count'] == 10
  records = read_metrics(workdir)
  assert [r['step'] for r in records if 'train_loss' in r] == [1, 2]
  assert checkpoints.load_variables(workdir)['params']['fc']['kernel'].shape == (2048, 1000)


def test_registered_weights_are_evaluated_as_their_publisher_did():
  def resize_and_interpolation(**overrides):
    return run_config.eval_preprocessing(config_with(**overrides))

  tv2, ra = 'resnext50_32x4d.tv2_in1k', 'resnext50_32x4d.ra_in1k'
  assert resize_and_interpolation() == (256, 'bilinear')  # image_size 224 / 0.875
  assert resize_and_interpolation(init_from=tv2) == (256, 'bilinear')  # when training
  assert resize_and_interpolation(eval_only=True, init_from=tv2) == (232, 'bilinear')
  assert resize_and_interpolation(eval_only=True, init_from=ra) == (236, 'bicubic')  # 303/288
  assert resize_and_interpolation(eval_only=True, init_from=tv2, eval_resize_size=240,
                                  eval_interpolation='bicubic') == (240, 'bicubic')


def test_a_slow_input_pipeline_is_named_once_and_time_shares_are_logged(
    shapes_dir, tmp_path, monkeypatch, caplog):
  original = pipeline.TrainIterator.__next__

  def slow(self):
    time.sleep(0.25)  # a stuck disk or too few host cores
    return original(self)

  monkeypatch.setattr(pipeline.TrainIterator, '__next__', slow)
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.INFO):
    trainer.train_and_evaluate(tiny_config(shapes_dir, num_train_steps=8, log_every_steps=2,
                                           eval_every_steps=100, checkpoint_every_steps=100),
                               workdir)
  messages = [r.getMessage() for r in caplog.records]
  assert sum('The run is input-bound' in m for m in messages) == 1, messages
  progress = [m for m in messages if m.startswith('step ')]
  assert len(progress) == 4 and all(re.search(r'\| input \d+% step \d+% eval \d+% '
                                              r'checkpoint \d+%$', m) for m in progress)
  assert not any('train_loss=' in m for m in messages)  # no second copy of each write
  train = [r for r in read_metrics(workdir) if 'train_loss' in r]
  assert all(r['time_input'] > INPUT_BOUND_SHARE for r in train[1:])
  assert max(r['time_input'] for r in train) > 0.5
  assert all(0 < sum(r[f'time_{p}'] for p in PHASES) <= 1 + 1e-6 for r in train)
  evaluation = [m for m in messages if m.startswith('Evaluation at step 8')]
  assert evaluation and evaluation[0].endswith('eval_count 500')  # a count, not 500.0000


def test_a_run_that_waits_for_its_steps_is_not_called_input_bound(
    shapes_dir, tmp_path, monkeypatch, caplog):
  jit_steps = steps.jit_steps

  def slow_steps(*args, **kwargs):  # a step that takes longer than decoding a batch
    jitted = jit_steps(*args, **kwargs)
    return steps.JittedSteps(train=lambda *a: time.sleep(0.3) or jitted.train(*a),
                             eval=jitted.eval)

  monkeypatch.setattr(steps, 'jit_steps', slow_steps)
  workdir = str(tmp_path / 'run')
  with caplog.at_level(logging.WARNING):
    trainer.train_and_evaluate(tiny_config(shapes_dir, num_train_steps=8, log_every_steps=2,
                                           eval_every_steps=100, checkpoint_every_steps=100),
                               workdir)
  assert not any('input-bound' in r.getMessage() for r in caplog.records)
  train = [r for r in read_metrics(workdir) if 'train_loss' in r]
  assert all(r['time_step'] > 0.5 for r in train[1:])
