"""Every build of the C++ kernels this CPU can run matches XLA, not only the default one.

The rest of the suite runs the kernels built for the widest instruction set the CPU has
(AVX-512 where it has it). An AVX-512 CPU also runs the AVX2 build, whose tiles differ
(half the vector width, 16 registers): the native-vs-xla checks of tests/ops and
tests/kernels run again for it in a subprocess (a process registers its FFI targets
once), with RESNEXT_JAX_CPU_ISA set. A build this CPU cannot run is skipped, with the
instruction set and missing CPU flags in the reason (pytest prints the reasons: -rs in
pyproject.toml), so that a CI machine without AVX-512 shows what it left untested.
"""

import os
import subprocess
import sys
import tempfile

import pytest

from resnext_jax.kernels.cpu import build as cpu_build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The modules that compare 'native' (every kernel) with 'xla', and the build's own tests.
CHECKS = ('tests/ops', 'tests/kernels/test_cpu_kernels.py')


@pytest.mark.slow
@pytest.mark.parametrize('isa', cpu_build.ISAS, ids=[isa.name for isa in cpu_build.ISAS])
def test_each_build_this_cpu_runs_matches_xla(isa):
  missing = sorted(set(isa.cpu_flags) - cpu_build.cpu_flags())
  if missing:
    pytest.skip(f'the {isa.description} build of the C++ kernels was not run: this CPU '
                f'lacks {", ".join(missing)}')
  if cpu_build.unavailable_reason():
    pytest.skip(f'the {isa.description} build was not run: the C++ kernels '
                f'{cpu_build.unavailable_reason()}')
  if cpu_build.instruction_set() == isa:
    return  # the build the rest of this suite runs in-process
  env = dict(os.environ, **{
      cpu_build.ISA_VARIABLE: isa.name,
      # XLA's compiled programs of one build are kept apart from the other's.
      'JAX_COMPILATION_CACHE_DIR': os.path.join(
          tempfile.gettempdir(), f'resnext_jax-test-xla-cache-{isa.name}')})
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *CHECKS], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert f'C++ kernels for {isa.description}' in _describe_in(env), isa


def _describe_in(env) -> str:
  """The run log's line for conv_impl 'auto' in a process with `env`."""
  return subprocess.run(
      [sys.executable, '-c', 'from resnext_jax.ops import impl; '
       "print(impl.describe_choice('auto'))"],
      cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
