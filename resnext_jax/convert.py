"""Import PyTorch ResNeXt weights (torchvision, timm, mmcls/mmpretrain) into Flax variables.

    python -m resnext_jax.convert --arch=resnext50_32x4d --input=FILE.pth --output=DIR

The layout is detected from the keys: torchvision and timm share flat names
(`layer1.0.conv2.weight`); mmcls/mmpretrain prefix the backbone with `backbone.` and name
the head `head.fc.*`, and may wrap everything in `{'state_dict': ..., 'meta': ...}`.
Every expected tensor must be present with the right shape and nothing may be left over,
otherwise nothing is converted and the error lists each problem. torch is imported only
to read `.pth`/`.pt` files.
"""

import argparse
import os
import re
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.model.resnext import ARCHS, ResNeXt, create_model
from resnext_jax.training import checkpoints
from resnext_jax.weights import registry

_MAX_LISTED = 10  # keys listed per kind of problem in an error message


class ConversionError(ValueError):
  """The weights do not fit the requested model; the message names every problem."""


def _torch_name(path: tuple[str, ...]) -> str:
  """The torchvision state-dict key of a Flax variable path (collection excluded)."""
  *modules, leaf = path
  names = []
  for module in modules:
    if m := re.fullmatch(r'layer(\d)_(\d+)', module):
      names += [f'layer{m[1]}', m[2]]
    elif module == 'downsample_conv':
      names += ['downsample', '0']
    elif module == 'downsample_bn':
      names += ['downsample', '1']
    else:
      names.append(module)
  torch_leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias',
                'mean': 'running_mean', 'var': 'running_var'}[leaf]
  return '.'.join(names + [torch_leaf])


def _to_flax_layout(key: str, array: np.ndarray) -> np.ndarray:
  """OIHW conv weights -> HWIO; Linear [out, in] -> Dense [in, out]."""
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if key == 'fc.weight':
    return array.T
  return array


def _to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any float dtype) or array-like as a float32/int numpy array."""
  if hasattr(value, 'detach'):  # a torch.Tensor; torch is not imported here
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  array = np.asarray(value)
  return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Unwraps mmcls checkpoints and maps every layout's keys to torchvision's names."""
  if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], Mapping):
    state_dict = state_dict['state_dict']
  keys = [k[len('module.'):] if k.startswith('module.') else k for k in state_dict]
  is_mmcls = any(k.startswith('backbone.') for k in keys)
  normalized = {}
  for key, value in zip(keys, state_dict.values()):
    if is_mmcls:
      if key.startswith('backbone.'):
        key = key[len('backbone.'):]
      elif key.startswith('head.fc.'):
        key = key[len('head.'):]
    normalized[key] = value
  return normalized


def describe_weights(state_dict: Mapping[str, Any]) -> str:
  """Which arch a (normalized) state dict looks like, in words, for error messages."""
  stage_sizes = []
  for stage in range(1, 5):
    blocks = {int(m[1]) for k in state_dict
              if (m := re.match(rf'layer{stage}\.(\d+)\.', k))}
    stage_sizes.append(len(blocks))
  conv2 = state_dict.get('layer1.0.conv2.weight')
  if conv2 is None or not all(stage_sizes):
    return 'not a ResNet/ResNeXt state dict (no layer1-4 blocks found)'
  mid, per_group = conv2.shape[0], conv2.shape[1]
  groups = mid // per_group
  width = mid // groups
  for name, (sizes, cardinality, width_per_group) in ARCHS.items():
    if (tuple(sizes), cardinality, width_per_group) == (tuple(stage_sizes), groups, width):
      return name
  return (f'a network with stage sizes {tuple(stage_sizes)} and {groups}x{width}d '
          'grouped convolutions, which is none of the known archs '
          f'({", ".join(ARCHS)})')


def _expected_torch_shapes(model: ResNeXt) -> dict[tuple[str, ...], tuple[int, ...]]:
  """PyTorch shape of every variable of `model`, keyed by Flax path (with collection)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 32, 32, 3)), train=False))
  expected = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
      flax_path = (collection,) + tuple(k.key for k in path)
      expected[flax_path] = _torch_shape(_torch_name(flax_path[1:]), leaf.shape)
  return expected


def _torch_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape that converts to `flax_shape`."""
  if len(flax_shape) == 4:
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if key == 'fc.weight':
    return tuple(reversed(flax_shape))
  return tuple(flax_shape)


def convert_state_dict(state_dict: Mapping[str, Any], arch: str | ResNeXt,
                       num_classes: int | None = None) -> dict:
  """PyTorch state dict -> Flax `{'params', 'batch_stats'}` of numpy float32 arrays.

  `arch` is a name from `ARCHS` or a `ResNeXt` module (for custom sizes; its
  `num_classes` is then used). Raises `ConversionError` naming every missing,
  unexpected or mis-shaped tensor, and the arch the weights look like, before
  converting anything.
  """
  if not isinstance(state_dict, Mapping):
    raise ConversionError('Expected a state dict (a mapping of names to tensors), got '
                          f'{type(state_dict).__name__}.')
  weights = {k: v for k, v in normalize_keys(state_dict).items()
             if not k.endswith('num_batches_tracked')}
  if isinstance(arch, ResNeXt):
    model, arch_name = arch, 'the given model'
  elif arch in ARCHS:
    if num_classes is None:
      fc = weights.get('fc.weight')
      num_classes = int(fc.shape[0]) if fc is not None else 1000
    model, arch_name = create_model(arch, num_classes=num_classes), arch
  else:
    raise ConversionError(f'Unknown arch {arch!r}; known archs: {", ".join(ARCHS)}.')

  expected = _expected_torch_shapes(model)
  missing, mismatched = [], []
  for path, shape in expected.items():
    key = _torch_name(path[1:])
    if key not in weights:
      missing.append(key)
    elif tuple(weights[key].shape) != shape:
      mismatched.append(f'{key}: checkpoint {tuple(weights[key].shape)}, '
                        f'{arch_name} expects {shape}')
  used = {_torch_name(path[1:]) for path in expected}
  unexpected = sorted((k for k in weights if k not in used), key=_natural_order)
  if missing or unexpected or mismatched:
    missing.sort(key=_natural_order)
    mismatched.sort(key=_natural_order)
    raise ConversionError(_mismatch_message(arch_name, model.num_classes, weights,
                                            missing, unexpected, mismatched))

  variables: dict = {'params': {}, 'batch_stats': {}}
  for path in expected:
    key = _torch_name(path[1:])
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = _to_flax_layout(key, _to_numpy(weights[key]))
  return variables


def _natural_order(key: str) -> list:
  """Sort key that puts `layer3.6` before `layer3.10`."""
  return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', key)]


def _listing(title: str, items: list[str]) -> str:
  shown = '\n'.join(f'    {item}' for item in items[:_MAX_LISTED])
  more = f'\n    ... and {len(items) - _MAX_LISTED} more' if len(items) > _MAX_LISTED else ''
  return f'  {title} ({len(items)}):\n{shown}{more}'


def _mismatch_message(arch, num_classes, weights, missing, unexpected, mismatched) -> str:
  lines = [f'The weights do not fit {arch} with {num_classes} classes.']
  looks_like = describe_weights(weights)
  if looks_like != arch:
    lines.append(f'  The weights look like {looks_like}.')
  if missing:
    lines.append(_listing('missing keys', missing))
  if unexpected:
    lines.append(_listing('unexpected keys', unexpected))
  if mismatched:
    lines.append(_listing('shape mismatches', mismatched))
  return '\n'.join(lines)


def read_torch_file(path: str) -> Mapping[str, Any]:
  """Reads a `.pth`/`.pt`/`.bin` (with torch, weights only) or `.safetensors` file."""
  if not os.path.isfile(path):
    raise ConversionError(f'Input file {path} does not exist.')
  if path.endswith('.safetensors'):
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ConversionError('Reading .safetensors needs the safetensors package: '
                            'pip install safetensors') from e
    try:
      return load_file(path)
    except Exception as e:  # safetensors raises its own error types
      raise ConversionError(f'{path} is not a readable safetensors file: {e}') from e
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConversionError('Reading PyTorch checkpoints needs torch: '
                          "pip install 'resnext_jax[torch]' (or pip install torch)") from e
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises pickle, zip and runtime errors here
    raise ConversionError(f'{path} is not a PyTorch checkpoint that can be read '
                          f'safely (weights only): {e}') from e
  if not isinstance(loaded, Mapping):
    raise ConversionError(f'{path} holds a {type(loaded).__name__}, not a state dict.')
  return loaded


def model_info(arch: str, variables: dict, source: str, **extra) -> dict[str, Any]:
  """The `model.json` of converted weights: arch, class count, source, and the ImageNet
  class names for a 1000-class head (every published ResNeXt's label order)."""
  num_classes = int(variables['params']['fc']['bias'].shape[0])
  info = {'arch': arch, 'num_classes': num_classes, 'source': str(source), **extra}
  if num_classes == 1000:
    info['class_names'] = list(registry.imagenet_class_names())
  return info


def convert_file(input_path: str, output_dir: str, arch: str,
                 num_classes: int | None = None, overwrite: bool = False) -> dict:
  """Converts a checkpoint file into a variables directory; returns the variables."""
  checkpoints.check_output_dir(output_dir, overwrite)  # before the slow part
  variables = convert_state_dict(read_torch_file(input_path), arch, num_classes)
  checkpoints.save_variables(variables, output_dir, overwrite=overwrite,
                             model_info=model_info(arch, variables, input_path))
  return variables


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m resnext_jax.convert',
      description='Convert torchvision/timm/mmcls ResNeXt weights into a resnext_jax '
                  'checkpoint directory.')
  parser.add_argument('--arch', required=True, choices=list(ARCHS))
  parser.add_argument('--input', required=True,
                      help='.pth/.pt/.bin (read with torch) or .safetensors file')
  parser.add_argument('--output', required=True, help='directory to write')
  parser.add_argument('--num_classes', type=int, default=None,
                      help='default: taken from the checkpoint head')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a non-empty output directory')
  args = parser.parse_args(argv)
  try:
    variables = convert_file(args.input, args.output, args.arch, args.num_classes,
                             args.overwrite)
  except (ConversionError, checkpoints.CheckpointError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  count = sum(a.size for a in jax.tree.leaves(variables['params']))
  print(f'Converted {args.input} ({args.arch}, {count:,} parameters) -> {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
