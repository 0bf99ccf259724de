"""`conv2d`: every convolution of the model, by the implementation its caller resolved.

Every implementation takes the same HWIO kernel (the layout of `flax.linen.Conv`), so
the parameter tree never depends on the implementation: a checkpoint written with one
loads and runs with any other. The names and how `'auto'` picks one: `ops/impl.py`.

`'taps'` sends each kind of convolution to the form XLA's CPU backend runs fastest, with
a `jax.custom_vjp` wherever JAX's own derivative is slow there:
  - 1x1 convolutions (strided ones after a strided slice) are matmuls, and so are both
    their gradients (the kernel gradient as x^T dy, which needs no transposed copy);
  - grouped convolutions: `ops/grouped_conv.py`;
  - other convolutions (the 7x7 stem) keep XLA's forward, and compute the weight
    gradient as matmuls of input patches, a block of output rows at a time.
`'native'` is `'taps'` with the C++ kernels of `kernels/cpu` where they apply: the
grouped convolutions, the stem's weight gradient and (float32) forward pass, and the
weight gradients of the 1x1 convolutions of up to 512 x 512 channels.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax.kernels.cpu import calls as cpu_calls
from resnext_jax.ops import impl as impls
from resnext_jax.ops.grouped_conv import grouped_conv
from resnext_jax.ops.primitives import Padding, conv_xla, strided_window


def _im2col_kernel_grad(x, dy, kernel_shape, strides, padding):
  """Weight gradient of a dense convolution (the stem) as matmuls over row blocks.

  For each block of output rows, the input patches `[pixels, kh * kw * in]` are gathered
  and multiplied with the output gradient `[pixels, out]`; the block's patches fit in
  cache, the matmul is XLA's fast kind. XLA's own weight gradient of the 7x7 stem is a
  convolution with a 112x112 window, several times slower.
  """
  n = x.shape[0]
  kh, kw, in_channels, out_channels = kernel_shape
  ho, wo = dy.shape[1:3]
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  size = max(d for d in range(1, max(1, ho // 8) + 1) if ho % d == 0)

  def body(i, acc):
    slab = lax.dynamic_slice_in_dim(xp, sh * size * i, sh * (size - 1) + kh, axis=1)
    patches = jnp.stack([strided_window(slab, dh, dw, size, wo, sh, sw)
                         for dh in range(kh) for dw in range(kw)], axis=3)
    dy_block = lax.dynamic_slice_in_dim(dy, size * i, size, axis=1)
    return acc + lax.dot_general(
        patches.reshape(n * size * wo, -1), dy_block.reshape(n * size * wo, -1),
        (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  acc = jnp.zeros((kh * kw * in_channels, out_channels), jnp.float32)
  return lax.fori_loop(0, ho // size, body, acc).reshape(kernel_shape)


def _dense_forward(x, kernel, strides, padding, native):
  """A dense convolution's forward pass: for a stem (a square kernel larger than 1x1 over
  few channels) with 'native' and float32, the fused stem kernel with an identity norm
  (twice as fast as XLA's convolution here); else XLA's."""
  kh, kw = kernel.shape[:2]
  if (native and x.dtype == kernel.dtype == jnp.float32 and kh == kw > 1
      and cpu_calls.supports_stem_forward(kernel.shape)):
    out_channels = kernel.shape[-1]
    return cpu_calls.stem_conv_normalized(
        x, kernel, jnp.ones(out_channels, jnp.float32), jnp.zeros(out_channels, jnp.float32),
        strides=strides, padding=padding)
  return conv_xla(x, kernel, strides, padding, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_conv(x, kernel, strides, padding, native):
  return _dense_forward(x, kernel, strides, padding, native)


def _dense_conv_fwd(x, kernel, strides, padding, native):
  return _dense_conv(x, kernel, strides, padding, native), (x, kernel)


def _dense_conv_bwd(strides, padding, native, residuals, dy):
  """XLA's input gradient (unused for the stem, whose input is the image) and a fast
  weight gradient."""
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: conv_xla(x, kernel, strides, padding, 1), x)
  dx, = input_vjp(dy)
  if native and cpu_calls.supports_stem(kernel.shape):
    dk = cpu_calls.stem_conv_kernel_grad(x, dy, kernel.shape, strides, padding)
  else:
    dk = _im2col_kernel_grad(x, dy, kernel.shape, strides, padding)
  return dx, dk.astype(kernel.dtype)


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pointwise(x, kernel, strides, native):
  """A 1x1 convolution as a strided slice and a matmul (XLA CPU's fastest contraction)."""
  sh, sw = strides
  return lax.dot_general(x[:, ::sh, ::sw], kernel[0, 0], (((3,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel, strides, native):
  return _pointwise(x, kernel, strides, native), (x, kernel)


def _pointwise_bwd(strides, native, residuals, dy):
  """Both gradients as plain matmuls over the pixels; with 'native' and float32, the
  kernel gradient of the smaller layers by the C++ kernel instead.

  JAX's own transpose of the forward matmul computes the kernel gradient transposed
  (dy^T x, then a transpose), which XLA turns into a transposed copy of dy fused into
  its producer: far slower than the matmul itself. x^T dy needs no transpose at all.
  """
  x, kernel = residuals
  sh, sw = strides
  xs = x[:, ::sh, ::sw]
  if (native and x.dtype == dy.dtype == jnp.float32
      and cpu_calls.supports_pointwise_kernel_grad(kernel.shape)):
    dk = cpu_calls.pointwise_conv_kernel_grad(xs, dy)
  else:
    # Over one flattened pixel axis: with three contracting axes XLA canonicalizes the
    # matmul into a transposed copy again.
    dk = lax.dot_general(xs.reshape(-1, xs.shape[-1]), dy.reshape(-1, dy.shape[-1]),
                         (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  dxs = lax.dot_general(dy, kernel[0, 0], (((3,), (1,)), ((), ())))
  # Scatter back to the strided positions (a no-op at stride 1).
  n, h, w, _ = x.shape
  dx = lax.pad(dxs, jnp.zeros((), dxs.dtype),
               ((0, 0, 0), (0, h - (dxs.shape[1] - 1) * sh - 1, sh - 1),
                (0, w - (dxs.shape[2] - 1) * sw - 1, sw - 1), (0, 0, 0)))
  return dx.astype(x.dtype), dk[None, None].astype(kernel.dtype)


_pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)


def conv_taps(x, kernel, strides, padding, groups, native=False):
  """Dispatches each kind of convolution to its fast form (see the module docstring)."""
  kh, kw = kernel.shape[:2]
  if groups == 1 and kh == kw == 1 and all(p == (0, 0) for p in padding):
    return _pointwise(x, kernel, strides, native)
  if groups > 1:
    return grouped_conv(x, kernel, strides, padding, groups, native)
  return _dense_conv(x, kernel, strides, padding, native)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    'xla': conv_xla,
    'taps': conv_taps,
    'native': functools.partial(conv_taps, native=True),
}


def conv2d(x: jax.Array, kernel: jax.Array, *, strides: Sequence[int] = (1, 1),
           padding: Padding = ((0, 0), (0, 0)), groups: int = 1, impl: str) -> jax.Array:
  """2-D convolution of NHWC `x` with an HWIO `kernel` of `groups` groups.

  `kernel` has shape `[kh, kw, in_channels // groups, out_channels]`; padding is
  explicit (PyTorch style) so that results match PyTorch at every stride. `impl` is a
  concrete implementation name (`impl.resolve_impl`).
  """
  in_channels = x.shape[-1]
  if in_channels != kernel.shape[2] * groups:
    raise ValueError(
        f'conv2d: input has {in_channels} channels but the kernel {kernel.shape} '
        f'with {groups} groups expects {kernel.shape[2] * groups}.')
  fn = impls.select(IMPLEMENTATIONS, impl, 'conv2d')
  return fn(x, kernel, tuple(strides), tuple(tuple(p) for p in padding), groups)

