"""Builds, caches, loads and registers the C++ kernels of `conv_impl='native'`.

The sources beside this file are compiled once per machine with the system's C++
compiler (`$CXX`, else `c++`, `g++` or `clang++`) against the XLA FFI headers that jaxlib
ships, and cached under `$RESNEXT_JAX_CACHE` (default `~/.cache/resnext_jax`), keyed by
the sources, flags, compiler and jaxlib version. It needs Linux on x86-64 with AVX2 and
FMA; `unavailable_reason()` says what is missing elsewhere. What each kernel does:
`calls.py`, and the comment at the top of each source.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import platform
import shlex
import shutil
import subprocess

import jax

from resnext_jax.cache import atomic_file, cache_root

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, name)
                for name in ('grouped_conv.cc', 'stem_conv.cc', 'pointwise_conv.cc',
                             'channel_sums.cc', 'conv_tile.h', 'ffi_common.h'))
FLAGS = ('-O3', '-mavx2', '-mfma', '-std=c++17', '-shared', '-fPIC')
FORWARD_TARGET = 'resnext_grouped_conv_forward'
KERNEL_GRAD_TARGET = 'resnext_grouped_conv_kernel_grad'
STEM_KERNEL_GRAD_TARGET = 'resnext_stem_conv_kernel_grad'
POINTWISE_TARGET = 'resnext_pointwise_conv'
STEM_NORMALIZED_TARGET = 'resnext_stem_conv_normalized'
CHANNEL_SUMS_TARGET = 'resnext_channel_sums'
# The vector instructions the kernels are written for (named in the run log).
INSTRUCTION_SET = 'AVX2+FMA'


def _cpu_has_avx2_fma() -> bool:
  try:
    with open('/proc/cpuinfo') as f:
      flags = next((line.split(':', 1)[1].split() for line in f
                    if line.startswith('flags')), [])
  except OSError:
    return False
  return 'avx2' in flags and 'fma' in flags


def _compiler() -> list[str] | None:
  """The compiler command: `$CXX` (which may start with a launcher, e.g. `ccache g++`)
  if set, else the first of c++, g++ and clang++ on the PATH; None if not found."""
  if os.environ.get('CXX'):
    command = shlex.split(os.environ['CXX'])
    return command if command and shutil.which(command[0]) else None
  found = next((shutil.which(c) for c in ('c++', 'g++', 'clang++') if shutil.which(c)), None)
  return [found] if found else None


def _build(compiler: list[str]) -> str:
  """Compiles the kernels unless a build for these sources and toolchain is cached."""
  sources = []
  for path in SOURCES:
    with open(path, 'rb') as f:
      sources.append(f.read())
  key = hashlib.sha256(b'\0'.join([
      *sources, ' '.join(FLAGS).encode(), ' '.join(compiler).encode(),
      importlib.metadata.version('jaxlib').encode()])).hexdigest()[:16]
  library = os.path.join(cache_root(), f'cpu_kernels_{key}.so')
  if os.path.exists(library):
    return library
  # Build beside the target and rename: processes that build at once never see a
  # partial library.
  with atomic_file(library, mode=0o755) as partial:
    command = [*compiler, *FLAGS, '-isystem', jax.ffi.include_dir(),
               *(path for path in SOURCES if path.endswith('.cc')), '-o', partial]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      errors = [line for line in result.stderr.splitlines() if 'error' in line]
      raise RuntimeError(f'{" ".join(command)} failed:\n'
                         + '\n'.join(errors[:5] or result.stderr.splitlines()[-5:]))
  return library


@functools.cache
def unavailable_reason() -> str | None:
  """None once the kernel is compiled, loaded and registered with XLA; else why not."""
  if platform.system() != 'Linux' or platform.machine() not in ('x86_64', 'AMD64'):
    return f'needs Linux on x86-64 (this is {platform.system()} on {platform.machine()})'
  if not _cpu_has_avx2_fma():
    return 'needs a CPU with AVX2 and FMA'
  compiler = _compiler()
  if compiler is None:
    if os.environ.get('CXX'):
      return f'needs a C++ compiler: $CXX is {os.environ["CXX"]!r}, not found on the PATH'
    return 'needs a C++ compiler (set $CXX, or install g++ or clang++)'
  try:
    library = ctypes.cdll.LoadLibrary(_build(compiler))
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return f'could not be built from {", ".join(SOURCES)}: {e}'
  for target, handler in ((FORWARD_TARGET, library.ResnextGroupedConvForward),
                          (KERNEL_GRAD_TARGET, library.ResnextGroupedConvKernelGrad),
                          (STEM_KERNEL_GRAD_TARGET, library.ResnextStemConvKernelGrad),
                          (POINTWISE_TARGET, library.ResnextPointwiseConv),
                          (STEM_NORMALIZED_TARGET, library.ResnextStemConvNormalized),
                          (CHANNEL_SUMS_TARGET, library.ResnextChannelSums)):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform='cpu')
  return None

