"""The fast max pool computes what `lax.reduce_window` and its autodiff compute."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.ops import pooling

FAST_IMPLS = [name for name in pooling.IMPLEMENTATIONS if name != 'xla']

# (input NHWC, window, stride, padding): the stem's pool, odd sizes, no padding.
CASES = {
    'stem': ((2, 12, 12, 8), 3, 2, 1),
    'odd': ((3, 9, 7, 4), 3, 2, 1),
    'stride1': ((2, 6, 6, 4), 3, 1, 1),
    'unpadded': ((2, 8, 8, 4), 2, 2, 0),
}


def pool_fn(impl, case):
  _, window, stride, pad = case
  return functools.partial(pooling.max_pool, window=(window, window),
                           strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                           impl=impl)


def output_and_grad(pool):
  def fn(x, dy):
    y, vjp = jax.vjp(pool, x)
    return y, vjp(dy)[0]
  return jax.jit(fn)


def make_inputs(case, dtype, ties):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(case[0]).astype(np.float32)
  if ties:
    # After a ReLU most of a window can be 0: the gradient must go to one element only.
    x = np.maximum(np.round(x), 0)
  pool = pool_fn('xla', case)
  dy = rng.standard_normal(jax.eval_shape(pool, x).shape).astype(np.float32)
  return jnp.asarray(x, dtype), jnp.asarray(dy, dtype)


@pytest.mark.parametrize('ties', [False, True], ids=['distinct', 'ties'])
@pytest.mark.parametrize('case_name', CASES)
@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_matches_xla_float32_exactly_where_the_max_is(impl, case_name, ties):
  case = CASES[case_name]
  x, dy = make_inputs(case, jnp.float32, ties)
  got = output_and_grad(pool_fn(impl, case))(x, dy)
  want = output_and_grad(pool_fn('xla', case))(x, dy)
  np.testing.assert_array_equal(got[0], want[0])
  # Same routing of every output gradient (first maximal tap); sums of overlapping
  # windows may be added in another order.
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_matches_xla_bfloat16(impl):
  case = CASES['stem']
  x, dy = make_inputs(case, jnp.bfloat16, ties=False)
  got = output_and_grad(pool_fn(impl, case))(x, dy)
  want = output_and_grad(pool_fn('xla', case))(x, dy)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('impl', FAST_IMPLS)
def test_sharded_and_rematerialised(impl):
  assert jax.device_count() == 8, 'run through the test suite (tests/conftest.py)'
  case = CASES['stem']
  x, dy = make_inputs(case, jnp.float32, ties=True)
  x = jnp.concatenate([x] * 4)
  dy = jnp.concatenate([dy] * 4)
  mesh = jax.make_mesh((8,), ('data',))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

  def loss(pool, x):
    return jnp.sum(pool(x) * dy)

  want = jax.jit(jax.grad(functools.partial(loss, pool_fn('xla', case))))(x)
  got = jax.jit(jax.grad(functools.partial(loss, jax.checkpoint(pool_fn(impl, case)))),
                in_shardings=batch, out_shardings=batch)(jax.device_put(x, batch))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
