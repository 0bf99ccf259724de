"""An eval-mode convolution fused with its batch norm, shortcut add and ReLU (`'native'`).

In eval mode a batch norm is a fixed per-channel affine map, so the C++ kernels apply it,
the shortcut add and the ReLU to each tile of a 1x1 convolution's (or the stem's) outputs
while they are still in registers, where XLA would make the convolution and then further
passes over its output. `model/layers.Conv2D` calls `conv2d_normalized` whenever
`fuses_normalization` says it applies; the result is the same either way.
"""

import functools

import jax
import jax.numpy as jnp

from resnext_jax.kernels.cpu import calls as cpu_calls
from resnext_jax.ops.conv import conv_taps


def _normalized_reference(x, kernel, scale, offset, residual, strides, padding, relu):
  """What `_normalized_conv` computes, in the differentiable ops of 'native'."""
  y = conv_taps(x, kernel, strides, padding, 1, native=True) * scale + offset
  if residual is not None:
    y = y + residual
  return jnp.maximum(y, 0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _normalized_conv(x, kernel, scale, offset, residual, strides, padding, relu):
  """A convolution, its eval-mode batch norm (`* scale + offset`), a residual add and a
  ReLU in one pass of a C++ kernel: the 1x1 kernel, or the stem's."""
  if kernel.shape[:2] == (1, 1):
    return cpu_calls.pointwise_conv(x, kernel, scale, offset, stride=strides[0],
                                    residual=residual, relu=relu)
  return cpu_calls.stem_conv_normalized(x, kernel, scale, offset, strides=strides,
                                        padding=padding, relu=relu)


def _normalized_conv_fwd(x, kernel, scale, offset, residual, strides, padding, relu):
  return (_normalized_conv(x, kernel, scale, offset, residual, strides, padding, relu),
          (x, kernel, scale, offset, residual))


def _normalized_conv_bwd(strides, padding, relu, residuals, dy):
  """Gradients of the unfused form: eval-mode gradients are rare (e.g. frozen batch
  norms), so only the forward pass gets kernels of its own."""
  _, pullback = jax.vjp(
      lambda *a: _normalized_reference(*a, strides, padding, relu), *residuals)
  return pullback(dy)


_normalized_conv.defvjp(_normalized_conv_fwd, _normalized_conv_bwd)


def _normalization_fusable(x, kernel, strides, padding, residual) -> str | None:
  """None if a fused kernel takes these arguments; else why not."""
  if x.dtype != jnp.float32 or (residual is not None and residual.dtype != jnp.float32):
    return 'the fused kernels take float32 only'
  if kernel.shape[:2] == (1, 1):
    if strides[0] != strides[1] or any(p != (0, 0) for p in padding):
      return 'a 1x1 convolution needs equal strides and no padding'
    if not cpu_calls.supports_pointwise(kernel.shape):
      return 'a 1x1 convolution needs output channels in blocks of 16'
    return None
  if residual is not None:
    return 'only a 1x1 convolution takes a residual'
  if not cpu_calls.supports_stem_forward(kernel.shape):
    return (f'a {kernel.shape[0]}x{kernel.shape[1]} convolution is fused only as a stem '
            f'(few input channels, outputs in blocks of 16)')
  return None


def fuses_normalization(x, kernel, strides, padding, groups, impl, residual=None) -> bool:
  """Whether `conv2d_normalized` runs for these arguments: 'native', float32, one group,
  and either a 1x1 kernel at equal strides without padding or a stem (few input
  channels; no residual)."""
  return (impl == 'native' and groups == 1 and
          _normalization_fusable(x, kernel, tuple(strides),
                                 tuple(tuple(p) for p in padding), residual) is None)


def conv2d_normalized(x, kernel, scale, offset, *, strides, padding=((0, 0), (0, 0)),
                      residual=None, relu=False):
  """`relu?(conv(x, kernel) * scale + offset + residual)`, fused: an eval-mode conv +
  batch norm (+ shortcut) (+ ReLU) as one pass over the output, where XLA would make a
  convolution and then further passes. Needs 'native''s kernels (`fuses_normalization`
  says when it runs); float32 in and out."""
  strides, padding = tuple(strides), tuple(tuple(p) for p in padding)
  reason = _normalization_fusable(x, kernel, strides, padding, residual)
  if reason:
    raise ValueError(f'conv2d_normalized: {reason} (x {x.shape} {x.dtype}, kernel '
                     f'{kernel.shape}, strides {strides}, padding {padding}); use conv2d '
                     f'and apply the norm separately.')
  return _normalized_conv(x, kernel, scale, offset, residual, strides, padding, relu)

