"""resnext_jax: ResNeXt in JAX/Flax, with weight import from PyTorch and a sharded trainer.

The model API is imported on first use, so that importing a submodule such as
`resnext_jax.host_memory` does not start JAX, NumPy or their thread pools (it must run
before them).
"""

import importlib

__all__ = ['ARCHS', 'ResNeXt', 'create_model', 'init_variables', 'normalize_images']
__version__ = '0.1.0'


def __getattr__(name):
  if name in __all__:
    return getattr(importlib.import_module('resnext_jax.model.resnext'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
