"""Which implementation runs the model's ops: the names, and how `'auto'` picks one.

Every convolution, the stem's max pool and the training batch norm's statistics come in
implementations chosen by one name, the model's `conv_impl`. The model resolves it once
(`resolve_impl`) and hands the concrete name to every op; the ops refuse `'auto'`.

* `'xla'`: XLA's own ops (`lax.conv_general_dilated` with `feature_group_count`,
  `lax.reduce_window`), the reference.
* `'taps'`: each op in the form XLA's CPU backend runs fastest, with custom gradients
  where JAX's own are slow there (`ops/conv.py`, `ops/grouped_conv.py`,
  `ops/pooling.py`).
* `'native'` (CPU only): `'taps'`, with the C++ kernels of `kernels/cpu` where they apply:
  grouped convolutions, the stem, the eval-mode 1x1 convolutions fused with their norm
  (`ops/fused_eval.py`), the weight gradients of the smaller 1x1 convolutions, and the
  training batch norm's sums (`ops/norm_stats.py`).
* `'auto'`: per backend, `AUTO_IMPL` below.

| backend | `'auto'`   | why (the measurements: docs/performance.md)                       |
|---------|------------|-------------------------------------------------------------------|
| cpu     | `'native'` | fastest in train and eval steps; `'taps'` where the C++ kernels   |
|         |            | cannot be built, with one log line saying why                     |
| gpu     | `'xla'`    | cuDNN's grouped convolutions beat torchvision's step; `'taps'`    |
|         |            | fails in XLA's GPU compiler                                       |
| tpu     | `'xla'`    | XLA's TPU convolutions handle groups natively (not measured)      |
"""

import functools
import logging
from typing import Callable, Mapping, TypeVar

import jax

from resnext_jax.kernels.cpu import build as cpu_build

IMPLEMENTATIONS = ('xla', 'taps', 'native')

AUTO_IMPL = {'cpu': 'native', 'gpu': 'xla', 'tpu': 'xla'}

_WHY_AUTO = {'gpu': "cuDNN's grouped convolutions", 'tpu': "XLA's grouped convolutions"}

Op = TypeVar('Op', bound=Callable)


@functools.cache
def _warn_native_unavailable():
  """Says once per process why 'auto' runs 'taps' on this CPU."""
  logging.warning("conv_impl 'auto' uses 'taps': the C++ kernel of 'native' %s.",
                  cpu_build.unavailable_reason())


def resolve_impl(impl: str) -> str:
  """Maps a requested implementation name to a concrete one ('auto': per backend).

  Raises ValueError for an unknown name, and for 'native' where it cannot run (another
  backend, or no C++ kernels), naming what to use instead.
  """
  if impl == 'auto':
    impl = AUTO_IMPL.get(jax.default_backend(), 'xla')
    if impl == 'native' and cpu_build.unavailable_reason():
      _warn_native_unavailable()
      return 'taps'
    return impl
  if impl not in IMPLEMENTATIONS:
    known = ', '.join(["'auto'"] + [repr(k) for k in IMPLEMENTATIONS])
    raise ValueError(f'Unknown conv_impl {impl!r}; choose one of {known}.')
  if impl == 'native':
    if jax.default_backend() != 'cpu':
      raise ValueError(f"conv_impl 'native' runs on CPU only; this is a "
                       f"{jax.default_backend()} backend: use 'auto' or 'xla'.")
    reason = cpu_build.unavailable_reason()
    if reason:
      raise ValueError(f"conv_impl 'native' is unavailable here: its C++ kernel "
                       f"{reason}. Use 'taps' instead.")
  return impl


def describe_choice(requested: str) -> str:
  """What `requested` resolves to here and why, for the run log:
  e.g. "auto -> native (cpu, C++ kernels for AVX-512)"."""
  chosen = resolve_impl(requested)
  backend = jax.default_backend()
  if chosen == 'native':
    why = f'{backend}, C++ kernels for {cpu_build.instruction_set().description}'
  elif requested == 'auto' and backend == 'cpu':
    why = f"{backend}, 'native' unavailable: its C++ kernel {cpu_build.unavailable_reason()}"
  elif requested == 'auto':
    why = f"{backend}, {_WHY_AUTO.get(backend, 'the reference')}"
  else:
    why = f'{backend}, as configured'
  return f'{requested} -> {chosen} ({why})'


def select(table: Mapping[str, Op], impl: str, op: str) -> Op:
  """`table[impl]`, refusing a name that was not resolved first."""
  if impl not in table:
    raise ValueError(f'{op}: implementation {impl!r} is not one of {sorted(table)}; '
                     "resolve 'auto' first with resnext_jax.ops.impl.resolve_impl.")
  return table[impl]
