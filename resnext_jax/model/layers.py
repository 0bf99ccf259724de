"""The model's layers: a convolution and a PyTorch-style batch norm, each running its ops
in the implementation the model resolved (`impl`, a name from `ops/impl.py`).

They live together because in eval mode `Conv2D` can apply the `BatchNorm` after it
itself (`ops/fused_eval.py`): it asks the norm for its running affine map.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax.ops import fused_eval, norm_stats
from resnext_jax.ops.conv import conv2d


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics.

  Flax's `nn.BatchNorm` updates the running variance with the biased batch variance;
  PyTorch uses the unbiased one. Converted weights and mmcls' recipe assume PyTorch's
  rule, so it is reproduced here. `momentum` follows Flax's convention
  (PyTorch momentum 0.1 == 0.9 here). Under a sharded `jit` the batch statistics are
  those of the global batch. `impl` is the model's `conv_impl`: with 'native' (float32
  NHWC inputs) the per-channel sums of the statistics and of the scale and offset
  gradients run in C++ (`ops/norm_stats.py`); like 'native''s convolutions, that form has
  reverse-mode gradients only (no `jax.jvp`, `vmap` or second order). The default,
  'xla', is plain JAX.
  """
  use_running_average: bool
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  impl: str = 'xla'

  @nn.compact
  def _variables(self, features: int):
    """Scale and bias (params), running mean and variance (batch_stats)."""
    scale = self.param('scale', self.scale_init, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    return scale, bias, running_mean, running_var

  def _affine(self, scale, bias, mean, var):
    multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
    return multiplier, bias - mean * multiplier

  def running_affine(self, features: int) -> tuple[jax.Array, jax.Array]:
    """(multiplier, offset) of the eval-mode norm, `x * multiplier + offset` (float32),
    for a convolution that applies it itself (`ops.fused_eval.conv2d_normalized`)."""
    scale, bias, running_mean, running_var = self._variables(features)
    return self._affine(scale, bias, running_mean.value, running_var.value)

  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale, bias, running_mean, running_var = self._variables(features)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      mean, mean_of_squares = norm_stats.moments(x, self.impl)
      var = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
      if not self.is_initializing():
        count = x.size // features
        unbiased_var = var * (count / max(count - 1, 1))
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * unbiased_var

    multiplier, offset = self._affine(scale, bias, mean, var)
    return norm_stats.scale_and_shift(x.astype(self.dtype), multiplier, offset, self.impl)


class Conv2D(nn.Module):
  """A bias-free convolution with PyTorch padding (k // 2); `impl` is a concrete
  implementation name (the model passes the one it resolved; 'xla' is the reference)."""
  features: int
  kernel_size: int
  strides: int = 1
  groups: int = 1
  impl: str = 'xla'
  dtype: Any = jnp.float32
  kernel_init: Callable[..., jax.Array] = nn.initializers.variance_scaling(
      2.0, 'fan_out', 'normal')

  @nn.compact
  def __call__(self, x: jax.Array, norm: nn.Module | None = None,
               residual: jax.Array | None = None, relu: bool = False) -> jax.Array:
    """`relu?(norm(conv(x)) + residual)`; each of the three is optional.

    `norm` is a `BatchNorm`. In eval mode (running statistics) a 1x1
    convolution or the stem and all that follows it run as one fused pass where the
    implementation has one (`fuses_normalization`); the result is the same either way.
    """
    k = self.kernel_size
    in_channels = x.shape[-1]
    if in_channels % self.groups:
      raise ValueError(f'{self.name}: {in_channels} input channels do not split into '
                       f'{self.groups} groups.')
    kernel = self.param('kernel', self.kernel_init,
                        (k, k, in_channels // self.groups, self.features), jnp.float32)
    pad = k // 2
    x = x.astype(self.dtype)
    strides, padding = (self.strides, self.strides), ((pad, pad), (pad, pad))
    if (norm is not None and norm.use_running_average and fused_eval.fuses_normalization(
        x, kernel, strides, padding, self.groups, self.impl, residual)):
      scale, offset = norm.running_affine(self.features)
      return fused_eval.conv2d_normalized(x, kernel, scale, offset, strides=strides,
                                          padding=padding, residual=residual, relu=relu)
    y = conv2d(x, kernel.astype(self.dtype), strides=strides, padding=padding,
               groups=self.groups, impl=self.impl)
    if norm is not None:
      y = norm(y)
    if residual is not None:
      y = y + residual
    return nn.relu(y) if relu else y
