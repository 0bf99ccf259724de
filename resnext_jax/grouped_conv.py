"""The convolutions of a ResNeXt, behind one function with swappable implementations.

ResNeXt's aggregated transformation is a grouped 3x3 convolution. XLA's grouped
convolution (`feature_group_count`) is correct everywhere but slow on some backends, so
every convolution in the model goes through `conv2d`, and the implementation is chosen by
name (`impl`). Every implementation takes the same HWIO kernel (the layout of
`flax.linen.Conv`), so the parameter tree never depends on the implementation: a
checkpoint written with one loads and runs with any other.

Implementations:

* `'xla'`: `lax.conv_general_dilated` everywhere, the reference.
* `'taps'`: every convolution written as a sum over its kernel taps of per-tap channel
  contractions, in the forms XLA's CPU backend compiles well. 1x1 convolutions become
  matmuls (a strided 1x1 one, a strided slice and a matmul). Grouped convolutions with
  narrow groups (at most `MAX_TAPS_GROUP_WIDTH` channels, i.e. the first two stages of a
  32x4d ResNeXt) become fused multiply-adds over taps and group width, summed as balanced
  trees (a chain of dependent adds would leave the vector units waiting); their input
  gradient is the same kind of sum, split into one phase per output position modulo the
  stride so no work is spent on the zeros of a dilated gradient; and their weight
  gradient, which XLA computes very slowly, accumulates the outer products of one output
  row at a time in a `fori_loop`. Wider groups keep XLA's forward and input gradient,
  which are fast there, and compute the weight gradient as a forward grouped convolution
  of the input with the output gradient as its kernel. A `jax.custom_vjp` ties each
  grouped convolution's three parts together; everything else is differentiated by JAX.
* `'auto'`: the fastest measured implementation for the default backend (`AUTO_IMPL`).

Measurements behind `AUTO_IMPL` (ResNeXt-50 32x4d, batch 16 at 224; the commands and the
per-layer numbers are in benchmarks/README.md):

| backend | choice  | why |
|---------|---------|-----|
| cpu     | 'taps'  | train step many times faster than 'xla', and faster than torchvision |
| gpu     | 'xla'   | not measured yet (benchmarks/gpu.sh measures it); cuDNN is the default |
| tpu     | 'xla'   | not measured; XLA's TPU convolutions handle groups natively |
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = Sequence[tuple[int, int]]

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')

# Widest group (input channels per group) that the multiply-add path handles; wider
# groups have enough work per group for XLA's own convolution to be fast.
MAX_TAPS_GROUP_WIDTH = 8

# Implementation that `'auto'` picks per backend (see the table in the module docstring).
AUTO_IMPL = {'cpu': 'taps', 'gpu': 'xla', 'tpu': 'xla'}


def _conv_xla(x, kernel, strides, padding, groups):
  """The reference: XLA's convolution with `feature_group_count`."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=_DIMENSIONS, feature_group_count=groups)


def _tree_sum(terms):
  """Sums a list of arrays pairwise, so that the adds form a tree of logarithmic depth.

  XLA keeps the association order of floating-point adds; a left-to-right chain of n
  adds is n dependent vector instructions, a tree only log2(n).
  """
  terms = list(terms)
  while len(terms) > 1:
    pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
    terms = pairs + terms[len(pairs) * 2:]
  return terms[0]


def _output_size(size, k, stride, pad):
  return (size + pad[0] + pad[1] - k) // stride + 1


def _strided_window(x, start_h, start_w, size_h, size_w, stride_h, stride_w):
  """x[:, start_h::stride_h, start_w::stride_w] with size_h x size_w positions."""
  n = x.shape[0]
  rest = x.shape[3:]
  return lax.slice(
      x, (0, start_h, start_w) + (0,) * len(rest),
      (n, start_h + stride_h * (size_h - 1) + 1, start_w + stride_w * (size_w - 1) + 1)
      + rest,
      (1, stride_h, stride_w) + (1,) * len(rest))


def _multiply_add(windows, weights):
  """sum_t sum_i windows[t][..., g, i] * weights[t][g, i, o], as `[..., g, o]` float32.

  `windows[t]` is `[n, h, w, groups, width_in]` and `weights[t]` is
  `[groups, width_in, width_out]`; the products of one group width fit the vector
  registers, so XLA fuses the whole sum into one loop over the output.
  """
  terms = []
  for window, weight in zip(windows, weights):
    window = window.astype(jnp.float32)
    weight = weight.astype(jnp.float32)
    for i in range(window.shape[-1]):
      terms.append(window[..., i:i + 1] * weight[:, i, :])
  return _tree_sum(terms)


def _split_groups(kernel, groups):
  """HWIO kernel `[kh, kw, width_in, groups * width_out]` -> `[kh, kw, groups, in, out]`."""
  kh, kw, width_in, out_channels = kernel.shape
  return kernel.reshape(kh, kw, width_in, groups, out_channels // groups).transpose(
      0, 1, 3, 2, 4)


def _block_rows(rows: int) -> int:
  """Rows per iteration of `_loop_over_rows`: a divisor of `rows`, at least 4 iterations."""
  return max(d for d in range(1, max(1, rows // 4) + 1) if rows % d == 0)


def _loop_over_rows(block, rows):
  """Stacks `block(first_row, num_rows)` (`[n, num_rows, ...]`) over all rows in a loop.

  Computing the multiply-add sums block by block in a `fori_loop` keeps each one a
  fusion of its own whose output is stored: left in the open, XLA fuses such a sum into
  every consumer (recomputing it for BatchNorm's backward pass, for example) and emits
  much slower code for the merged loop.
  """
  size = _block_rows(rows)
  shape = jax.eval_shape(lambda: block(0, size))
  out = jnp.zeros(shape.shape[:1] + (rows,) + shape.shape[2:], shape.dtype)

  def body(i, out):
    return lax.dynamic_update_slice_in_dim(out, block(i * size, size), i * size, axis=1)

  return lax.fori_loop(0, rows // size, body, out)


def _taps_forward(x, kernel, strides, padding, groups):
  """Grouped convolution as fused multiply-adds over taps and group width."""
  n, h, w, _ = x.shape
  kh, kw, width_in, out_channels = kernel.shape
  sh, sw = strides
  ho = _output_size(h, kh, sh, padding[0])
  wo = _output_size(w, kw, sw, padding[1])
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))).reshape(
      n, h + sum(padding[0]), w + sum(padding[1]), groups, width_in)
  k = _split_groups(kernel, groups)

  def block(first, rows):
    slab = lax.dynamic_slice_in_dim(xp, sh * first, sh * (rows - 1) + kh, axis=1)
    windows = [_strided_window(slab, dh, dw, rows, wo, sh, sw)
               for dh in range(kh) for dw in range(kw)]
    return _multiply_add(windows, [k[dh, dw] for dh in range(kh) for dw in range(kw)])

  out = _loop_over_rows(block, ho)
  return out.reshape(n, ho, wo, out_channels).astype(x.dtype)


def _taps_input_grad(dy, kernel, x_shape, strides, padding, groups):
  """Input gradient of `_taps_forward`, one output phase (position mod stride) at a time.

  Input row y = s*u + a receives output rows q = u + (a + pad - dh) / s through the
  taps dh with (a + pad - dh) divisible by s: a stride-1 multiply-add per phase, with the
  kernel's in and out swapped, instead of a convolution of a zero-dilated gradient.
  """
  n, h, w, _ = x_shape
  kh, kw, width_in, out_channels = kernel.shape
  ho, wo = dy.shape[1:3]
  sh, sw = strides
  k = _split_groups(kernel, groups).swapaxes(-1, -2)  # [kh, kw, g, out, in]
  dy = dy.reshape(n, ho, wo, groups, out_channels // groups)
  phase_h, phase_w = -(-h // sh), -(-w // sw)

  def phase_taps(a, stride, pad, k_size):
    return [(d, (a + pad - d) // stride) for d in range(k_size)
            if (a + pad - d) % stride == 0]

  def phase(taps_h, taps_w):
    if not taps_h or not taps_w:
      return jnp.zeros((n, phase_h, phase_w, groups, width_in), jnp.float32)
    # Pad dy so that every tap's window of phase positions stays inside.
    lo_h = max(0, -min(o for _, o in taps_h))
    hi_h = max(0, phase_h - 1 + max(o for _, o in taps_h) - (ho - 1))
    lo_w = max(0, -min(o for _, o in taps_w))
    hi_w = max(0, phase_w - 1 + max(o for _, o in taps_w) - (wo - 1))
    dyp = jnp.pad(dy, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0), (0, 0)))
    span = max(o for _, o in taps_h) + lo_h

    def block(first, rows):
      slab = lax.dynamic_slice_in_dim(dyp, first, rows + span, axis=1)
      windows, weights = [], []
      for dh, oh in taps_h:
        for dw, ow in taps_w:
          windows.append(_strided_window(slab, oh + lo_h, ow + lo_w, rows, phase_w, 1, 1))
          weights.append(k[dh, dw])
      return _multiply_add(windows, weights)

    return _loop_over_rows(block, phase_h)

  dx = jnp.stack([
      jnp.stack([phase(phase_taps(a, sh, padding[0][0], kh),
                       phase_taps(b, sw, padding[1][0], kw)) for b in range(sw)], axis=3)
      for a in range(sh)], axis=2)  # [n, phase_h, sh, phase_w, sw, g, in]
  return dx.reshape(n, phase_h * sh, phase_w * sw, -1)[:, :h, :w]


def _taps_kernel_grad(x, dy, kernel_shape, strides, padding, groups):
  """Weight gradient of a narrow-group convolution, one output row per loop iteration.

  Each iteration adds, for every tap row and column, the outer products of one output
  row's gradient with the matching input pixels, summed over the row as a tree: a fused
  loop whose accumulator stays in cache. The batch stays a dimension of the accumulator
  (summed at the end), so under a batch-sharded `jit` every device works on its shard.
  """
  n, h, w, _ = x.shape
  kh, kw, width_in, out_channels = kernel_shape
  width_out = out_channels // groups
  ho, wo = dy.shape[1:3]
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0))).reshape(
      n, h + sum(padding[0]), w + sum(padding[1]), groups, width_in)
  dy = dy.reshape(n, ho, wo, groups, width_out)

  def body(q, accs):
    rows = lax.dynamic_slice_in_dim(xp, sh * q, kh, axis=1).astype(jnp.float32)
    dy_row = lax.dynamic_index_in_dim(dy, q, axis=1, keepdims=False).astype(jnp.float32)
    new_accs = []
    for dw, acc in zip(range(kw), accs):
      cols = lax.slice_in_dim(rows, dw, dw + sw * (wo - 1) + 1, sw, axis=2)
      terms = [cols[:, :, r, :, :, None] * dy_row[:, None, r, :, None, :]
               for r in range(wo)]
      new_accs.append(acc + _tree_sum(terms))  # [n, kh, g, in, out]
    return tuple(new_accs)

  zeros = jnp.zeros((n, kh, groups, width_in, width_out), jnp.float32)
  accs = lax.fori_loop(0, ho, body, (zeros,) * kw)
  dk = jnp.stack([jnp.sum(acc, axis=0) for acc in accs], axis=1)  # [kh, kw, g, in, out]
  return dk.transpose(0, 1, 3, 2, 4).reshape(kernel_shape)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _grouped_conv(x, kernel, strides, padding, groups):
  if kernel.shape[2] <= MAX_TAPS_GROUP_WIDTH:
    return _taps_forward(x, kernel, strides, padding, groups)
  return _conv_xla(x, kernel, strides, padding, groups)


def _grouped_conv_fwd(x, kernel, strides, padding, groups):
  return _grouped_conv(x, kernel, strides, padding, groups), (x, kernel)


def _grouped_conv_bwd(strides, padding, groups, residuals, dy):
  x, kernel = residuals
  if kernel.shape[2] <= MAX_TAPS_GROUP_WIDTH:
    dx = _taps_input_grad(dy, kernel, x.shape, strides, padding, groups)
    dk = _taps_kernel_grad(x, dy, kernel.shape, strides, padding, groups)
  else:
    _, input_vjp = jax.vjp(lambda x: _conv_xla(x, kernel, strides, padding, groups), x)
    dx, = input_vjp(dy)
    dk = _swapped_kernel_grad(x, dy, kernel.shape, strides, padding, groups)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)


def _pointwise(x, kernel, strides):
  """A 1x1 convolution as a strided slice and a matmul (XLA CPU's fastest contraction)."""
  sh, sw = strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw]
  return lax.dot_general(x, kernel[0, 0], (((3,), (0,)), ((), ())))


def _conv_taps(x, kernel, strides, padding, groups):
  """Dispatches each kind of convolution to its fast form (see the module docstring)."""
  kh, kw = kernel.shape[:2]
  if groups == 1 and kh == kw == 1 and all(p == (0, 0) for p in padding):
    return _pointwise(x, kernel, strides)
  if groups > 1:
    return _grouped_conv(x, kernel, strides, padding, groups)
  return _conv_xla(x, kernel, strides, padding, groups)


IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    'xla': _conv_xla,
    'taps': _conv_taps,
}


def resolve_impl(impl: str) -> str:
  """Maps a requested implementation name to a concrete one ('auto': per backend)."""
  if impl == 'auto':
    return AUTO_IMPL.get(jax.default_backend(), 'xla')
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
