"""The C++ kernels build where they can, are cached, and fail with a clear reason.

Their results are checked against XLA's with every other implementation, in
tests/ops/test_conv.py (conv_impl 'native').
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
      or not cpu_build.runnable_isas() or cpu_build._compiler() is None):
    pytest.skip('this machine lacks Linux x86-64, AVX2/FMA or a C++ compiler')
  assert cpu_build.unavailable_reason() is None
  assert impls.resolve_impl('native') == 'native'


def test_a_build_is_cached_by_source_and_toolchain(tmp_path, monkeypatch):
  if cpu_build._compiler() is None:
    pytest.skip('no C++ compiler')
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  monkeypatch.setenv('RESNEXT_JAX_CACHE', str(tmp_path))
  isa = cpu_build.instruction_set()
  library = cpu_build._build(cpu_build._compiler(), isa)
  assert os.path.dirname(library) == str(tmp_path)
  built_at = os.stat(library).st_mtime_ns
  assert cpu_build._build(cpu_build._compiler(), isa) == library
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
    cpu_build._build([str(broken)], cpu_build.ISAS[-1])
  assert os.listdir(cache) == []


def test_each_instruction_set_is_built_with_its_flags_and_cached_apart(tmp_path,
                                                                        monkeypatch):
  """The ISA is part of the cache key: an AVX2 build never stands in for an AVX-512 one.
  (A stand-in compiler that records its flags: no build needed.)"""
  fake = tmp_path / 'fake-c++'
  fake.write_text('#!/bin/sh\necho "$@" > "$(eval echo \\${$#})"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv('RESNEXT_JAX_CACHE', str(tmp_path / 'cache'))
  libraries = {isa.name: cpu_build._build([str(fake)], isa) for isa in cpu_build.ISAS}
  assert len(set(libraries.values())) == len(cpu_build.ISAS)
  for isa in cpu_build.ISAS:
    assert f'cpu_kernels_{isa.name}_' in os.path.basename(libraries[isa.name])
    with open(libraries[isa.name]) as f:
      flags = f.read().split()
    assert f'-DRESNEXT_JAX_VECTOR_BITS={isa.vector_bits}' in flags
    assert set(isa.compiler_flags) <= set(flags)


@pytest.fixture
def fresh_choice():
  """Clears the cached ISA choice and build before and after a test that changes them."""
  for cached in (cpu_build.instruction_set, cpu_build.unavailable_reason,
                 impls._warn_native_unavailable):
    cached.cache_clear()
  yield
  for cached in (cpu_build.instruction_set, cpu_build.unavailable_reason,
                 impls._warn_native_unavailable):
    cached.cache_clear()


AVX512_CPU = frozenset({'avx2', 'fma', 'avx512f', 'avx512bw', 'avx512dq', 'avx512vl'})


@pytest.mark.parametrize('flags, expected', [
    (AVX512_CPU, 'avx512'),
    (AVX512_CPU - {'avx512bw'}, 'avx2'),  # AVX-512 without BW: the AVX2 build
    (frozenset({'avx2', 'fma'}), 'avx2'),
    (frozenset({'avx', 'sse4_2'}), None)])
def test_the_build_is_for_the_widest_instruction_set_the_cpu_has(flags, expected,
                                                                 monkeypatch, fresh_choice):
  monkeypatch.delenv(cpu_build.ISA_VARIABLE, raising=False)
  monkeypatch.setattr(cpu_build, 'cpu_flags', lambda: flags)
  isa = cpu_build.instruction_set()
  assert (isa.name if isa else None) == expected


def test_without_avx2_auto_falls_back_with_one_log_line(monkeypatch, fresh_choice, caplog):
  monkeypatch.delenv(cpu_build.ISA_VARIABLE, raising=False)
  monkeypatch.setattr(cpu_build, 'cpu_flags', lambda: frozenset({'avx', 'sse4_2'}))
  with caplog.at_level(logging.WARNING):
    assert [impls.resolve_impl('auto') for _ in range(3)] == ['taps'] * 3
  warnings = [r.getMessage() for r in caplog.records if 'AVX2 and FMA' in r.getMessage()]
  assert len(warnings) == 1, warnings


def test_the_isa_variable_chooses_and_refuses_what_the_cpu_lacks(monkeypatch, fresh_choice):
  monkeypatch.setattr(cpu_build, 'cpu_flags', lambda: frozenset({'avx2', 'fma'}))
  monkeypatch.setenv(cpu_build.ISA_VARIABLE, 'avx2')
  assert cpu_build.instruction_set().name == 'avx2'
  cpu_build.instruction_set.cache_clear()
  monkeypatch.setenv(cpu_build.ISA_VARIABLE, 'avx512')
  with pytest.raises(ValueError, match=r'RESNEXT_JAX_CPU_ISA=avx512 asks for AVX-512, but '
                     r'this CPU lacks avx512bw, avx512dq, avx512f, avx512vl .*avx2'):
    cpu_build.instruction_set()
  monkeypatch.setenv(cpu_build.ISA_VARIABLE, 'sse2')
  with pytest.raises(ValueError, match=r"RESNEXT_JAX_CPU_ISA='sse2' is not one of "
                     r'avx512, avx2'):
    impls.resolve_impl('auto')


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
  assert not cpu_calls.supports((3, 3, 4, 12), 3)  # 4-wide groups share vectors
  assert not cpu_calls.supports((3, 3, 2, 8), 4)
  assert not cpu_calls.supports((3, 3, 64, 64), 1)
  assert cpu_calls.supports_stem((7, 7, 3, 64))
  assert not cpu_calls.supports_stem((7, 7, 3, 8))  # 'native' keeps the matmul form
  assert not cpu_calls.supports_stem((3, 3, 64, 64))  # ResNet's dense 3x3 convs


@pytest.mark.parametrize('isa', cpu_build.ISAS, ids=lambda isa: isa.name)
def test_narrow_groups_fill_a_vector_together(isa, monkeypatch):
  monkeypatch.setattr(cpu_build, 'instruction_set', lambda: isa)
  lanes = isa.vector_bits // 32
  assert cpu_calls.groups_per_vector(4, 32) == lanes // 4
  assert cpu_calls.groups_per_vector(8, 64) == max(1, lanes // 8)
  assert cpu_calls.groups_per_vector(4, 6) == 2  # as many as divide the groups
  assert cpu_calls.groups_per_vector(8, 3) == 1
  assert cpu_calls.groups_per_vector(16, 32) == 1


def batch_and_replicated_shardings():
  """(by batch, replicated) shardings over the suite's 8 host devices."""
  assert jax.device_count() == 8, 'run through the test suite (tests/conftest.py)'
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data')),
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


@pytest.mark.parametrize('kernel_shape, groups', [((3, 3, 8, 32), 4), ((7, 7, 3, 16), 1)])
def test_each_device_runs_the_kernels_on_its_own_images(kernel_shape, groups):
  """Under a batch-sharded jit nothing is gathered: every device convolves its share of
  the batch, and only the weight gradient is summed over devices."""
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  by_batch, replicated = batch_and_replicated_shardings()
  x = jnp.ones((8, 9, 9, kernel_shape[2] * groups))
  kernel = jnp.ones(kernel_shape)

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


def test_the_1x1_weight_gradient_kernel_takes_the_first_two_stages_layers():
  """Which 1x1 weight gradients 'native' computes in C++ (else XLA's dot): outputs in
  blocks of 16, up to MAX_POINTWISE_GRAD_WEIGHTS weights (resnext50's stages 1 and 2)."""
  for shape in [(1, 1, 64, 128), (1, 1, 256, 128), (1, 1, 512, 512), (1, 1, 20, 48)]:
    assert cpu_calls.supports_pointwise_kernel_grad(shape), shape
  for shape in [(1, 1, 1024, 512), (1, 1, 64, 24), (3, 3, 64, 64), (1, 1, 0, 16)]:
    assert not cpu_calls.supports_pointwise_kernel_grad(shape), shape


@pytest.mark.parametrize('kernel_shape, runs_the_kernel', [
    ((1, 1, 32, 64), True), ((1, 1, 1024, 512), False), ((1, 1, 32, 24), False)])
def test_native_1x1_weight_gradient_runs_the_kernel_where_it_applies(kernel_shape,
                                                                      runs_the_kernel):
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  x = jnp.ones((1, 3, 3, kernel_shape[2]))

  def loss(kernel):
    return jnp.sum(conv_ops.conv2d(x, kernel, impl='native') ** 2)

  hlo = jax.jit(jax.grad(loss)).lower(jnp.ones(kernel_shape)).compile().as_text()
  assert ('resnext_pointwise_conv_kernel_grad' in hlo) == runs_the_kernel


def test_each_device_sums_the_1x1_weight_gradient_of_its_own_images():
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  by_batch, replicated = batch_and_replicated_shardings()

  def loss(x, kernel):
    return jnp.sum(conv_ops.conv2d(x, kernel, impl='native') ** 2)

  step = jax.jit(jax.grad(loss, argnums=1), in_shardings=(by_batch, replicated),
                 out_shardings=replicated)
  hlo = step.lower(jnp.ones((8, 9, 9, 16)), jnp.ones((1, 1, 16, 32))).compile().as_text()
  assert 'all-gather' not in hlo
  calls = [line for line in hlo.splitlines()
           if 'custom_call_target="resnext_pointwise_conv_kernel_grad"' in line]
  assert len(calls) == 1 and 'f32[81,16]' in calls[0], calls  # one image's 9 x 9 pixels


def test_the_1x1_weight_gradient_of_no_pixels_is_zero():
  if cpu_build.unavailable_reason():
    pytest.skip(cpu_build.unavailable_reason())
  dk = jax.jit(cpu_calls.pointwise_conv_kernel_grad)(jnp.ones((0, 4, 4, 8)),
                                                     jnp.ones((0, 4, 4, 16)))
  assert dk.shape == (8, 16) and not jnp.any(dk)


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
  by_batch, replicated = batch_and_replicated_shardings()

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
