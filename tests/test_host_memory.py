"""reuse_freed_memory() stops XLA's per-step scratch buffer from faulting in fresh pages."""

import subprocess
import sys

import pytest

# Runs a jitted function whose scratch buffer is ~256 MB three times and prints the
# page faults of the last run.
_SCRIPT = """
import resource, sys
from resnext_jax import host_memory
configured = host_memory.reuse_freed_memory() if sys.argv[1] == 'reuse' else None
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.sin(x) * jnp.cos(x)[::-1]).sum())
x = jnp.ones((64 * 1024 * 1024,), jnp.float32)
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f(x).block_until_ready()
print(configured, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode):
  out = subprocess.run([sys.executable, '-c', _SCRIPT, mode], capture_output=True,
                       text=True, check=True, timeout=300)
  configured, faults = out.stdout.split()
  return configured, int(faults)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc allocator only')
def test_reused_memory_avoids_page_faults():
  _, faults_default = page_faults('default')
  configured, faults_reused = page_faults('reuse')
  assert configured == 'True'
  # 256 MB of fresh 4 KiB pages is ~65,000 faults; reused pages fault hardly at all.
  assert faults_default > 30_000, faults_default
  assert faults_reused < faults_default / 10, (faults_reused, faults_default)
