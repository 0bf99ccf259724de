"""Builds, caches, loads and registers the C++ kernels of `conv_impl='native'`.

The sources beside this file are compiled once per machine with the system's C++
compiler (`$CXX`, else `c++`, `g++` or `clang++`) against the XLA FFI headers that jaxlib
ships, and cached under `$RESNEXT_JAX_CACHE` (default `~/.cache/resnext_jax`), keyed by
the sources, flags (among them the instruction set), compiler and jaxlib version.

They are built for the widest vectors the CPU has: AVX-512 where /proc/cpuinfo lists
avx512f/bw/dq/vl, else AVX2 + FMA (`vec.h` writes each kernel once for both). The
environment variable `RESNEXT_JAX_CPU_ISA=avx2|avx512` asks for one of them instead
(tests use it to run the AVX2 build on an AVX-512 machine); asking for one the CPU lacks
is an error. They need Linux on x86-64 with at least AVX2 and FMA;
`unavailable_reason()` says what is missing elsewhere. What each kernel does: `calls.py`,
and the comment at the top of each source.
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
from typing import NamedTuple

import jax

from resnext_jax.cache import atomic_file, cache_root

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = tuple(os.path.join(_HERE, name)
                for name in ('grouped_conv.cc', 'stem_conv.cc', 'pointwise_conv.cc',
                             'pointwise_kernel_grad.cc', 'channel_sums.cc', 'conv_tile.h',
                             'ffi_common.h', 'vec.h'))
FLAGS = ('-O3', '-std=c++17', '-shared', '-fPIC')
FORWARD_TARGET = 'resnext_grouped_conv_forward'
KERNEL_GRAD_TARGET = 'resnext_grouped_conv_kernel_grad'
STEM_KERNEL_GRAD_TARGET = 'resnext_stem_conv_kernel_grad'
POINTWISE_TARGET = 'resnext_pointwise_conv'
POINTWISE_KERNEL_GRAD_TARGET = 'resnext_pointwise_conv_kernel_grad'
STEM_NORMALIZED_TARGET = 'resnext_stem_conv_normalized'
CHANNEL_SUMS_TARGET = 'resnext_channel_sums'
ISA_VARIABLE = 'RESNEXT_JAX_CPU_ISA'


class Isa(NamedTuple):
  """An instruction set the kernels build for."""
  name: str                   # as RESNEXT_JAX_CPU_ISA names it
  description: str            # for the run log
  cpu_flags: tuple[str, ...]  # what /proc/cpuinfo must list
  compiler_flags: tuple[str, ...]
  vector_bits: int            # of the widest vectors the kernels then use


# Widest first: the first one the CPU has is the default.
ISAS = (
    Isa('avx512', 'AVX-512', ('avx512f', 'avx512bw', 'avx512dq', 'avx512vl', 'fma'),
        ('-mavx512f', '-mavx512bw', '-mavx512dq', '-mavx512vl', '-mavx2', '-mfma',
         '-mprefer-vector-width=512', '-DRESNEXT_JAX_VECTOR_BITS=512'), 512),
    Isa('avx2', 'AVX2+FMA', ('avx2', 'fma'),
        ('-mavx2', '-mfma', '-DRESNEXT_JAX_VECTOR_BITS=256'), 256),
)


def cpu_flags() -> frozenset[str]:
  """The feature flags /proc/cpuinfo lists (empty where it cannot be read)."""
  try:
    with open('/proc/cpuinfo') as f:
      return frozenset(next((line.split(':', 1)[1].split() for line in f
                             if line.startswith('flags')), []))
  except OSError:
    return frozenset()


def runnable_isas() -> tuple[Isa, ...]:
  """The instruction sets of `ISAS` that this CPU has, widest first."""
  flags = cpu_flags()
  return tuple(isa for isa in ISAS if set(isa.cpu_flags) <= flags)


@functools.cache
def instruction_set() -> Isa | None:
  """The instruction set to build for: `$RESNEXT_JAX_CPU_ISA` if set, else the widest
  the CPU has; None if it has none of them.

  Raises ValueError for a name that is not one of `ISAS`, or one the CPU lacks.
  """
  requested = os.environ.get(ISA_VARIABLE)
  if not requested:
    return next(iter(runnable_isas()), None)
  by_name = {isa.name: isa for isa in ISAS}
  if requested not in by_name:
    raise ValueError(f'{ISA_VARIABLE}={requested!r} is not one of {", ".join(by_name)}; '
                     'unset it to build for the widest instruction set this CPU has.')
  isa = by_name[requested]
  missing = sorted(set(isa.cpu_flags) - cpu_flags())
  if missing:
    raise ValueError(f'{ISA_VARIABLE}={requested} asks for {isa.description}, but this CPU '
                     f'lacks {", ".join(missing)} (/proc/cpuinfo); unset it or choose '
                     f'one of: {", ".join(i.name for i in runnable_isas()) or "none"}.')
  return isa


def _compiler() -> list[str] | None:
  """The compiler command: `$CXX` (which may start with a launcher, e.g. `ccache g++`)
  if set, else the first of c++, g++ and clang++ on the PATH; None if not found."""
  if os.environ.get('CXX'):
    command = shlex.split(os.environ['CXX'])
    return command if command and shutil.which(command[0]) else None
  found = next((shutil.which(c) for c in ('c++', 'g++', 'clang++') if shutil.which(c)), None)
  return [found] if found else None


def _build(compiler: list[str], isa: Isa) -> str:
  """Compiles the kernels for `isa` unless a build for these sources, instruction set
  and toolchain is cached."""
  sources = []
  for path in SOURCES:
    with open(path, 'rb') as f:
      sources.append(f.read())
  flags = (*FLAGS, *isa.compiler_flags)
  key = hashlib.sha256(b'\0'.join([
      *sources, ' '.join(flags).encode(), ' '.join(compiler).encode(),
      importlib.metadata.version('jaxlib').encode()])).hexdigest()[:16]
  library = os.path.join(cache_root(), f'cpu_kernels_{isa.name}_{key}.so')
  if os.path.exists(library):
    return library
  # Build beside the target and rename: processes that build at once never see a
  # partial library.
  with atomic_file(library, mode=0o755) as partial:
    command = [*compiler, *flags, '-isystem', jax.ffi.include_dir(),
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
  isa = instruction_set()
  if isa is None:
    return 'needs a CPU with AVX2 and FMA'
  compiler = _compiler()
  if compiler is None:
    if os.environ.get('CXX'):
      return f'needs a C++ compiler: $CXX is {os.environ["CXX"]!r}, not found on the PATH'
    return 'needs a C++ compiler (set $CXX, or install g++ or clang++)'
  try:
    library = ctypes.cdll.LoadLibrary(_build(compiler, isa))
  except (OSError, RuntimeError, subprocess.SubprocessError) as e:
    return f'could not be built from {", ".join(SOURCES)}: {e}'
  for target, handler in ((FORWARD_TARGET, library.ResnextGroupedConvForward),
                          (KERNEL_GRAD_TARGET, library.ResnextGroupedConvKernelGrad),
                          (STEM_KERNEL_GRAD_TARGET, library.ResnextStemConvKernelGrad),
                          (POINTWISE_TARGET, library.ResnextPointwiseConv),
                          (POINTWISE_KERNEL_GRAD_TARGET, library.ResnextPointwiseKernelGrad),
                          (STEM_NORMALIZED_TARGET, library.ResnextStemConvNormalized),
                          (CHANNEL_SUMS_TARGET, library.ResnextChannelSums)):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform='cpu')
  return None

