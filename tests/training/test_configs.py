"""Every config file: documented, loadable, and made only of fields the trainer knows."""

import glob
import importlib.util
import os

import pytest

from resnext_jax.model.resnext import ARCHS
from resnext_jax.training import default_config, run_config
from tests.helpers import ROOT

CONFIG_DIR = os.path.join(ROOT, 'configs')
CONFIG_FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, '*.py')))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_documented_configs_exist():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {'quickstart.py', 'finetune.py', 'resnext50.py', 'resnext101_32x4d.py',
          'resnext101_32x8d.py', 'resnext152_32x4d.py', 'resnext50_tv2.py'} <= names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_is_documented_and_uses_known_fields(path):
  module = load(path)
  doc = module.__doc__ or ''
  assert 'Command:' in doc and f'--config=configs/{os.path.basename(path)}' in doc
  assert 'Expected' in doc and 'Cost' in doc
  config = module.get_config()
  assert set(config.keys()) == set(default_config.get_config().keys())
  assert config.arch in ARCHS


@pytest.mark.parametrize('name', ['resnext50', 'resnext101_32x4d', 'resnext101_32x8d',
                                  'resnext152_32x4d'])
def test_imagenet_configs_follow_the_mmcls_recipe(name):
  config = load(os.path.join(CONFIG_DIR, f'{name}.py')).get_config()
  assert (config.dataset, config.batch_size, config.image_size) == ('imagenet2012', 256, 224)
  assert (config.learning_rate, config.momentum, config.weight_decay) == (0.1, 0.9, 1e-4)
  assert (config.num_epochs, tuple(config.lr_boundaries)) == (100, (30, 60, 90))
  assert config.lr_schedule == 'step' and config.warmup_epochs == 0
  assert config.label_smoothing == 0 and config.weight_decay_on_bn_and_bias


def test_the_tv2_config_follows_torchvisions_v2_recipe():
  config = load(os.path.join(CONFIG_DIR, 'resnext50_tv2.py')).get_config()
  assert config.learning_rate * config.batch_size / 256 == 0.5 and config.batch_size == 1024
  assert (config.lr_schedule, config.warmup_epochs, config.num_epochs) == ('cosine', 5, 600)
  assert (config.weight_decay, config.weight_decay_on_bn_and_bias) == (2e-5, False)
  assert (config.label_smoothing, config.mixup_alpha, config.cutmix_alpha) == (0.1, 0.2, 1.0)
  assert (config.auto_augment, config.random_erasing) == ('trivial_augment_wide', 0.1)
  assert (config.ema_decay, config.ema_every_steps) == (0.99998, 32)
  assert (config.train_image_size, config.eval_resize_size, config.image_size) == (176, 232,
                                                                                   224)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_fits_1_2_4_and_8_devices(path):
  for devices in (1, 2, 4, 8):
    config = load(path).get_config()
    config.mesh_shape = (devices,)
    fitted, mesh = run_config.fit_to_devices(config)
    assert mesh.devices.size == devices
    assert fitted.eval_batch_size % devices == 0
    assert 0 <= fitted.eval_batch_size - config.eval_batch_size < devices
