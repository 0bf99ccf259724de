"""The model a config describes, and its first variables: fresh from config.seed, or
loaded from config.init_from with a new head where the class count differs."""

import flax
import jax
import jax.numpy as jnp
from absl import logging
import numpy as np

from resnext_jax import pretrained
from resnext_jax.model.resnext import ResNeXt, create_model, init_variables
from resnext_jax.ops.impl import resolve_impl
from resnext_jax.training import checkpoints

HEAD_PREFIX = 'params/fc/'


def compute_dtype(name: str) -> str:
  """config.dtype resolved for this backend: 'auto' is bfloat16 on GPU and TPU, float32
  on CPU."""
  if name == 'auto':
    return 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"config.dtype={name!r}; use 'auto', 'float32' or 'bfloat16'.")
  return name


def build_model(config, num_classes: int) -> ResNeXt:
  """The configured ResNeXt, with `config.conv_impl` and `config.dtype` resolved for this
  backend."""
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()}
  return create_model(config.arch, num_classes=num_classes,
                      dtype=jnp.dtype(compute_dtype(config.dtype)),
                      conv_impl=resolve_impl(config.conv_impl),
                      zero_init_residual=config.zero_init_residual, **overrides)


def merge_pretrained(initial: dict, loaded: dict, source: str) -> tuple[dict, list[str]]:
  """Takes every variable from `loaded`, except a head it lacks or has in another shape.

  Returns the merged variables and a description of each variable that was not
  loaded. Any other difference (a missing, extra or reshaped backbone variable) means
  a different architecture and raises, naming the first mismatches.
  """
  flat_initial = flax.traverse_util.flatten_dict(initial, sep='/')
  flat_loaded = flax.traverse_util.flatten_dict(loaded, sep='/')
  differences = checkpoints.shape_mismatches(loaded, initial)
  head = {key for key in differences if key.startswith(HEAD_PREFIX) and key in flat_initial}
  mismatches = [line for key, line in differences.items() if key not in head]
  if mismatches:
    listed = '\n  '.join(mismatches[:8])
    raise ValueError(
        f'config.init_from={source} does not fit the configured model (config.arch / '
        f'config.model); {len(mismatches)} variables differ, first:\n  {listed}')
  merged = {key: value if key in head else np.asarray(flat_loaded[key], value.dtype)
            for key, value in flat_initial.items()}
  not_loaded = [line for key, line in differences.items() if key in head]
  return flax.traverse_util.unflatten_dict(merged, sep='/'), not_loaded


def initial_variables(config, model: ResNeXt, *, whole: bool = False) -> dict:
  """Fresh variables from config.seed, overlaid with config.init_from when set: a
  registered name, a URL, a PyTorch file or a directory (`pretrained.load_pretrained`).

  With `whole` (evaluation), a head of another class count is an error instead of being
  re-initialised.
  """
  variables = jax.device_get(
      init_variables(model, jax.random.PRNGKey(config.seed), config.image_size))
  if not config.init_from:
    return variables
  # A custom size (config.model) is converted as that model; a published one is detected.
  loaded, _ = pretrained.load_pretrained(config.init_from,
                                         arch=model if config.model else None,
                                         ema=config.init_from_ema)
  variables, not_loaded = merge_pretrained(variables, loaded, config.init_from)
  logging.info('Loaded %sweights from %s.', 'the moving average of the ' if
               config.init_from_ema else '', config.init_from)
  if not_loaded and whole:
    raise ValueError(
        f'config.init_from={config.init_from} has a head of another class count than this '
        f'dataset ({model.num_classes} classes):\n  ' + '\n  '.join(not_loaded) +
        '\nEvaluate it on a dataset with its classes, or finetune it first '
        '(config.eval_only=False).')
  if not_loaded:
    logging.warning('Not loaded (re-initialised) from %s:\n  %s', config.init_from,
                    '\n  '.join(not_loaded))
  return variables
