"""The convolutions of a ResNeXt, behind one function with swappable implementations.

ResNeXt's aggregated transformation is a grouped 3x3 convolution. XLA's grouped
convolution (`feature_group_count`) is correct everywhere but slow on some backends, so
every convolution in the model goes through `conv2d`, and the implementation is chosen by
name (`impl`, the model's `conv_impl`). Every implementation takes the same HWIO kernel
(the layout of `flax.linen.Conv`), so the parameter tree never depends on the
implementation: a checkpoint written with one loads and runs with any other.

Implementations:

* `'xla'`: `lax.conv_general_dilated` everywhere, the reference.
* `'taps'`: each kind of convolution in the form XLA's CPU backend runs fastest, with a
  `jax.custom_vjp` wherever JAX's own derivative is slow there:
  - 1x1 convolutions (strided ones after a strided slice) are matmuls, and so are both
    their gradients (the kernel gradient as x^T dy, which needs no transposed copy);
  - grouped convolutions with groups of at most `MAX_TAPS_GROUP_WIDTH` channels (the
    first three stages of a 32x4d ResNeXt) are sums over taps and group width of
    vectorised multiply-adds, added as balanced trees. The input gradient is the same
    kind of sum, one per output phase (position modulo the stride) so that no work goes
    into the zeros of a dilated gradient. The weight gradient loops over output rows
    in a `fori_loop`, accumulating outer products (groups of <= 8 channels) or
    per-row contractions over batch and columns (16);
  - wider groups keep XLA's forward and input gradient, and compute the weight gradient
    as a forward grouped convolution with the output gradient as the kernel;
  - other convolutions (the 7x7 stem) keep XLA's forward, and compute the weight
    gradient as matmuls of input patches, a block of output rows at a time;
  - the weights of every multiply-add are rearranged once, outside the sums
    (`_weights_by_group`).
  The stem's max pool has a matching fast form (`pooling.py`).
* `'native'` (CPU only): `'taps'`, except that grouped convolutions with 4 (in pairs),
  8, 16 or 32 channels per group run in a C++ kernel (`cpu_kernels.py`, compiled on
  first use): the forward pass, the input gradient (as forward passes, one per phase)
  and the weight gradient; and so do the stem's weight gradient and, in float32, its
  forward pass (up to `cpu_kernels.MAX_STEM_CHANNELS` input channels, output channels
  in blocks of 16).
  In eval mode a 1x1 convolution, the batch norm after it, the shortcut added to it and
  its ReLU run as one C++ pass, and so do the stem and its norm and ReLU
  (`conv2d_normalized`, used by `Conv2D` when given the norm; float32, output channels
  in blocks of 16).
* `'auto'`: the implementation measured fastest on the default backend (`AUTO_IMPL`).

`AUTO_IMPL`, per backend (the numbers and the commands behind them: README, "Speed"):

| backend | choice | why |
|---------|--------|-----|
| cpu     | 'native' | ResNeXt-50 32x4d, batch 16, ratio to torchvision's step: train 1.00-1.07, eval 1.17-1.35; 'taps' 0.77 and 0.91; 'xla' train 0.03. 'taps' where the C++ kernel cannot be built |
| gpu     | 'xla'  | cuDNN's grouped convolutions: train step 1.37x (ResNeXt-50) and 1.32x (ResNeXt-101 32x8d) torchvision's on an H200, bf16, batch 128; 'taps' failed to compile there (benchmarks/gpu.sh) |
| tpu     | 'xla'  | not measured; XLA's TPU convolutions handle groups natively |
"""

import functools
import logging
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax import cpu_kernels

Padding = Sequence[tuple[int, int]]

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

# Widest group (input channels per group) that takes the multiply-add path. Measured on
# a 2-core CPU: at 16 channels it runs the forward and input gradient twice as fast as
# XLA's convolution; at 32 (7x7x1024, batch 16) its forward is 3.7x slower than XLA's
# and the layer's forward + gradients 2.7x slower than XLA's path with
# `_swapped_kernel_grad`.
MAX_TAPS_GROUP_WIDTH = 16

# Implementation that `'auto'` picks per backend (see the table in the module docstring).
AUTO_IMPL = {'cpu': 'native', 'gpu': 'xla', 'tpu': 'xla'}


def _conv_xla(x, kernel, strides, padding, groups):
  """The reference: XLA's convolution with `feature_group_count`."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=_DIMENSIONS, feature_group_count=groups)


def tree_sum(terms):
  """Sums a list of arrays pairwise, so that the adds form a tree of logarithmic depth.

  XLA keeps the association order of floating-point adds; a left-to-right chain of n
  adds is n dependent vector instructions, a tree only log2(n).
  """
  terms = list(terms)
  while len(terms) > 1:
    pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
    terms = pairs + terms[len(pairs) * 2:]
  return terms[0]


def output_size(size, k, stride, pad):
  return (size + pad[0] + pad[1] - k) // stride + 1


def strided_window(x, start_h, start_w, size_h, size_w, stride_h, stride_w):
  """x[:, start_h::stride_h, start_w::stride_w] with size_h x size_w positions."""
  n = x.shape[0]
  rest = x.shape[3:]
  return lax.slice(
      x, (0, start_h, start_w) + (0,) * len(rest),
      (n, start_h + stride_h * (size_h - 1) + 1, start_w + stride_w * (size_w - 1) + 1)
      + rest,
      (1, stride_h, stride_w) + (1,) * len(rest))


def _multiply_add(windows, weights):
  """sum_t sum_i windows[t][..., g, i] * weights[t][g, i, o], as `[n, h, w, g, o]` float32.

  `windows[t]` is `[n, h, w, groups, width_in]` and `weights[t]` is
  `[groups, width_in, width_out]`; the products of one group width fit the vector
  registers, so XLA fuses the sum into one loop over its output.
  """
  terms = []
  for window, weight in zip(windows, weights):
    window = window.astype(jnp.float32)
    weight = weight.astype(jnp.float32)
    for i in range(window.shape[-1]):
      terms.append(window[..., i:i + 1] * weight[:, i, :])
  return tree_sum(terms)


def _stored(fn, *args):
  """`fn(*args)`, computed once into a buffer of its own.

  XLA would otherwise fuse a multiply-add sum into every consumer (recomputing it for
  BatchNorm's backward pass, for example) and emit much slower code for the merged loop.
  A conditional on a runtime predicate, with `fn` in both branches, is a boundary XLA
  fuses across in neither direction, and the fusions inside its branches still run on
  all threads (a loop body's in-place update would run on one). `fn` should return the
  sum's own shape: a reshape at the root of its fusion makes XLA emit slow indexing.
  """
  probe = args[-1].reshape(-1)[0]
  return lax.cond(jnp.isfinite(probe), fn, fn, *args)


def _weights_by_group(kernel, groups, transpose=False):
  """HWIO kernel `[kh, kw, in, groups * out]` -> `[kh, kw, groups, in, out]`, materialised.

  With `transpose`, `[kh, kw, groups, out, in]` (for the input gradient). The optimization
  barrier keeps XLA from moving the transposition into the conditional of `_stored` and
  fusing it into the multiply-adds, whose weight loads then become scattered: measured
  2.5x slower for a 28x28x256 input gradient.
  """
  kh, kw, width_in, out_channels = kernel.shape
  k = kernel.reshape(kh, kw, width_in, groups, out_channels // groups).transpose(
      (0, 1, 3, 4, 2) if transpose else (0, 1, 3, 2, 4))
  return lax.optimization_barrier(k)


def _taps_forward(x, kernel, strides, padding, groups):
  """Grouped convolution as fused multiply-adds over taps and group width."""
  n, h, w, _ = x.shape
  kh, kw, width_in, out_channels = kernel.shape
  sh, sw = strides
  ho = output_size(h, kh, sh, padding[0])
  wo = output_size(w, kw, sw, padding[1])
  taps = [(dh, dw) for dh in range(kh) for dw in range(kw)]

  def compute(x, k):
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))).reshape(
        n, h + sum(padding[0]), w + sum(padding[1]), groups, width_in)
    return _multiply_add([strided_window(xp, dh, dw, ho, wo, sh, sw) for dh, dw in taps],
                         [k[dh, dw] for dh, dw in taps]).astype(x.dtype)

  return _stored(compute, x, _weights_by_group(kernel, groups)).reshape(
      n, ho, wo, out_channels)


def _input_grad_by_phase(x_shape, kernel_shape, strides, padding, dtype, phase):
  """An input gradient assembled from its phases (input position modulo the stride).

  Input row y = s*u + a receives output rows q = u + (a + pad - dh) / s through the taps
  dh with (a + pad - dh) divisible by s: per phase a stride-1 sum over those taps, with
  no work spent on the zeros of a dilated gradient. `phase(taps_h, taps_w, size)`
  computes one phase, `[n, *size, channels]`, from its (tap, output offset) pairs
  (offsets descending) for rows and columns.
  """
  n, h, w, channels = x_shape
  kh, kw = kernel_shape[:2]
  sh, sw = strides
  size = (-(-h // sh), -(-w // sw))

  def taps(a, stride, pad, k_size):
    return [(d, (a + pad - d) // stride) for d in range(k_size)
            if (a + pad - d) % stride == 0]

  def one_phase(a, b):
    taps_h, taps_w = taps(a, sh, padding[0][0], kh), taps(b, sw, padding[1][0], kw)
    if not taps_h or not taps_w:
      return jnp.zeros((n,) + size + (channels,), dtype)
    return phase(taps_h, taps_w, size)

  dx = jnp.stack([jnp.stack([one_phase(a, b) for b in range(sw)], axis=3)
                  for a in range(sh)], axis=2)  # [n, size_h, sh, size_w, sw, channels]
  return dx.reshape(n, size[0] * sh, size[1] * sw, channels)[:, :h, :w]


def _taps_input_grad(dy, kernel, x_shape, strides, padding, groups):
  """Input gradient of `_taps_forward`: per phase a multiply-add with in and out swapped."""
  n = x_shape[0]
  out_channels = kernel.shape[3]
  ho, wo = dy.shape[1:3]
  k_transposed = _weights_by_group(kernel, groups, transpose=True)

  def phase(taps_h, taps_w, size):
    # Pad dy so that every tap's window of phase positions stays inside.
    lo_h = max(0, -min(o for _, o in taps_h))
    hi_h = max(0, size[0] - 1 + max(o for _, o in taps_h) - (ho - 1))
    lo_w = max(0, -min(o for _, o in taps_w))
    hi_w = max(0, size[1] - 1 + max(o for _, o in taps_w) - (wo - 1))

    def compute(dy, k):
      dyp = jnp.pad(dy.reshape(n, ho, wo, groups, out_channels // groups),
                    ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0), (0, 0)))
      windows, weights = [], []
      for dh, oh in taps_h:
        for dw, ow in taps_w:
          windows.append(strided_window(dyp, oh + lo_h, ow + lo_w, size[0], size[1], 1, 1))
          weights.append(k[dh, dw])
      return _multiply_add(windows, weights)

    return _stored(compute, dy, k_transposed).reshape(n, size[0], size[1], -1)

  return _input_grad_by_phase(x_shape, kernel.shape, strides, padding, jnp.float32, phase)


def _kernel_grad_rows(x, dy, kernel_shape, strides, padding, groups):
  """What output row q's share of a narrow-group weight gradient reads, for a row loop.

  Returns `at(q) -> (columns, dy_row)`: `columns[dw]` is the padded input under kernel
  column dw for that row, `[n, kh, wo, groups, in]`, and `dy_row` the row's gradient,
  `[n, wo, groups, out]`.
  """
  n, h, w, _ = x.shape
  kh, kw, width_in, out_channels = kernel_shape
  wo = dy.shape[2]
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))).reshape(
      n, h + sum(padding[0]), w + sum(padding[1]), groups, width_in)
  dy = dy.reshape(dy.shape[:3] + (groups, out_channels // groups))

  def at(q):
    rows = lax.dynamic_slice_in_dim(xp, sh * q, kh, axis=1)
    columns = [lax.slice_in_dim(rows, dw, dw + sw * (wo - 1) + 1, sw, axis=2)
               for dw in range(kw)]
    return columns, lax.dynamic_index_in_dim(dy, q, axis=1, keepdims=False)

  return at


def _outer_product_kernel_grad(x, dy, kernel_shape, strides, padding, groups):
  """Weight gradient of a narrow-group (<= 8) convolution, one output row per iteration.

  Each iteration adds, for every tap row and column, the outer products of one output
  row's gradient with the matching input pixels, summed over the row as a tree: a fused
  loop whose accumulator stays in cache. The batch stays a dimension of the accumulator
  (summed at the end), so under a batch-sharded `jit` every device works on its shard.
  """
  n = x.shape[0]
  kh, kw, width_in, out_channels = kernel_shape
  ho, wo = dy.shape[1:3]
  rows_at = _kernel_grad_rows(x, dy, kernel_shape, strides, padding, groups)

  def body(q, accs):
    columns, dy_row = rows_at(q)
    dy_row = dy_row.astype(jnp.float32)
    new_accs = []
    for cols, acc in zip(columns, accs):
      cols = cols.astype(jnp.float32)
      terms = [cols[:, :, r, :, :, None] * dy_row[:, None, r, :, None, :]
               for r in range(wo)]
      new_accs.append(acc + tree_sum(terms))  # [n, kh, g, in, out]
    return tuple(new_accs)

  zeros = jnp.zeros((n, kh, groups, width_in, out_channels // groups), jnp.float32)
  accs = lax.fori_loop(0, ho, body, (zeros,) * kw)
  dk = jnp.stack([jnp.sum(acc, axis=0) for acc in accs], axis=1)  # [kh, kw, g, in, out]
  return dk.transpose(0, 1, 3, 2, 4).reshape(kernel_shape)


def _row_contraction_kernel_grad(x, dy, kernel_shape, strides, padding, groups):
  """Weight gradient of a 16-wide-group convolution, one output row per loop iteration.

  Each iteration contracts one output row's gradient with the matching input rows over
  batch and columns (an einsum per kernel column, which XLA runs as a batched matmul
  over groups). At 16 channels per group the matmuls are big enough to beat the
  outer products of `_outer_product_kernel_grad` (35 ms against 61 ms for 14x14x512 at
  batch 16); at 8 and fewer they are not (34 ms against 17 ms for 28x28x256). Summing the
  batch inside the loop keeps the accumulator small.
  """
  kh, kw, width_in, out_channels = kernel_shape
  rows_at = _kernel_grad_rows(x, dy, kernel_shape, strides, padding, groups)

  def body(q, acc):
    columns, dy_row = rows_at(q)
    per_column = [jnp.einsum('nkrgi,nrgo->kgio', cols, dy_row,
                             preferred_element_type=jnp.float32) for cols in columns]
    return acc + jnp.stack(per_column, axis=1)

  zeros = jnp.zeros((kh, kw, groups, width_in, out_channels // groups), jnp.float32)
  acc = lax.fori_loop(0, dy.shape[1], body, zeros)
  return acc.transpose(0, 1, 3, 2, 4).reshape(kernel_shape)


def _swapped_kernel_grad(x, dy, kernel_shape, strides, padding, groups):
  """Weight gradient of a wide-group convolution as one forward grouped convolution.

  dk[dh, dw, i, (g, o)] = sum_{n, q, r} x[n, s*q + dh, s*r + dw, (g, i)] dy[n, q, r, (g, o)]
  is a convolution whose batch is the group width i, whose features are (group, image)
  and whose kernel is dy (dilated by the stride): XLA runs it fast, unlike its own
  weight gradient of a grouped convolution.
  """
  n, h, w, _ = x.shape
  kh, kw, width_in, _ = kernel_shape
  ho, wo = dy.shape[1:3]
  sh, sw = strides
  lhs = x.reshape(n, h, w, groups, width_in).transpose(4, 1, 2, 3, 0).reshape(
      width_in, h, w, groups * n)
  rhs = dy.transpose(1, 2, 0, 3)  # [ho, wo, n, (g, o)]
  # Trim the high padding to what the last output position reads.
  pad_h = (padding[0][0], sh * (ho - 1) + kh - h - padding[0][0])
  pad_w = (padding[1][0], sw * (wo - 1) + kw - w - padding[1][0])
  dk = lax.conv_general_dilated(
      lhs, rhs, window_strides=(1, 1), padding=(pad_h, pad_w), rhs_dilation=strides,
      dimension_numbers=_DIMENSIONS, feature_group_count=groups,
      preferred_element_type=jnp.float32)  # [in, kh, kw, (g, o)]
  return dk.transpose(1, 2, 0, 3)


def _native_input_grad(dy, kernel, x_shape, strides, padding, groups):
  """Input gradient by the C++ forward kernel, a stride-1 convolution of dy per phase.

  A phase's taps, lowest tap first, read dy from the highest offset down: the
  convolution's kernel is those taps in reverse order (at stride 1, the flipped kernel),
  with input and output channels swapped within each group.
  """
  kh, kw, width, channels = kernel.shape
  ho, wo = dy.shape[1:3]
  swapped = kernel.reshape(kh, kw, width, groups, width).transpose(0, 1, 4, 3, 2).reshape(
      kh, kw, width, channels)

  def phase(taps_h, taps_w, size):
    sub_kernel = swapped[jnp.array([d for d, _ in taps_h[::-1]])][
        :, jnp.array([d for d, _ in taps_w[::-1]])]
    top, left = -taps_h[-1][1], -taps_w[-1][1]
    bottom = size[0] - 1 + len(taps_h) - ho - top
    right = size[1] - 1 + len(taps_w) - wo - left
    return cpu_kernels.grouped_conv_forward(dy, sub_kernel, (1, 1),
                                            ((top, bottom), (left, right)), groups)

  return _input_grad_by_phase(x_shape, kernel.shape, strides, padding, dy.dtype, phase)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _grouped_conv(x, kernel, strides, padding, groups, native):
  if native and cpu_kernels.supports(kernel.shape, groups):
    return cpu_kernels.grouped_conv_forward(x, kernel, strides, padding, groups)
  if kernel.shape[2] <= MAX_TAPS_GROUP_WIDTH:
    return _taps_forward(x, kernel, strides, padding, groups)
  return _conv_xla(x, kernel, strides, padding, groups)


def _grouped_conv_fwd(x, kernel, strides, padding, groups, native):
  return _grouped_conv(x, kernel, strides, padding, groups, native), (x, kernel)


def _grouped_conv_bwd(strides, padding, groups, native, residuals, dy):
  x, kernel = residuals
  native = native and cpu_kernels.supports(kernel.shape, groups)
  narrow = kernel.shape[2] <= MAX_TAPS_GROUP_WIDTH
  if native:
    dx = _native_input_grad(dy, kernel, x.shape, strides, padding, groups)
  elif narrow:
    dx = _taps_input_grad(dy, kernel, x.shape, strides, padding, groups)
  else:
    _, input_vjp = jax.vjp(lambda x: _conv_xla(x, kernel, strides, padding, groups), x)
    dx, = input_vjp(dy)
  if native:
    dk = cpu_kernels.grouped_conv_kernel_grad(x, dy, kernel.shape, strides, padding, groups)
  elif narrow:
    kernel_grad = (_outer_product_kernel_grad if kernel.shape[2] <= 8
                   else _row_contraction_kernel_grad)
    dk = kernel_grad(x, dy, kernel.shape, strides, padding, groups)
  else:
    dk = _swapped_kernel_grad(x, dy, kernel.shape, strides, padding, groups)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


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
      and cpu_kernels.supports_stem_forward(kernel.shape)):
    out_channels = kernel.shape[-1]
    return cpu_kernels.stem_conv_normalized(
        x, kernel, jnp.ones(out_channels, jnp.float32), jnp.zeros(out_channels, jnp.float32),
        strides=strides, padding=padding)
  return _conv_xla(x, kernel, strides, padding, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_conv(x, kernel, strides, padding, native):
  return _dense_forward(x, kernel, strides, padding, native)


def _dense_conv_fwd(x, kernel, strides, padding, native):
  return _dense_conv(x, kernel, strides, padding, native), (x, kernel)


def _dense_conv_bwd(strides, padding, native, residuals, dy):
  """XLA's input gradient (unused for the stem, whose input is the image) and a fast
  weight gradient."""
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _conv_xla(x, kernel, strides, padding, 1), x)
  dx, = input_vjp(dy)
  if native and cpu_kernels.supports_stem(kernel.shape):
    dk = cpu_kernels.stem_conv_kernel_grad(x, dy, kernel.shape, strides, padding)
  else:
    dk = _im2col_kernel_grad(x, dy, kernel.shape, strides, padding)
  return dx, dk.astype(kernel.dtype)


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pointwise(x, kernel, strides):
  """A 1x1 convolution as a strided slice and a matmul (XLA CPU's fastest contraction)."""
  sh, sw = strides
  return lax.dot_general(x[:, ::sh, ::sw], kernel[0, 0], (((3,), (0,)), ((), ())))


def _pointwise_fwd(x, kernel, strides):
  return _pointwise(x, kernel, strides), (x, kernel)


def _pointwise_bwd(strides, residuals, dy):
  """Both gradients as plain matmuls over the pixels.

  JAX's own transpose of the forward matmul computes the kernel gradient transposed
  (dy^T x, then a transpose), which XLA turns into a transposed copy of dy fused into
  its producer: far slower than the matmul itself. x^T dy needs no transpose at all.
  """
  x, kernel = residuals
  sh, sw = strides
  xs = x[:, ::sh, ::sw]
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


def _conv_taps(x, kernel, strides, padding, groups, native=False):
  """Dispatches each kind of convolution to its fast form (see the module docstring)."""
  kh, kw = kernel.shape[:2]
  if groups == 1 and kh == kw == 1 and all(p == (0, 0) for p in padding):
    return _pointwise(x, kernel, strides)
  if groups > 1:
    return _grouped_conv(x, kernel, strides, padding, groups, native)
  return _dense_conv(x, kernel, strides, padding, native)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    'xla': _conv_xla,
    'taps': _conv_taps,
    'native': functools.partial(_conv_taps, native=True),
}


@functools.cache
def _warn_native_unavailable():
  """Says once per process why 'auto' runs 'taps' on this CPU."""
  logging.warning("conv_impl 'auto' uses 'taps': the C++ kernel of 'native' %s.",
                  cpu_kernels.unavailable_reason())


def resolve_impl(impl: str) -> str:
  """Maps a requested implementation name to a concrete one ('auto': per backend)."""
  if impl == 'auto':
    impl = AUTO_IMPL.get(jax.default_backend(), 'xla')
    if impl == 'native' and cpu_kernels.unavailable_reason():
      _warn_native_unavailable()
      return 'taps'
    return impl
  if impl not in IMPLEMENTATIONS:
    known = ', '.join(["'auto'"] + [repr(k) for k in IMPLEMENTATIONS])
    raise ValueError(f'Unknown conv_impl {impl!r}; choose one of {known}.')
  if impl == 'native':
    if jax.default_backend() != 'cpu':
      raise ValueError(f"conv_impl 'native' runs on CPU only; this is a "
                       f"{jax.default_backend()} backend: use 'auto' or 'xla'.")
    reason = cpu_kernels.unavailable_reason()
    if reason:
      raise ValueError(f"conv_impl 'native' is unavailable here: its C++ kernel "
                       f"{reason}. Use 'taps' instead.")
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


def _normalized_reference(x, kernel, scale, offset, residual, strides, padding, relu):
  """What `_normalized_conv` computes, in the differentiable ops of 'native'."""
  y = _conv_taps(x, kernel, strides, padding, 1, native=True) * scale + offset
  if residual is not None:
    y = y + residual
  return jnp.maximum(y, 0) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _normalized_conv(x, kernel, scale, offset, residual, strides, padding, relu):
  """A convolution, its eval-mode batch norm (`* scale + offset`), a residual add and a
  ReLU in one pass of a C++ kernel: the 1x1 kernel, or the stem's."""
  if kernel.shape[:2] == (1, 1):
    return cpu_kernels.pointwise_conv(x, kernel, scale, offset, stride=strides[0],
                                      residual=residual, relu=relu)
  return cpu_kernels.stem_conv_normalized(x, kernel, scale, offset, strides=strides,
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
    if not cpu_kernels.supports_pointwise(kernel.shape):
      return 'a 1x1 convolution needs output channels in blocks of 16'
    return None
  if residual is not None:
    return 'only a 1x1 convolution takes a residual'
  if not cpu_kernels.supports_stem_forward(kernel.shape):
    return (f'a {kernel.shape[0]}x{kernel.shape[1]} convolution is fused only as a stem '
            f'(few input channels, outputs in blocks of 16)')
  return None


def fuses_normalization(x, kernel, strides, padding, groups, impl, residual=None) -> bool:
  """Whether `conv2d_normalized` runs for these arguments: 'native', float32, one group,
  and either a 1x1 kernel at equal strides without padding or a stem (few input
  channels; no residual)."""
  return (resolve_impl(impl) == 'native' and groups == 1 and
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
  def __call__(self, x: jax.Array, norm: nn.Module | None = None,
               residual: jax.Array | None = None, relu: bool = False) -> jax.Array:
    """`relu?(norm(conv(x)) + residual)`; each of the three is optional.

    `norm` is a `models.BatchNorm`. In eval mode (running statistics) a 1x1
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
    if (norm is not None and norm.use_running_average and fuses_normalization(
        x, kernel, strides, padding, self.groups, self.impl, residual)):
      scale, offset = norm.running_affine(self.features)
      return conv2d_normalized(x, kernel, scale, offset, strides=strides, padding=padding,
                               residual=residual, relu=relu)
    y = conv2d(x, kernel.astype(self.dtype), strides=strides, padding=padding,
               groups=self.groups, impl=self.impl)
    if norm is not None:
      y = norm(y)
    if residual is not None:
      y = y + residual
    return nn.relu(y) if relu else y
