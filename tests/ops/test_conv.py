"""Every convolution implementation computes what XLA's reference computes.

Outputs and both gradients, under jit, grad, remat and sharding over 8 devices, for every
kind of convolution a ResNeXt has; then whole tiny ResNeXts.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.kernels.cpu import build as cpu_build
from resnext_jax.model import resnext
from resnext_jax.ops import conv as conv_ops
from resnext_jax.ops import fused_eval
from resnext_jax.ops import impl as impls

# 'native' where its C++ kernel builds (tests/test_cpu_calls.py checks that it does on
# every machine that has what it needs).
FAST_IMPLS = [name for name in impls.IMPLEMENTATIONS if name != 'xla'
              and (name != 'native' or cpu_build.unavailable_reason() is None)]

# (input NHWC, kernel size, stride, groups, output channels).
CASES = {
    'width4': ((2, 9, 9, 16), 3, 1, 4, 16),
    'width4_stride2_odd': ((2, 9, 9, 16), 3, 2, 4, 16),
    'width4_odd_groups': ((2, 6, 6, 12), 3, 1, 3, 12),  # odd: 'native' falls back
    # 'native' interleaves groups in a vector: as many as fill it, else fewer that divide
    # the group count (cpu_calls.groups_per_vector).
    'width4_six_groups': ((2, 7, 7, 24), 3, 1, 6, 24),
    'width8': ((2, 8, 8, 32), 3, 1, 4, 32),
    'width8_odd_groups': ((2, 6, 6, 24), 3, 1, 3, 24),
    'width8_stride2_nonsquare': ((3, 8, 6, 32), 3, 2, 4, 32),
    'width2': ((2, 6, 6, 8), 3, 1, 4, 8),
    'width16': ((2, 6, 6, 64), 3, 1, 4, 64),
    'width16_stride2': ((2, 7, 7, 64), 3, 2, 4, 64),
    'width32': ((2, 5, 5, 64), 3, 1, 2, 64),  # past MAX_TAPS_GROUP_WIDTH: XLA's path
    'width32_stride2': ((2, 7, 7, 64), 3, 2, 2, 64),
    'pointwise': ((2, 8, 8, 16), 1, 1, 1, 24),
    'pointwise_stride2_odd': ((2, 9, 9, 16), 1, 2, 1, 24),
    # Outputs in blocks of 16: 'native' computes the weight gradient in C++, in tiles of
    # input channels with a shorter last one (20), panels of output channels with a
    # narrower last one (80, 48), and work items of several 128-pixel blocks, the last
    # one shorter (3200 pixels: two work items per thread, up to 12 threads).
    'pointwise_blocks_of_16': ((2, 40, 40, 20), 1, 1, 1, 80),
    'pointwise_blocks_of_16_stride2': ((3, 11, 11, 40), 1, 2, 1, 48),
    'stem': ((2, 15, 15, 3), 7, 2, 1, 16),
    'stem_nonsquare': ((1, 12, 9, 3), 7, 2, 1, 32),
    'stem_8_outputs': ((1, 9, 9, 3), 7, 2, 1, 8),  # 'native' keeps the matmul form
}


def conv_fn(impl, case):
  _, k, stride, groups, _ = case
  pad = k // 2

  def conv(x, kernel):
    return conv_ops.conv2d(x, kernel, strides=(stride, stride),
                           padding=((pad, pad), (pad, pad)), groups=groups, impl=impl)

  return conv


def make_inputs(case, dtype=jnp.float32, batch=None):
  shape, k, _, groups, out_channels = case
  if batch:
    shape = (batch,) + shape[1:]
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape, np.float32)
  kernel = rng.standard_normal((k, k, shape[-1] // groups, out_channels), np.float32)
  out_shape = jax.eval_shape(conv_fn('xla', case), x, kernel).shape
  dy = rng.standard_normal(out_shape, np.float32)
  return tuple(jnp.asarray(a, dtype) for a in (x, kernel, dy))


def outputs_and_grads(conv):
  """jit(x, kernel, dy -> (y, dx, dkernel))."""

  def fn(x, kernel, dy):
    y, vjp = jax.vjp(conv, x, kernel)
    return (y,) + vjp(dy)

  return jax.jit(fn)


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_close(got, want, tol):
  for name, g, w in zip(('output', 'input grad', 'kernel grad'), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype, w.dtype)
    assert rel_err(g, w) <= tol, (name, rel_err(g, w))


@pytest.mark.parametrize('case', CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_matches_xla_float32(impl, case):
  args = make_inputs(case)
  assert_close(outputs_and_grads(conv_fn(impl, case))(*args),
               outputs_and_grads(conv_fn('xla', case))(*args), 1e-5)


@pytest.mark.parametrize('case_name', ['width4_stride2_odd', 'width8', 'width16',
                                       'width32', 'pointwise_stride2_odd', 'stem'])
@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_matches_xla_bfloat16(impl, case_name):
  # Both round to bfloat16 (8 significant bits) at different points: a few ulps apart.
  case = CASES[case_name]
  args = make_inputs(case, jnp.bfloat16)
  assert_close(outputs_and_grads(conv_fn(impl, case))(*args),
               outputs_and_grads(conv_fn('xla', case))(*args), 3e-2)


def loss_and_grads(conv):
  """x, kernel, r -> grad of sum(conv(x, kernel) * r) with respect to x and kernel."""
  return jax.grad(lambda x, kernel, r: jnp.sum(conv(x, kernel) * r), argnums=(0, 1))


@pytest.mark.parametrize('case_name', ['width4_stride2_odd', 'width8', 'width16',
                                       'width32_stride2', 'pointwise_stride2_odd',
                                       'pointwise_blocks_of_16_stride2', 'stem'])
@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_sharded_over_8_devices(impl, case_name):
  assert jax.device_count() == 8, 'run through the test suite (tests/conftest.py)'
  case = CASES[case_name]
  x, kernel, r = make_inputs(case, batch=8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  sharded = jax.jit(loss_and_grads(conv_fn(impl, case)),
                    in_shardings=(by_batch, replicated, by_batch),
                    out_shardings=(by_batch, replicated))
  got = sharded(x, kernel, r)
  want = jax.jit(loss_and_grads(conv_fn('xla', case)))(x, kernel, r)
  assert got[0].sharding.is_equivalent_to(by_batch, x.ndim)
  for g, w in zip(got, want):
    assert rel_err(g, w) <= 1e-5


@pytest.mark.parametrize('case_name', ['width4_stride2_odd', 'width32', 'pointwise',
                                       'stem'])
@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_under_remat(impl, case_name):
  case = CASES[case_name]
  x, kernel, r = make_inputs(case)
  got = jax.jit(loss_and_grads(jax.checkpoint(conv_fn(impl, case))))(x, kernel, r)
  want = jax.jit(loss_and_grads(conv_fn('xla', case)))(x, kernel, r)
  for g, w in zip(got, want):
    assert rel_err(g, w) <= 1e-5


def test_auto_picks_per_backend_and_names_are_checked():
  assert impls.resolve_impl('auto') == impls.AUTO_IMPL[jax.default_backend()]
  for name in impls.IMPLEMENTATIONS:
    assert impls.resolve_impl(name) == name
  with pytest.raises(ValueError, match="Unknown conv_impl 'cudnn'.*'xla'"):
    impls.resolve_impl('cudnn')


# Tiny ResNeXts: group widths 2, 4, 8 (all on the multiply-add path) and 8, 16, 32
# (both paths), with a strided grouped conv and a strided shortcut in every later stage.
TINY = {'width2': dict(cardinality=4, width_per_group=2),
        'width8': dict(cardinality=2, width_per_group=8)}


@pytest.mark.parametrize('widths', TINY.values(), ids=TINY.keys())
@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_tiny_resnext_same_params_logits_and_grads(impl, widths):
  def build(conv_impl):
    # zero_init_residual=False, so that every conv contributes to the logits.
    return resnext.ResNeXt(stage_sizes=(1, 1, 1), base_planes=8, num_classes=10,
                          zero_init_residual=False, conv_impl=conv_impl, **widths)

  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  labels = jnp.array([3, 7])

  def loss_logits_grads(model, variables):
    def loss_fn(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              images, train=True, mutable=['batch_stats'])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels]), logits
    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    eval_logits = model.apply(variables, images, train=False)
    return logits, eval_logits, grads

  results = {}
  for name in ('xla', impl):
    model = build(name)
    variables = resnext.init_variables(model, jax.random.key(0), image_size=32)
    results[name] = variables, jax.jit(lambda v, m=model: loss_logits_grads(m, v))(variables)

  (ref_vars, (ref_logits, ref_eval, ref_grads)) = results['xla']
  (variables, (logits, eval_logits, grads)) = results[impl]
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), variables) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), ref_vars))
  jax.tree.map(np.testing.assert_array_equal, variables, ref_vars)
  assert rel_err(logits, ref_logits) <= 1e-4
  assert rel_err(eval_logits, ref_eval) <= 1e-4
  leaves, ref_leaves = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  assert max(rel_err(g, r) for g, r in zip(leaves, ref_leaves)) <= 1e-4


# Eval-mode conv + batch norm (+ shortcut) (+ ReLU), fused by 'native' for 1x1 convs
# and the stem: (input NHWC, kernel size, output channels, stride, with a residual,
# with a ReLU). Past 256 input channels the 1x1 kernel sums in several passes; past 192
# pixels and 256 output channels the work splits into blocks.
NORMALIZED_CASES = {
    'relu': ((2, 7, 5, 40), 1, 32, 1, False, True),
    'deep_residual': ((2, 7, 7, 300), 1, 48, 1, True, True),
    'stride2_odd_residual': ((3, 9, 9, 24), 1, 16, 2, True, True),
    'many_pixels_wide_plain': ((2, 15, 15, 16), 1, 272, 1, False, False),
    'stride2_even_residual_plain': ((2, 8, 6, 24), 1, 32, 2, True, False),
    'deep_and_wide': ((2, 5, 5, 300), 1, 272, 1, False, True),
    'stem': ((2, 15, 15, 3), 7, 32, 2, False, True),
    'stem_nonsquare_plain': ((1, 12, 9, 3), 7, 16, 2, False, False),
    'stem_wide_rows': ((1, 9, 30, 3), 7, 16, 2, False, True),
    'stem_4_channels': ((2, 13, 10, 4), 7, 16, 2, False, True),  # 196 weights per output
    'stem_1_channel_5x5_stride1': ((1, 8, 7, 1), 5, 16, 1, False, True),
}


def normalized_inputs(case, batch=None):
  shape, k, out_channels, stride, with_residual, _ = case
  if batch:
    shape = (batch,) + shape[1:]
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape, np.float32)
  kernel = rng.standard_normal((k, k, shape[-1], out_channels), np.float32)
  scale = rng.uniform(0.5, 2.0, out_channels).astype(np.float32)
  offset = rng.standard_normal(out_channels).astype(np.float32)
  pad = k // 2
  out_shape = ((shape[0],) + tuple((size + 2 * pad - k) // stride + 1 for size in shape[1:3])
               + (out_channels,))
  residual = rng.standard_normal(out_shape, np.float32) if with_residual else None
  r = rng.standard_normal(out_shape, np.float32)
  return jax.tree.map(jnp.asarray, (x, kernel, scale, offset, residual, r))


def normalized_fn(case, fused):
  _, k, _, stride, _, relu = case
  strides, padding = (stride, stride), ((k // 2, k // 2),) * 2

  def conv(x, kernel, scale, offset, residual):
    if fused:
      assert fused_eval.fuses_normalization(x, kernel, strides, padding, 1, 'native',
                                            residual)
      return fused_eval.conv2d_normalized(x, kernel, scale, offset, strides=strides,
                                          padding=padding, residual=residual, relu=relu)
    y = conv_ops.conv2d(x, kernel, strides=strides, padding=padding, impl='xla')
    y = y * scale + offset
    y = y if residual is None else y + residual
    return jnp.maximum(y, 0) if relu else y

  return conv


def normalized_outputs_and_grads(conv):
  def fn(x, kernel, scale, offset, residual, r):
    y, vjp = jax.vjp(conv, x, kernel, scale, offset, residual)
    return (y,) + vjp(r)
  return fn


needs_native = pytest.mark.skipif('native' not in FAST_IMPLS,
                                  reason=f'{cpu_build.unavailable_reason()}')


@needs_native
@pytest.mark.parametrize('case', NORMALIZED_CASES.values(), ids=NORMALIZED_CASES.keys())
def test_fused_conv_and_norm_matches_xla(case):
  args = normalized_inputs(case)
  got = jax.jit(normalized_outputs_and_grads(normalized_fn(case, True)))(*args)
  want = jax.jit(normalized_outputs_and_grads(normalized_fn(case, False)))(*args)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and rel_err(g, w) <= 1e-5


@needs_native
@pytest.mark.parametrize('case_name', ['stride2_odd_residual', 'relu', 'stem'])
def test_fused_conv_and_norm_sharded_and_under_remat(case_name):
  assert jax.device_count() == 8, 'run through the test suite (tests/conftest.py)'
  case = NORMALIZED_CASES[case_name]
  args = normalized_inputs(case, batch=8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = (by_batch, replicated, replicated, replicated,
               by_batch if args[4] is not None else None, by_batch)
  fn = normalized_outputs_and_grads(normalized_fn(case, True))
  sharded = jax.jit(fn, in_shardings=shardings)(*args)
  remat = jax.jit(normalized_outputs_and_grads(jax.checkpoint(normalized_fn(case, True))))(
      *args)
  want = jax.jit(normalized_outputs_and_grads(normalized_fn(case, False)))(*args)
  assert sharded[0].sharding.is_equivalent_to(by_batch, 4)
  for got in (sharded, remat):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert rel_err(g, w) <= 1e-5


@needs_native
def test_native_eval_fuses_the_1x1_convs_with_their_norms_and_train_does_not():
  """The eval-mode model runs its stem and 1x1 convs through the fused kernels; train mode
  runs only the stem's forward pass there (with an identity norm). (The tiny ResNeXt test
  above compares the fused 1x1 convs in a whole model; tests/test_convert.py compares
  eval logits with torchvision's, with random running statistics, through both fused
  kernels.)"""
  model = resnext.ResNeXt(stage_sizes=(1, 1), base_planes=16, num_classes=10,
                         cardinality=2, width_per_group=8, conv_impl='native')
  variables = resnext.init_variables(model, jax.random.key(0), image_size=32)
  images = jnp.zeros((2, 32, 32, 3))
  eval_hlo = jax.jit(lambda v: model.apply(v, images)).lower(variables).as_text()
  # conv1, conv3 and the shortcut of both blocks.
  assert eval_hlo.count(cpu_build.POINTWISE_TARGET) == 6
  assert eval_hlo.count(cpu_build.STEM_NORMALIZED_TARGET) == 1
  train_hlo = jax.jit(lambda v: model.apply(v, images, train=True, mutable=['batch_stats'])
                      ).lower(variables).as_text()
  assert cpu_build.POINTWISE_TARGET not in train_hlo
  assert train_hlo.count(cpu_build.STEM_NORMALIZED_TARGET) == 1


@needs_native
@pytest.mark.parametrize('case_name', ['relu', 'stem'])
def test_fused_conv_and_norm_keeps_nans(case_name):
  """A NaN input makes NaN outputs, as in XLA (a ReLU written max(x, 0) would hide it)."""
  case = NORMALIZED_CASES[case_name]
  x, kernel, scale, offset, residual, _ = normalized_inputs(case)
  x = x.at[0, 2, 2, 0].set(jnp.nan)
  got = jax.jit(normalized_fn(case, True))(x, kernel, scale, offset, residual)
  want = jax.jit(normalized_fn(case, False))(x, kernel, scale, offset, residual)
  assert np.isnan(want).any()
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))


@pytest.mark.parametrize('x_shape, kernel_shape, padding, residual, dtype, message', [
    ((1, 4, 4, 8), (1, 1, 8, 16), ((1, 1), (1, 1)), False, jnp.float32, 'no padding'),
    ((1, 4, 4, 8), (1, 1, 8, 24), ((0, 0), (0, 0)), False, jnp.float32, 'blocks of 16'),
    ((1, 9, 9, 3), (7, 7, 3, 16), ((3, 3), (3, 3)), True, jnp.float32, 'takes a residual'),
    ((1, 9, 9, 64), (3, 3, 64, 64), ((1, 1), (1, 1)), False, jnp.float32, 'only as a stem'),
    ((1, 4, 4, 8), (1, 1, 8, 16), ((0, 0), (0, 0)), False, jnp.bfloat16, 'float32 only'),
])
def test_fused_conv_and_norm_names_what_it_cannot_take(x_shape, kernel_shape, padding,
                                                      residual, dtype, message):
  x = jnp.ones(x_shape, dtype)
  kernel = jnp.ones(kernel_shape)
  out_channels = kernel_shape[-1]
  res = jnp.ones(x_shape[:3] + (out_channels,)) if residual else None
  assert not fused_eval.fuses_normalization(x, kernel, (1, 1), padding, 1, 'native', res)
  with pytest.raises(ValueError, match=message):
    fused_eval.conv2d_normalized(x, kernel, jnp.ones(out_channels), jnp.zeros(out_channels),
                                 strides=(1, 1), padding=padding, residual=res)
