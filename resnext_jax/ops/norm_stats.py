"""The per-channel sums of a training batch norm, each pair from one read of the tensor.

A training batch norm sums its input and the input's squares per channel (forward),
and, for the gradients of its scale and offset, the output gradient g and g * x
(backward). XLA's CPU backend reads the whole tensor once per sum; with
`conv_impl='native'` and float32 NHWC tensors both sums of a pair come from one pass of
a C++ kernel (`kernels/cpu/calls.channel_sums`). The backward pair also serves
gradients through an eval-mode norm (frozen statistics) that is not fused into its
convolution. The formulas are those of the plain form, `x * multiplier + offset` with
statistics from `mean(x)` and `mean(x * x)`; only the reductions run elsewhere.
"""

import jax
import jax.numpy as jnp

from resnext_jax.kernels.cpu import calls as cpu_calls


def uses_kernel(x: jax.Array, impl: str) -> bool:
  """Whether `moments` and `scale_and_shift` run the C++ sums: 'native', float32 NHWC."""
  return impl == 'native' and x.dtype == jnp.float32 and x.ndim == 4


@jax.custom_vjp
def _channel_moments(x):
  sums = cpu_calls.channel_sums(x)
  count = x.size // x.shape[-1]
  return sums[0] / count, sums[1] / count


def _channel_moments_fwd(x):
  return _channel_moments(x), x


def _channel_moments_bwd(x, cotangents):
  d_mean, d_mean_of_squares = cotangents
  count = x.size // x.shape[-1]
  return ((d_mean + 2 * x * d_mean_of_squares) / count,)


_channel_moments.defvjp(_channel_moments_fwd, _channel_moments_bwd)


@jax.custom_vjp
def _scale_and_shift(x, multiplier, offset):
  return x * multiplier + offset


def _scale_and_shift_fwd(x, multiplier, offset):
  return _scale_and_shift(x, multiplier, offset), (x, multiplier)


def _scale_and_shift_bwd(residuals, dy):
  x, multiplier = residuals
  sums = cpu_calls.channel_sums(dy, x)
  return dy * multiplier, sums[1], sums[0]


_scale_and_shift.defvjp(_scale_and_shift_fwd, _scale_and_shift_bwd)


def moments(x: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
  """Per-channel `(mean(x), mean(x * x))` over all but the last axis, float32."""
  if uses_kernel(x, impl):
    return _channel_moments(x)
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  return jnp.mean(xf, axes), jnp.mean(jnp.square(xf), axes)


def scale_and_shift(x: jax.Array, multiplier: jax.Array, offset: jax.Array,
                    impl: str) -> jax.Array:
  """`x * multiplier + offset` per channel, in `x`'s dtype."""
  if uses_kernel(x, impl):
    return _scale_and_shift(x, multiplier, offset)
  return x * multiplier.astype(x.dtype) + offset.astype(x.dtype)
