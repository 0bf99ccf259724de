"""The C++ kernels of `conv_impl='native'` as JAX ops, split over a batch-sharded mesh.

* `grouped_conv.cc`: the grouped convolution and its weight gradient. XLA's grouped
  convolution, and every formulation of it in XLA ops that we tried, leaves the vector
  units mostly idle on the 4- to 32-wide groups of a ResNeXt; the kernel keeps a block
  of outputs in registers.
* `stem_conv.cc`: the weight gradient of the stem (a dense convolution of few input
  channels), which XLA ran at a fraction of the machine's speed; and its forward pass
  with the batch norm and ReLU applied in registers.
* `pointwise_conv.cc`: a 1x1 convolution with its eval-mode batch norm, residual add
  and ReLU applied before its outputs leave the registers, where XLA makes separate
  passes over the output for them. (`conv_tile.h`: the register tile both share.)
* `pointwise_kernel_grad.cc`: the weight gradient of a 1x1 convolution (a sum over the
  pixels of x^T dy), which XLA runs as a plain dot at half to three quarters of its
  matmuls' speed on the layers of a ResNeXt's first two stages.
* `channel_sums.cc`: the two per-channel sums of a training batch norm (forward: of x
  and x * x; backward: of g and g * x) from one read, where XLA reads the tensor once
  per sum.

Each call compiles and registers the kernels on first use (`build.py`) and raises if
they are unavailable; the `supports*` functions say which shapes each kernel takes.
"""

import jax
from jax.experimental.custom_partitioning import custom_partitioning
import jax.numpy as jnp
import numpy as np

from resnext_jax.kernels.cpu import build

# Group widths (input = output channels per group) that the kernel is compiled for on its
# own; 4-wide groups run two or four to a vector (`groups_per_vector`).
WIDTHS = (8, 16, 32)


def supports(kernel_shape, groups: int) -> bool:
  """Whether the kernel handles an HWIO kernel of `groups` groups (any batch, size, stride).

  4-wide groups need an even number of groups: they run two or four to a vector
  (`groups_per_vector`).
  """
  _, _, width_in, out_channels = kernel_shape
  shared = width_in == 4 and groups % 2 == 0
  return (groups > 1 and (width_in in WIDTHS or shared)
          and out_channels == groups * width_in)


def groups_per_vector(width: int, groups: int) -> int:
  """How many groups the kernels run interleaved in one vector: as many as fill
  the build's widest vector (8 floats with AVX2, 16 with AVX-512), else fewer that
  divide `groups`; 1 for groups as wide as a vector."""
  per_vector = max(1, build.instruction_set().vector_bits // 32 // width)
  while groups % per_vector:
    per_vector //= 2
  return per_vector


def _group_block():
  """Output channels per weight block of one group: two of the build's widest vectors
  (kGroupBlock in grouped_conv.cc; 16 with AVX2, 32 with AVX-512)."""
  return build.instruction_set().vector_bits // 16


def _arranged(kernel, groups):
  """HWIO `[kh, kw, width, groups * width]` -> the forward kernel's blocks,
  `[groups / g, width / co, kh, kw, width, co * g]` for g = `groups_per_vector` (lane
  co * g + group, the groups interleaved), co output channels per block."""
  kh, kw, width, _ = kernel.shape
  per_vector = groups_per_vector(width, groups)
  if per_vector > 1:
    k = kernel.reshape(kh, kw, width, groups // per_vector, per_vector, width)
    return k.transpose(3, 0, 1, 2, 5, 4).reshape(
        groups // per_vector, 1, kh, kw, width, width * per_vector)
  co = min(width, _group_block())
  return kernel.reshape(kh, kw, width, groups, width // co, co).transpose(3, 4, 0, 1, 2, 5)


def _require():
  reason = build.unavailable_reason()  # compiles and registers the kernels on first use
  if reason:
    raise RuntimeError(f'The C++ convolutions {reason}.')


def _split_over_batch(call, batched, sums_over_batch, rule, reduced=()):
  """`call(*arrays)` as an op that XLA's SPMD partitioner splits along a sharded leading
  (batch) axis of its first operand.

  Each device runs the C++ kernel on its own images (`batched` says which operands carry
  the batch), and a weight gradient (`sums_over_batch`) is then summed over the devices.
  Left to itself XLA would gather the whole batch onto every device for the custom call,
  and every device would repeat all the work. `rule` is the op's Shardy sharding rule,
  `reduced` its factors that the result sums over.
  """
  op = custom_partitioning(call)

  def shardings(mesh, arg_shapes):
    sharding = arg_shapes[0].sharding
    spec = getattr(sharding, 'spec', None)
    axis = spec[0] if spec else None  # mesh axis (or axes) of the batch, if any
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    args = tuple(by_batch if b else replicated for b in batched)
    return axis, args, replicated if sums_over_batch else by_batch

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    axis, args, result = shardings(mesh, arg_shapes)
    if sums_over_batch and axis is not None:
      return mesh, lambda *a: jax.lax.psum(call(*a), axis), result, args
    return mesh, call, result, args

  def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
    del result_shape
    return shardings(mesh, arg_shapes)[2]

  op.def_partition(partition, infer_sharding_from_operands=infer_sharding_from_operands,
                   sharding_rule=rule, reduction_factors=reduced)
  return op


def _output_size(x_shape, kernel_shape, strides, padding):
  """(Ho, Wo) of a convolution of NHWC `x_shape` with an HWIO kernel, explicit padding."""
  (top, bottom), (left, right) = padding
  return ((x_shape[1] + top + bottom - kernel_shape[0]) // strides[0] + 1,
          (x_shape[2] + left + right - kernel_shape[1]) // strides[1] + 1)


def _attributes(strides, padding):
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(padding[0][0]), pad_left=np.int64(padding[1][0]))


def grouped_conv_forward(x, kernel, strides, padding, groups):
  """The grouped convolution of NHWC `x` and HWIO `kernel` by the C++ kernel, in float32.

  `padding` is explicit ((top, bottom), (left, right)); the result has `x`'s dtype.
  """
  _require()
  channels = x.shape[-1]
  ho, wo = _output_size(x.shape, kernel.shape, strides, padding)

  def call(x, k):  # on a device's share of the batch, once split
    result = jax.ShapeDtypeStruct((x.shape[0], ho, wo, channels), jnp.float32)
    return jax.ffi.ffi_call(build.FORWARD_TARGET, result)(
        x, k, **_attributes(strides, padding))

  forward = _split_over_batch(call, batched=(True, False), sums_over_batch=False,
                              rule='n h w c, g b kh kw i o -> n p q c')
  y = forward(x.astype(jnp.float32), _arranged(kernel.astype(jnp.float32), groups))
  return y.astype(x.dtype)


def grouped_conv_kernel_grad(x, dy, kernel_shape, strides, padding, groups):
  """Weight gradient (HWIO, float32) of `grouped_conv_forward` for output gradient `dy`."""
  _require()
  kh, kw, width, out_channels = kernel_shape
  per_vector = groups_per_vector(width, groups)
  tuples = groups // per_vector
  call = jax.ffi.ffi_call(build.KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct(
      (tuples, kh, kw, width, width * per_vector), jnp.float32))
  kernel_grad = _split_over_batch(
      lambda x, dy: call(x, dy, **_attributes(strides, padding)), batched=(True, True),
      sums_over_batch=True, rule='n h w c, n p q c -> g kh kw i o', reduced=('n',))
  dk = kernel_grad(x.astype(jnp.float32), dy.astype(jnp.float32))
  # [tuples, kh, kw, in, out, per_vector] (groups interleaved) -> [kh, kw, in, groups * out]
  dk = dk.reshape(tuples, kh, kw, width, width, per_vector)
  return dk.transpose(1, 2, 3, 0, 5, 4).reshape(kh, kw, width, out_channels)


# Most input channels the stem kernel takes. It reads kw * channels consecutive inputs per
# tap row, which suits an image's few channels; on ResNet-50's dense 3x3 convs (64-512
# channels) it made the train step slower than XLA's matmul form.
MAX_STEM_CHANNELS = 4


def supports_stem(kernel_shape) -> bool:
  """Whether the stem's weight gradient kernel handles a dense HWIO kernel: an image's
  few input channels, outputs in blocks of 16."""
  return kernel_shape[2] <= MAX_STEM_CHANNELS and kernel_shape[3] % 16 == 0


# Most weights per output channel of the stem's eval forward kernel: it packs them as one
# block of input channels (kDepthBlock in conv_tile.h).
MAX_STEM_FORWARD_WEIGHTS = 256


def supports_stem_forward(kernel_shape) -> bool:
  """Whether the stem's fused eval forward kernel handles a dense HWIO kernel: as
  `supports_stem`, with at most `MAX_STEM_FORWARD_WEIGHTS` per output channel."""
  kh, kw, channels, _ = kernel_shape
  return supports_stem(kernel_shape) and 0 < kh * kw * channels <= MAX_STEM_FORWARD_WEIGHTS


def stem_conv_normalized(x, kernel, scale, offset, *, strides, padding, relu=False):
  """`relu?(conv(x, kernel) * scale + offset)` in one C++ pass, float32: the stem's
  convolution (HWIO `kernel`, few input channels) and its eval-mode batch norm."""
  _require()
  out_channels = kernel.shape[-1]
  ho, wo = _output_size(x.shape, kernel.shape, strides, padding)

  def call(x, k, scale, offset):
    result = jax.ShapeDtypeStruct((x.shape[0], ho, wo, out_channels), jnp.float32)
    return jax.ffi.ffi_call(build.STEM_NORMALIZED_TARGET, result)(
        x, k, scale, offset, relu=bool(relu), **_attributes(strides, padding))

  fused = _split_over_batch(call, batched=(True, False, False, False),
                            sums_over_batch=False, rule='n h w c, kh kw i o, o, o -> n p q o')
  return fused(*(a.astype(jnp.float32) for a in (x, kernel, scale, offset)))


def stem_conv_kernel_grad(x, dy, kernel_shape, strides, padding):
  """Weight gradient (HWIO, float32) of the dense convolution of NHWC `x` with a kernel of
  `kernel_shape` (HWIO), for output gradient `dy`; meant for few input channels."""
  _require()
  call = jax.ffi.ffi_call(build.STEM_KERNEL_GRAD_TARGET,
                          jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32))
  kernel_grad = _split_over_batch(
      lambda x, dy: call(x, dy, **_attributes(strides, padding)), batched=(True, True),
      sums_over_batch=True, rule='n h w c, n p q o -> kh kw i o2', reduced=('n',))
  return kernel_grad(x.astype(jnp.float32), dy.astype(jnp.float32))


def supports_pointwise(kernel_shape) -> bool:
  """Whether the fused 1x1 kernel handles an HWIO kernel: 1x1, some input channels,
  outputs in blocks of 16."""
  return (tuple(kernel_shape[:2]) == (1, 1) and kernel_shape[2] > 0
          and kernel_shape[3] % 16 == 0)


def pointwise_conv(x, kernel, scale, offset, *, stride=1, residual=None, relu=False):
  """`relu?(conv1x1(x, kernel, stride) * scale + offset + residual)` in one C++ pass,
  float32: a 1x1 convolution (HWIO `kernel`) and its eval-mode batch norm."""
  _require()
  n, h, w, _ = x.shape
  out_channels = kernel.shape[-1]
  shape = (n, -(-h // stride), -(-w // stride), out_channels)
  if residual is not None and residual.shape != shape:
    raise ValueError(f'residual of shape {residual.shape}; the convolution gives {shape}')
  with_residual = residual is not None

  def call(x, k, scale, offset, *maybe_residual):
    result = jax.ShapeDtypeStruct((x.shape[0], *shape[1:]), jnp.float32)
    empty = jnp.zeros((0,), jnp.float32)
    return jax.ffi.ffi_call(build.POINTWISE_TARGET, result)(
        x, k, scale, offset, *(maybe_residual or (empty,)), stride=np.int64(stride),
        relu=bool(relu))

  operands = [x, kernel.reshape(kernel.shape[-2:]), scale, offset]
  rule = 'n h w c, c o, o, o'
  if with_residual:
    operands.append(residual)
    rule += ', n p q o'
  fused = _split_over_batch(call, batched=(True, False, False, False) + (True,) * with_residual,
                            sums_over_batch=False, rule=rule + ' -> n p q o')
  return fused(*(a.astype(jnp.float32) for a in operands))


# Most weights (input x output channels) of a 1x1 convolution whose weight gradient the
# kernel computes: each work item sums into its own copy of the gradient, which should
# stay in L2. Up to 512 x 512 (a ResNeXt's first two stages) it ran 1.1-1.7x as fast as
# XLA's dot; on the 1024- and 2048-channel layers of the last two stages, 0.6-1.0x.
MAX_POINTWISE_GRAD_WEIGHTS = 512 * 512


def supports_pointwise_kernel_grad(kernel_shape) -> bool:
  """Whether the 1x1 weight gradient kernel takes an HWIO kernel: 1x1, outputs in blocks
  of 16, at most `MAX_POINTWISE_GRAD_WEIGHTS` weights."""
  kh, kw, channels, out_channels = kernel_shape
  return ((kh, kw) == (1, 1) and out_channels % 16 == 0
          and 0 < channels * out_channels <= MAX_POINTWISE_GRAD_WEIGHTS)


def pointwise_conv_kernel_grad(x, dy):
  """Weight gradient `[C, CO]` (float32) of a 1x1 convolution from its NHWC input `x`
  (already strided) and output gradient `dy` (`CO` a multiple of 16): the sum over the
  pixels of `x^T dy`, by the C++ kernel; over a batch-sharded mesh, of the global batch."""
  _require()
  if x.ndim != 4 or dy.shape[:3] != x.shape[:3] or dy.shape[-1] % 16:
    raise ValueError(f'pointwise_conv_kernel_grad: expected NHWC x and dy of the same '
                     f'pixels, dy with a multiple of 16 channels; got {x.shape}, {dy.shape}')
  call = jax.ffi.ffi_call(build.POINTWISE_KERNEL_GRAD_TARGET, jax.ShapeDtypeStruct(
      (x.shape[-1], dy.shape[-1]), jnp.float32))
  kernel_grad = _split_over_batch(call, batched=(True, True), sums_over_batch=True,
                                  rule='p c, p o -> c o', reduced=('p',))
  # As [pixels, channels], the shape in which the forward matmul reads x: XLA then hands
  # both the same buffer, where for an NHWC operand it computed x a second time.
  return kernel_grad(x.reshape(-1, x.shape[-1]).astype(jnp.float32),
                     dy.reshape(-1, dy.shape[-1]).astype(jnp.float32))


def channel_sums(a, b=None):
  """`[2, C]` float32: per-channel sums over the pixels of NHWC `a`, of `a` and of `a * b`
  (`a * a` without `b`), from one C++ pass; over a batch-sharded mesh, of the global
  batch."""
  _require()
  operands = (a,) if b is None else (a, b)
  if a.ndim != 4 or any(o.shape != a.shape for o in operands):
    raise ValueError(f'channel_sums: expected NHWC arrays of one shape, got '
                     f'{[o.shape for o in operands]}')

  def call(*arrays):
    empty = () if len(arrays) == 2 else (jnp.zeros((0,), jnp.float32),)
    return jax.ffi.ffi_call(build.CHANNEL_SUMS_TARGET,
                            jax.ShapeDtypeStruct((2, a.shape[-1]), jnp.float32))(
                                *arrays, *empty)

  summed = _split_over_batch(call, batched=(True,) * len(operands), sums_over_batch=True,
                             rule=', '.join(['n h w c'] * len(operands)) + ' -> t c',
                             reduced=('n',))
  return summed(*(o.astype(jnp.float32) for o in operands))
