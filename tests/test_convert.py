"""Weight import: parity with torchvision's own models, mmcls layout, and clear errors."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision

from resnext_jax import convert
from resnext_jax.model import resnext
from resnext_jax.training import checkpoints
from tests.helpers import random_images, randomized, torch_logits

TINY = dict(stage_sizes=(1, 1, 1, 1), cardinality=4, width_per_group=4, num_classes=10)


def tiny_torchvision(seed: int = 0) -> torch.nn.Module:
  torch.manual_seed(seed)
  model = torchvision.models.resnet.ResNet(
      torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], groups=4, width_per_group=4,
      num_classes=10)
  return randomized(model, seed)


def converted_and_torchvision_logits(torch_model: torch.nn.Module, arch: str,
                                    image_size: int, conv_impl: str):
  """Eval logits of `torch_model` (random weights) and of our `arch` with its weights."""
  torch_model = randomized(torch_model)
  variables = convert.convert_state_dict(torch_model.state_dict(), arch)
  images = random_images(2, image_size)
  model = resnext.create_model(arch, conv_impl=conv_impl)
  return np.asarray(model.apply(variables, images)), torch_logits(torch_model, images)


def mmcls_checkpoint(state_dict: dict) -> dict:
  renamed = {('head.' + k if k.startswith('fc.') else 'backbone.' + k): v
             for k, v in state_dict.items()}
  return {'meta': {'epoch': 100}, 'state_dict': renamed}


@pytest.mark.slow
def test_resnext50_logits_match_torchvision():
  ours, theirs = converted_and_torchvision_logits(
      torchvision.models.resnext50_32x4d(), 'resnext50_32x4d', 224, conv_impl='xla')
  assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_tiny_logits_match_torchvision():
  torch_model = tiny_torchvision()
  model = resnext.ResNeXt(**TINY)
  variables = convert.convert_state_dict(torch_model.state_dict(), model)
  images = random_images(3, 64)
  ours = np.asarray(model.apply(variables, images))
  assert np.max(np.abs(ours - torch_logits(torch_model, images))) <= 1e-4


def test_mmcls_layout_converts_to_the_same_variables():
  state_dict = tiny_torchvision().state_dict()
  model = resnext.ResNeXt(**TINY)
  expected = convert.convert_state_dict(state_dict, model)
  got = convert.convert_state_dict(mmcls_checkpoint(state_dict), model)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  bare = mmcls_checkpoint(state_dict)['state_dict']  # mmcls without the wrapper
  jax.tree.map(np.testing.assert_array_equal,
               convert.convert_state_dict(bare, model), expected)


def test_train_mode_batch_statistics_match_pytorch():
  torch_model = tiny_torchvision()
  model = resnext.ResNeXt(**TINY)
  variables = convert.convert_state_dict(torch_model.state_dict(), model)
  images = random_images(4, 64, seed=1)
  _, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
  torch_model.train()
  with torch.no_grad():
    torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  expected = convert.convert_state_dict(torch_model.state_dict(), model)['batch_stats']
  for got_leaf, want_leaf in zip(jax.tree.leaves(updates['batch_stats']),
                                 jax.tree.leaves(expected)):
    np.testing.assert_allclose(got_leaf, want_leaf, atol=1e-5, rtol=1e-5)


def test_missing_and_unexpected_keys_are_named():
  state_dict = dict(tiny_torchvision().state_dict())
  del state_dict['layer2.0.conv2.weight']
  state_dict['layer5.0.conv1.weight'] = torch.zeros(1)
  with pytest.raises(convert.ConversionError) as error:
    convert.convert_state_dict(state_dict, resnext.ResNeXt(**TINY))
  message = str(error.value)
  assert 'missing keys (1)' in message and 'layer2.0.conv2.weight' in message
  assert 'unexpected keys (1)' in message and 'layer5.0.conv1.weight' in message


def test_shape_mismatch_names_key_and_both_shapes():
  state_dict = dict(tiny_torchvision().state_dict())
  state_dict['fc.weight'] = torch.zeros(10, 3)
  with pytest.raises(convert.ConversionError,
                     match=r'fc\.weight: checkpoint \(10, 3\), the given model expects '
                           r'\(10, 2048\)'):
    convert.convert_state_dict(state_dict, resnext.ResNeXt(**TINY))


def test_wrong_arch_says_which_arch_the_weights_look_like():
  with torch.device('meta'):  # shapes only: no memory, no time
    state_dict = torchvision.models.resnext101_32x8d().state_dict()
  with pytest.raises(convert.ConversionError) as error:
    convert.convert_state_dict(state_dict, 'resnext50_32x4d')
  message = str(error.value)
  assert 'do not fit resnext50_32x4d' in message
  assert 'look like resnext101_32x8d' in message
  assert 'unexpected keys (255)' in message and 'layer3.6.bn1.bias' in message
  assert 'layer1.0.conv2.weight: checkpoint (256, 8, 3, 3), resnext50_32x4d expects ' \
         '(128, 4, 3, 3)' in message


def test_plain_resnet50_is_recognised_and_others_are_none_of_the_archs():
  with torch.device('meta'):
    resnet50 = torchvision.models.resnet50().state_dict()
    resnet101 = torchvision.models.resnet101().state_dict()
  with pytest.raises(convert.ConversionError, match='look like resnet50'):
    convert.convert_state_dict(resnet50, 'resnext50_32x4d')
  with pytest.raises(convert.ConversionError, match=r'stage sizes \(3, 4, 23, 3\) and '
                                                    r'1x64d.*none of the known archs'):
    convert.convert_state_dict(resnet101, 'resnext50_32x4d')


def test_resnet50_logits_match_torchvision():
  ours, theirs = converted_and_torchvision_logits(
      torchvision.models.resnet50(), 'resnet50', 64, conv_impl='taps')
  # Its logits reach ~80 with these weights: float32 rounding relative to that scale.
  assert np.max(np.abs(ours - theirs)) <= 3e-5 * np.max(np.abs(theirs))


def test_unknown_arch_and_non_mapping_are_refused():
  with pytest.raises(convert.ConversionError, match='Unknown arch'):
    convert.convert_state_dict({}, 'resnet18')
  with pytest.raises(convert.ConversionError, match='Expected a state dict'):
    convert.convert_state_dict([1, 2], 'resnext50_32x4d')


@pytest.fixture(scope='module')
def resnext50_pth(tmp_path_factory):
  """A real torchvision resnext50_32x4d checkpoint file (random weights)."""
  path = tmp_path_factory.mktemp('weights') / 'resnext50.pth'
  torch.save(randomized(torchvision.models.resnext50_32x4d(), seed=3).state_dict(), path)
  return path


@pytest.mark.slow
def test_cli_writes_a_checkpoint_that_loads_back(resnext50_pth, tmp_path, capsys):
  out = tmp_path / 'converted'
  assert convert.main(['--arch=resnext50_32x4d', f'--input={resnext50_pth}',
                       f'--output={out}']) == 0
  assert '25,028,904 parameters' in capsys.readouterr().out
  loaded = checkpoints.load_variables(str(out))
  expected = convert.convert_state_dict(torch.load(resnext50_pth), 'resnext50_32x4d')
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  assert checkpoints.read_model_info(str(out))['arch'] == 'resnext50_32x4d'


def test_cli_reads_safetensors(tmp_path, capsys):
  from safetensors.torch import save_file
  torch_model = tiny_torchvision()
  path = tmp_path / 'tiny.safetensors'
  save_file({k: v.contiguous() for k, v in torch_model.state_dict().items()}, str(path))
  state_dict = convert.read_torch_file(str(path))
  variables = convert.convert_state_dict(state_dict, resnext.ResNeXt(**TINY))
  images = random_images(1, 64)
  ours = np.asarray(resnext.ResNeXt(**TINY).apply(variables, images))
  assert np.max(np.abs(ours - torch_logits(torch_model, images))) <= 1e-4


def test_cli_refuses_non_empty_output_unless_overwrite(tmp_path, capsys):
  path = tmp_path / 'tiny.pth'
  torch.save(tiny_torchvision().state_dict(), path)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('precious')
  # The tiny weights are not a published arch, so the error comes from the output check
  # only if that check runs first: it must, so a long conversion is not wasted.
  assert convert.main(['--arch=resnext50_32x4d', f'--input={path}', f'--output={out}']) == 2
  err = capsys.readouterr().err
  assert 'exists and is not empty' in err and '--overwrite' in err
  assert (out / 'keep.txt').read_text() == 'precious'


def test_cli_overwrite_replaces_the_output(resnext50_pth, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'stale.txt').write_text('old')
  assert convert.main(['--arch=resnext50_32x4d', f'--input={resnext50_pth}',
                       f'--output={out}', '--overwrite']) == 0
  assert not (out / 'stale.txt').exists()
  assert checkpoints.read_model_info(str(out))['num_classes'] == 1000


def test_cli_rejects_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
  path = tmp_path / 'notes.pth'
  path.write_bytes(b'this is not a checkpoint')
  out = tmp_path / 'out'
  assert convert.main(['--arch=resnext50_32x4d', f'--input={path}', f'--output={out}']) == 2
  assert 'is not a PyTorch checkpoint' in capsys.readouterr().err
  assert not out.exists()


def test_cli_mismatch_writes_nothing(tmp_path, capsys):
  path = tmp_path / 'tiny.pth'
  torch.save(tiny_torchvision().state_dict(), path)
  out = tmp_path / 'out'
  assert convert.main(['--arch=resnext50_32x4d', f'--input={path}', f'--output={out}']) == 2
  err = capsys.readouterr().err
  assert 'do not fit resnext50_32x4d' in err and 'look like a network with stage sizes' in err
  assert not out.exists() and os.listdir(tmp_path) == ['tiny.pth']


def test_cli_missing_input_file(tmp_path, capsys):
  assert convert.main(['--arch=resnext50_32x4d', f'--input={tmp_path}/nope.pth',
                       f'--output={tmp_path}/out']) == 2
  assert 'nope.pth does not exist' in capsys.readouterr().err


def test_load_variables_explains_a_wrong_path(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match='does not exist'):
    checkpoints.load_variables(str(tmp_path / 'missing'))
  with pytest.raises(checkpoints.CheckpointError, match='python -m resnext_jax.convert'):
    checkpoints.load_variables(str(tmp_path))


def test_importing_the_package_does_not_import_torch():
  code = ('import sys, resnext_jax, resnext_jax.convert, resnext_jax.training.checkpoints; '
          'assert "torch" not in sys.modules, "torch was imported"')
  subprocess.run([sys.executable, '-c', code], check=True)


def test_the_package_top_exports_the_public_api():
  import resnext_jax  # pylint: disable=g-import-not-at-top
  assert resnext_jax.load_variables is checkpoints.load_variables
  assert resnext_jax.create_model is resnext.create_model
  assert resnext_jax.normalize_images is resnext.normalize_images
  with pytest.raises(AttributeError, match='no attribute'):
    resnext_jax.no_such_name  # pylint: disable=pointless-statement
