"""conv_impl is resolved once, where the model is built, and the log says what and why."""

import jax
import jax.numpy as jnp
import pytest

from resnext_jax.kernels.cpu import build as cpu_build
from resnext_jax.model import resnext
from resnext_jax.ops import conv as conv_ops
from resnext_jax.ops import impl as impls
from resnext_jax.ops import norm_stats, pooling


def test_the_choice_is_described_with_its_reason(monkeypatch):
  assert jax.default_backend() == 'cpu'
  assert impls.describe_choice('taps') == 'taps -> taps (cpu, as configured)'
  if cpu_build.unavailable_reason() is None:
    isa = cpu_build.instruction_set().description  # 'AVX-512' or 'AVX2+FMA'
    assert impls.describe_choice('auto') == f'auto -> native (cpu, C++ kernels for {isa})'
  monkeypatch.setattr(cpu_build, 'unavailable_reason', lambda: 'needs a C++ compiler')
  impls._warn_native_unavailable.cache_clear()
  try:
    assert impls.describe_choice('auto') == (
        "auto -> taps (cpu, 'native' unavailable: its C++ kernel needs a C++ compiler)")
  finally:
    impls._warn_native_unavailable.cache_clear()


def test_ops_refuse_a_name_that_was_not_resolved():
  x = jnp.ones((1, 8, 8, 4))
  with pytest.raises(ValueError, match=r"conv2d: implementation 'auto'.*resolve_impl"):
    conv_ops.conv2d(x, jnp.ones((3, 3, 4, 4)), padding=((1, 1), (1, 1)), impl='auto')
  with pytest.raises(ValueError, match=r"max_pool: implementation 'auto'.*resolve_impl"):
    pooling.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), impl='auto')
  assert not norm_stats.uses_kernel(x, 'auto')  # only a resolved 'native' runs the kernel


def test_the_model_resolves_once_per_trace(monkeypatch):
  calls = []

  def counting(name):
    calls.append(name)
    return impls.resolve_impl(name)

  monkeypatch.setattr(resnext, 'resolve_impl', counting)
  model = resnext.create_model('resnext50_32x4d', num_classes=10, stage_sizes=(1, 1),
                               base_planes=8, cardinality=4, width_per_group=2)
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  calls.clear()
  jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
                 variables, images)
  assert calls == ['auto']  # once for the whole model, not once per layer
