"""The training batch norm's one-pass C++ sums ('native') against the plain XLA form:
values and gradients, in the BatchNorm module, sharded over 8 devices, under remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.kernels.cpu import build as cpu_build
from resnext_jax.kernels.cpu import calls as cpu_calls
from resnext_jax.model import layers, resnext
from resnext_jax.ops import norm_stats

pytestmark = pytest.mark.skipif(cpu_build.unavailable_reason() is not None,
                                reason=f'{cpu_build.unavailable_reason()}')

# Channels that fill no vector exactly; pixel counts that make the kernel's work items
# (64 to 512 pixels, at least 4 per thread where the tensor allows) uneven, or all full.
SHAPES = {'small': (2, 5, 7, 20), 'even': (2, 16, 16, 8), 'uneven': (3, 20, 30, 24),
          'largest_items': (2, 40, 60, 5), 'one_pixel': (1, 1, 1, 3)}


def rel_err(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
  channels = shape[-1]
  return tuple(jnp.asarray(a) for a in (
      x, rng.standard_normal(channels).astype(np.float32),
      rng.standard_normal(channels).astype(np.float32),
      rng.standard_normal(shape).astype(np.float32),
      rng.standard_normal((2, channels)).astype(np.float32)))


def norm_loss(impl):
  """x, multiplier, offset, r, s -> a scalar through both functions, as a batch norm
  uses them (the statistics feed the multiplier and offset)."""

  def loss(x, multiplier, offset, r, s):
    mean, mean_of_squares = norm_stats.moments(x, impl)
    y = norm_stats.scale_and_shift(x, multiplier * (1 + mean_of_squares),
                                  offset - mean, impl)
    return jnp.sum(y * r) + jnp.sum(mean * s[0]) + jnp.sum(mean_of_squares * s[1])

  return loss


@pytest.mark.parametrize('shape', SHAPES.values(), ids=SHAPES.keys())
def test_sums_and_gradients_match_the_plain_form(shape):
  args = inputs(shape)
  assert norm_stats.uses_kernel(args[0], 'native')
  assert not norm_stats.uses_kernel(args[0], 'xla')
  got_moments = jax.jit(lambda x: norm_stats.moments(x, 'native'))(args[0])
  want_moments = jax.jit(lambda x: norm_stats.moments(x, 'xla'))(args[0])
  for g, w in zip(got_moments, want_moments):
    assert rel_err(g, w) <= 1e-5
  grads = [jax.jit(jax.value_and_grad(norm_loss(impl), argnums=(0, 1, 2)))(*args)
           for impl in ('native', 'xla')]
  for g, w in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    assert rel_err(g, w) <= 1e-5


def test_the_kernel_sums_per_channel_over_every_pixel():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  b = jnp.full(x.shape, 2.0)
  flat = np.asarray(x).reshape(-1, 5)
  np.testing.assert_allclose(cpu_calls.channel_sums(x), [flat.sum(0), (flat**2).sum(0)])
  np.testing.assert_allclose(cpu_calls.channel_sums(x, b), [flat.sum(0), 2 * flat.sum(0)])
  np.testing.assert_array_equal(cpu_calls.channel_sums(jnp.ones((0, 3, 3, 4))),
                                np.zeros((2, 4)))


def test_the_kernel_names_arrays_it_cannot_sum():
  with pytest.raises(ValueError, match=r'NHWC arrays of one shape.*\(4, 5\)'):
    cpu_calls.channel_sums(jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r'\(1, 2, 2, 3\), \(1, 2, 2, 4\)'):
    cpu_calls.channel_sums(jnp.ones((1, 2, 2, 3)), jnp.ones((1, 2, 2, 4)))


def test_bfloat16_keeps_the_plain_form():
  x = jnp.ones((1, 2, 2, 4), jnp.bfloat16)
  assert not norm_stats.uses_kernel(x, 'native')
  y = norm_stats.scale_and_shift(x, jnp.full(4, 2.0), jnp.ones(4), 'native')
  assert y.dtype == jnp.bfloat16 and np.all(np.asarray(y, np.float32) == 3)


def batch_norm_results(impl, x, remat=False):
  """A training BatchNorm's output, its updated running statistics and the gradients of
  both with respect to the input and the parameters."""
  module = layers.BatchNorm(use_running_average=False, impl=impl)
  variables = module.init(jax.random.key(0), x)
  r = jax.random.normal(jax.random.key(1), x.shape)

  def loss(params, x):
    y, updates = module.apply({'params': params, 'batch_stats': variables['batch_stats']},
                              x, mutable=['batch_stats'])
    return jnp.sum(y * r), (y, updates)

  if remat:
    loss = jax.checkpoint(loss)
  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), variables['params']


@pytest.mark.parametrize('remat', [False, True])
def test_batch_norm_module_trains_the_same_with_the_kernel(remat):
  x = inputs((4, 9, 11, 24))[0]
  results = {}
  for impl in ('native', 'xla'):
    fn, params = batch_norm_results(impl, x, remat)
    results[impl] = jax.jit(fn)(params, x)
  for g, w in zip(jax.tree.leaves(results['native']), jax.tree.leaves(results['xla'])):
    assert rel_err(g, w) <= 1e-5


def test_sharded_batch_norm_uses_the_global_batch_and_gathers_nothing():
  assert jax.device_count() == 8, 'run through the test suite (tests/conftest.py)'
  # Each device's images differ in mean, so per-device statistics would be wrong.
  x = inputs((8, 6, 6, 16))[0] + jnp.arange(8.0)[:, None, None, None]
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn, params = batch_norm_results('native', x)
  sharded = jax.jit(fn, in_shardings=(replicated, by_batch))
  assert 'all-gather' not in sharded.lower(params, x).compile().as_text()
  got = sharded(params, x)
  want = jax.jit(batch_norm_results('xla', x)[0])(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) <= 1e-5


def test_the_native_model_sums_its_norms_in_the_kernel_when_training():
  model = resnext.ResNeXt(stage_sizes=(1,), base_planes=16, num_classes=10, cardinality=2,
                         width_per_group=8, conv_impl='native')
  variables = resnext.init_variables(model, jax.random.key(0), image_size=32)
  images = jnp.zeros((2, 32, 32, 3))

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                            images, train=True, mutable=['batch_stats'])
    return jnp.sum(logits)

  hlo = jax.jit(jax.grad(loss)).lower(variables['params']).as_text()
  # Five norms (stem, three in the block, shortcut), forward and backward each.
  assert hlo.count(cpu_build.CHANNEL_SUMS_TARGET) == 10
  eval_hlo = jax.jit(lambda v: model.apply(v, images)).lower(variables).as_text()
  assert cpu_build.CHANNEL_SUMS_TARGET not in eval_hlo
