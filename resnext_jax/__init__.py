"""resnext_jax: ResNeXt in JAX/Flax, with weight import from PyTorch and a sharded trainer."""

from resnext_jax.models import ARCHS, ResNeXt, create_model, init_variables, normalize_images

__all__ = ['ARCHS', 'ResNeXt', 'create_model', 'init_variables', 'normalize_images']
__version__ = '0.1.0'
