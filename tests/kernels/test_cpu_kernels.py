"""The C++ kernels build where they can, are cached, and fail with a clear reason.

Their results are checked against XLA's with every other implementation, in
tests/test_grouped_conv.py (conv_impl 'native').
"""

import logging
import os
import platform
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.kernels.cpu import build as cpu_build
from resnext_jax.kernels.cpu import calls as cpu_calls
from resnext_jax.ops import conv as conv_ops
from resnext_jax.ops import fused_eval
from resnext_jax.ops import impl as impls


def test_builds_on_every_machine_that_has_what_it_needs():
  if (platform.system() != 'Linux' or platform.machine() != 'x86_64'
      or not cpu_build._cpu_has_avx2_fma() or cpu_build._compiler() is None):
    pytest.skip('this machine lacks Linux x86-64, AVX2/FMA or a C++ compiler')
  assert cpu_build.unavailable_reason() is None
  assert impls.resolve_impl('native') == 'native'


def test_a_build_is_cached_by_source_and_toolchain(tmp_path, monkeypatch):
  if cpu_build._compiler() is None:
    pytest.skip('no C++ compiler')
  monkeypatch.setenv('RESNEXT_JAX_CACHE', str(tmp_path))
  library = cpu_build._build(cpu_build._compiler())
  assert os.path.dirname(library) == str(tmp_path)
  built_at = os.stat(library).st_mtime_ns
  assert cpu_build._build(cpu_build._compiler()) == library
  assert os.stat(library).st_mtime_ns == built_at
  assert os.listdir(tmp_path) == [os.path.basename(library)]  # no partial files left
  assert os.stat(library).st_mode & 0o055 == 0o055  # loadable by others sharing the cache


def test_cxx_may_carry_a_launcher_and_a_missing_one_is_named(monkeypatch):
  if cpu_build._compiler() is None:
    pytest.skip('no C++ compiler')
  compiler = cpu_build._compiler()[0]
  monkeypatch.setenv('CXX', f'env {compiler}')
  assert cpu_build._compiler() == ['env', compiler]
  monkeypatch.setenv('CXX', 'no-such-compiler++')
  assert cpu_build._compiler() is None
  cpu_build.unavailable_reason.cache_clear()
  try:
    assert "$CXX is 'no-such-compiler++', not found" in cpu_build.unavailable_reason()
  finally:
    monkeypatch.delenv('CXX')
    cpu_build.unavailable_reason.cache_clear()
    assert cpu_build.unavailable_reason() is None


def test_a_failed_build_reports_the_command_and_leaves_nothing(tmp_path, monkeypatch):
  broken = tmp_path / 'broken-c++'
  broken.write_text('#!/bin/sh\necho "error: no such flag" >&2\nexit 1\n')
  broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
  cache = tmp_path / 'cache'
  monkeypatch.setenv('RESNEXT_JAX_CACHE', str(cache))
  with pytest.raises(RuntimeError, match=r'broken-c\+\+ .*failed:\nerror: no such flag'):
    cpu_build._build([str(broken)])
  assert os.listdir(cache) == []


def test_without_the_kernel_auto_falls_back_and_native_names_the_fix(monkeypatch, caplog):
  monkeypatch.setattr(cpu_build, 'unavailable_reason',
                      lambda: 'needs a C++ compiler (set $CXX, or install g++ or clang++)')
  impls._warn_native_unavailable.cache_clear()
  assert jax.default_backend() == 'cpu'
  with caplog.at_level(logging.WARNING):
    assert [impls.resolve_impl('auto') for _ in range(3)] == ['taps'] * 3
  warnings = [r.getMessage() for r in caplog.records if 'needs a C++ compiler' in r.getMessage()]
  assert len(warnings) == 1, warnings  # once per process, not once per convolution
  impls._warn_native_unavailable.cache_clear()
  with pytest.raises(ValueError, match=r"'native' is unavailable here.*needs a C\+\+ "
                     r"compiler.*Use 'taps' instead"):
    impls.resolve_impl('native')


def test_a_convolution_with_no_output_has_a_zero_weight_gradient():
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  x = jnp.ones((1, 2, 5, 16))
  kernel = jnp.ones((3, 3, 8, 16))

  def conv(impl):  # a stride of 4 over 2 unpadded rows: no output rows at all
    return lambda k: conv_ops.conv2d(x, k, strides=(4, 1), padding=((0, 0), (1, 1)),
                                     groups=2, impl=impl)

  for impl in ('native', 'xla'):
    y, vjp = jax.vjp(conv(impl), kernel)
    assert y.shape == (1, 0, 5, 16)
    assert not jnp.any(vjp(jnp.zeros_like(y))[0])


@pytest.mark.parametrize('strides, padding', [((4, 1), ((0, 0), (1, 1))),
                                              ((1, 4), ((1, 1), (0, 0)))])
def test_a_stem_convolution_with_no_output_has_a_zero_weight_gradient(strides, padding):
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  x = jnp.ones((1, 2, 2, 3))
  dy = jnp.zeros((1, 0, 2, 16)) if strides[0] == 4 else jnp.zeros((1, 2, 0, 16))
  dk = cpu_calls.stem_conv_kernel_grad(x, dy, (3, 3, 3, 16), strides, padding)
  assert dk.shape == (3, 3, 3, 16) and not jnp.any(dk)


def test_supports_the_widths_of_the_published_archs():
  for width, groups in [(4, 32), (8, 32), (16, 32), (32, 32), (4, 64)]:
    assert cpu_calls.supports((3, 3, width, groups * width), groups)
  assert not cpu_calls.supports((3, 3, 4, 12), 3)  # 4-wide groups run in pairs
  assert not cpu_calls.supports((3, 3, 2, 8), 4)
  assert not cpu_calls.supports((3, 3, 64, 64), 1)
  assert cpu_calls.supports_stem((7, 7, 3, 64))
  assert not cpu_calls.supports_stem((7, 7, 3, 8))  # 'native' keeps the matmul form
  assert not cpu_calls.supports_stem((3, 3, 64, 64))  # ResNet's dense 3x3 convs


@pytest.mark.parametrize('kernel_shape, groups', [((3, 3, 8, 32), 4), ((7, 7, 3, 16), 1)])
def test_each_device_runs_the_kernels_on_its_own_images(kernel_shape, groups):
  """Under a batch-sharded jit nothing is gathered: every device convolves its share of
  the batch, and only the weight gradient is summed over devices."""
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  assert jax.device_count() == 8, 'run through the test suite (tests/conftest.py)'
  x = jnp.ones((8, 9, 9, kernel_shape[2] * groups))
  kernel = jnp.ones(kernel_shape)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def loss(x, kernel):
    y = conv_ops.conv2d(x, kernel, strides=(2, 2), padding=((1, 1), (1, 1)),
                        groups=groups, impl='native')
    return jnp.sum(y * y)

  step = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(by_batch, replicated),
                 out_shardings=(by_batch, replicated))
  hlo = step.lower(x, kernel).compile().as_text()
  assert 'all-gather' not in hlo
  calls = [line for line in hlo.splitlines() if 'custom_call_target="resnext_' in line]
  assert calls and all(', 9, 9,' not in line and '[8,' not in line for line in calls), calls


def test_the_fused_pointwise_kernel_takes_1x1_kernels_with_outputs_in_blocks_of_16():
  """Which convolutions `conv2d_normalized` may run (else Conv2D keeps XLA's ops)."""
  assert cpu_calls.supports_pointwise((1, 1, 64, 256))
  assert not cpu_calls.supports_pointwise((1, 1, 64, 24))
  assert not cpu_calls.supports_pointwise((3, 3, 64, 256))
  assert not cpu_calls.supports_pointwise((1, 1, 0, 256))


def test_the_fused_pointwise_kernel_names_a_residual_of_the_wrong_shape():
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  with pytest.raises(ValueError, match=r'residual of shape \(1, 4, 4, 16\).*\(1, 2, 2, 16\)'):
    cpu_calls.pointwise_conv(jnp.ones((1, 4, 4, 8)), jnp.ones((1, 1, 8, 16)),
                             jnp.ones(16), jnp.zeros(16), stride=2,
                             residual=jnp.ones((1, 4, 4, 16)))


def test_the_fused_pointwise_kernel_handles_an_empty_batch():
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  y = jax.jit(lambda x: cpu_calls.pointwise_conv(
      x, jnp.ones((1, 1, 8, 16)), jnp.ones(16), jnp.zeros(16), relu=True))(
          jnp.ones((0, 4, 4, 8)))
  assert y.shape == (0, 4, 4, 16)


@pytest.mark.parametrize('kernel_shape, stride, pad, residual', [
    ((1, 1, 8, 16), 2, 0, True), ((7, 7, 3, 16), 2, 3, False)])
def test_each_device_runs_the_fused_eval_kernels_on_its_own_images(kernel_shape, stride, pad,
                                                                   residual):
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  assert jax.device_count() == 8, 'run through the test suite (tests/conftest.py)'
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  by_batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def forward(x, kernel, residual):
    return fused_eval.conv2d_normalized(
        x, kernel, jnp.ones(16), jnp.zeros(16), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), residual=residual, relu=True)

  x = jnp.ones((8, 9, 9, kernel_shape[2]))
  res = jnp.ones((8, 5, 5, 16)) if residual else None
  step = jax.jit(forward, in_shardings=(by_batch, replicated, by_batch if residual else None),
                 out_shardings=by_batch)
  hlo = step.lower(x, jnp.ones(kernel_shape), res).compile().as_text()
  assert 'all-gather' not in hlo
  calls = [line for line in hlo.splitlines() if 'custom_call_target="resnext_' in line]
  assert calls and all('= f32[1,5,5,16]' in line for line in calls), calls  # per device
