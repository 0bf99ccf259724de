"""Lets XLA's CPU buffers reuse freed memory instead of faulting in fresh pages every step.

XLA:CPU allocates each execution's scratch buffer (about 2 GB for a ResNeXt-50 train step
at batch 16) with `posix_memalign` from a worker thread. glibc serves a request that large
from a fresh `mmap` and unmaps it on `free`, so every step faults in gigabytes of new
pages, a large share of a CPU step's time (docs/performance.md). Keeping glibc's
allocations in its main heap (one arena, no `mmap`, never trimmed) lets each step reuse
the pages of the one before. Trimming stays off because the heap still grows now and then,
where smaller allocations have taken part of the last step's freed buffer; with a trim
past 2 GiB, the grown part went back to the system and later steps faulted it in again
(13 of 100 steps of a resnext50 train step, 3 s each on a 2-core VM; without trimming, 3
in each of two runs, at the same peak memory; docs/performance.md, "Steps that fault in
fresh memory").

It must run before any library starts threads that allocate (NumPy's BLAS, PyTorch, JAX):
glibc fixes its arena limit when the first extra arena is made, so call it before
importing them (this module imports neither). It only changes how this process's heap
grows and shrinks: freed memory stays with the process instead of going back to the
system. It takes hold in most processes but not all (tests/test_host_memory.py; perhaps
the heap growth above, not confirmed).
"""

import ctypes
import logging
import sys

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
  """Configures glibc's allocator as above; returns False where that is not possible.

  A no-op (False) on systems without glibc (macOS, musl), where allocators differ.
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    # The process's own symbols: glibc's mallopt where the C library is glibc, without
    # ctypes.util.find_library's subprocess at start-up.
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  # A trim threshold of -1 turns trimming off (mallopt(3)).
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
  ok = all(mallopt(param, value) == 1 for param, value in settings)
  if not ok:
    logging.warning('Could not configure the C allocator (mallopt failed); CPU steps '
                    'will page-fault in fresh memory each time.')
  return ok
