"""The convolutions of a ResNeXt, behind one function with swappable implementations.

ResNeXt's aggregated transformation is a grouped 3x3 convolution. XLA's grouped
convolution (`feature_group_count`) is correct everywhere but slow on some backends, so
every convolution in the model goes through `conv2d`, and the implementation is chosen by
name (`impl`). Every implementation takes the same HWIO kernel (the layout of
`flax.linen.Conv`), so the parameter tree never depends on the implementation: a
checkpoint written with one loads and runs with any other.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = Sequence[tuple[int, int]]


def _conv_xla(x, kernel, strides, padding, groups):
  """The reference: XLA's convolution with `feature_group_count`."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    'xla': _conv_xla,
}


def resolve_impl(impl: str) -> str:
  """Maps a requested implementation name to a concrete one."""
  if impl == 'auto':
    return 'xla'
  if impl not in IMPLEMENTATIONS:
    known = ', '.join(["'auto'"] + [repr(k) for k in IMPLEMENTATIONS])
    raise ValueError(f'Unknown conv_impl {impl!r}; choose one of {known}.')
  return impl


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0)), groups: int = 1,
           impl: str = 'auto') -> jax.Array:
  """2-D convolution of NHWC `x` with an HWIO `kernel` of `groups` groups.

  `kernel` has shape `[kh, kw, in_channels // groups, out_channels]`; padding is
  explicit (PyTorch style) so that results match PyTorch at every stride.
  """
  in_channels = x.shape[-1]
  if in_channels != kernel.shape[2] * groups:
    raise ValueError(
        f'conv2d: input has {in_channels} channels but the kernel {kernel.shape} '
        f'with {groups} groups expects {kernel.shape[2] * groups}.')
  fn = IMPLEMENTATIONS[resolve_impl(impl)]
  return fn(x, kernel, tuple(strides), tuple(tuple(p) for p in padding), groups)


class Conv2D(nn.Module):
  """A bias-free convolution with PyTorch padding (k // 2) and a chosen implementation."""
  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  impl: str = 'auto'
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.variance_scaling(
      2.0, 'fan_out', 'normal')

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    in_channels = x.shape[-1]
    if in_channels % self.groups:
      raise ValueError(f'{self.name}: {in_channels} input channels do not split into '
                       f'{self.groups} groups.')
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, in_channels // self.groups, self.features), jnp.float32)
    pad = k // 2
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype),
                  strides=(self.strides, self.strides), padding=((pad, pad), (pad, pad)),
                  groups=self.groups, impl=self.impl)
