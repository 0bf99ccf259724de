"""Grouped convolutions (ResNeXt's aggregated transformation) in XLA CPU's fast forms.

XLA's grouped convolution (`feature_group_count`) runs far below the machine's speed on
a CPU, and its weight gradient slowest of all. `grouped_conv` keeps the same math with a
`jax.custom_vjp` whose every part takes a faster form:
  - groups of at most `MAX_TAPS_GROUP_WIDTH` channels (the first three stages of a 32x4d
    ResNeXt) are sums over taps and group width of vectorised multiply-adds, added as
    balanced trees. The input gradient is the same kind of sum, one per output phase
    (position modulo the stride) so that no work goes into the zeros of a dilated
    gradient. The weight gradient loops over output rows in a `fori_loop`, accumulating
    outer products (groups of <= 8 channels) or per-row contractions over batch and
    columns (16);
  - wider groups keep XLA's forward and input gradient, and compute the weight gradient
    as a forward grouped convolution with the output gradient as the kernel;
  - the weights of every multiply-add are rearranged once, outside the sums
    (`_weights_by_group`);
  - with `native`, groups the C++ kernel takes (`kernels/cpu`) run there instead:
    forward pass, input gradient (as forward passes, one per phase) and weight gradient.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from resnext_jax.kernels.cpu import calls as cpu_calls
from resnext_jax.ops.primitives import (DIMENSIONS, conv_xla, output_size, strided_window,
                                        tree_sum)

# Widest group (input channels per group) that takes the multiply-add path: at 16
# channels it runs the forward pass and input gradient faster than XLA's convolution, at
# 32 slower (docs/performance.md).
MAX_TAPS_GROUP_WIDTH = 16


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
  fusing it into the multiply-adds, whose weight loads then become scattered (several
  times slower).
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
  outer products of `_outer_product_kernel_grad`; at 8 and fewer they are not
  (docs/performance.md). Summing the batch inside the loop keeps the accumulator small.
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
      dimension_numbers=DIMENSIONS, feature_group_count=groups,
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
    return cpu_calls.grouped_conv_forward(dy, sub_kernel, (1, 1),
                                          ((top, bottom), (left, right)), groups)

  return _input_grad_by_phase(x_shape, kernel.shape, strides, padding, dy.dtype, phase)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def grouped_conv(x, kernel, strides, padding, groups, native):
  if native and cpu_calls.supports(kernel.shape, groups):
    return cpu_calls.grouped_conv_forward(x, kernel, strides, padding, groups)
  if kernel.shape[2] <= MAX_TAPS_GROUP_WIDTH:
    return _taps_forward(x, kernel, strides, padding, groups)
  return conv_xla(x, kernel, strides, padding, groups)


def _grouped_conv_fwd(x, kernel, strides, padding, groups, native):
  return grouped_conv(x, kernel, strides, padding, groups, native), (x, kernel)


def _grouped_conv_bwd(strides, padding, groups, native, residuals, dy):
  x, kernel = residuals
  native = native and cpu_calls.supports(kernel.shape, groups)
  narrow = kernel.shape[2] <= MAX_TAPS_GROUP_WIDTH
  if native:
    dx = _native_input_grad(dy, kernel, x.shape, strides, padding, groups)
  elif narrow:
    dx = _taps_input_grad(dy, kernel, x.shape, strides, padding, groups)
  else:
    _, input_vjp = jax.vjp(lambda x: conv_xla(x, kernel, strides, padding, groups), x)
    dx, = input_vjp(dy)
  if native:
    dk = cpu_calls.grouped_conv_kernel_grad(x, dy, kernel.shape, strides, padding, groups)
  elif narrow:
    kernel_grad = (_outer_product_kernel_grad if kernel.shape[2] <= 8
                   else _row_contraction_kernel_grad)
    dk = kernel_grad(x, dy, kernel.shape, strides, padding, groups)
  else:
    dk = _swapped_kernel_grad(x, dy, kernel.shape, strides, padding, groups)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)
