"""resnext_jax: ResNeXt in JAX/Flax, with weight import from PyTorch and a sharded trainer.

The public API is imported on first use, so that importing a submodule such as
`resnext_jax.host_memory` does not start JAX, NumPy or their thread pools (it must run
before them).
"""

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    'ARCHS': 'resnext_jax.model.resnext',
    'ResNeXt': 'resnext_jax.model.resnext',
    'create_model': 'resnext_jax.model.resnext',
    'init_variables': 'resnext_jax.model.resnext',
    'normalize_images': 'resnext_jax.model.resnext',
    'load_variables': 'resnext_jax.training.checkpoints',
    'load_pretrained': 'resnext_jax.pretrained',
    'Predictor': 'resnext_jax.predict',
}
__all__ = list(_EXPORTS)
__version__ = '0.1.0'


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
