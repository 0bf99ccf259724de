"""What the benchmark scripts share: the allocator setting, the model flags, tracing a
model from shapes, and two ways of timing candidates against each other.

Run the scripts from a checkout with the package installed (`pip install -e .`), e.g.
`python benchmarks/compare_cpu.py`; each imports this module first, so that the C
allocator is configured as train.py configures it before NumPy, JAX or PyTorch start
threads (resnext_jax/host_memory.py says why), unless `--no-reuse_freed_memory` is given.
"""

import argparse
import os
import statistics
import sys
import time

from resnext_jax import host_memory

if '--no-reuse_freed_memory' not in sys.argv:
  host_memory.reuse_freed_memory()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from resnext_jax.model import resnext  # pylint: disable=g-import-not-at-top,wrong-import-position


def model_arguments(doc: str) -> argparse.ArgumentParser:
  """A parser described by `doc`'s first line, with the model's flags: --arch,
  --batch_size, --image_size."""
  parser = argparse.ArgumentParser(description=doc.split('\n')[0])
  parser.add_argument('--arch', default='resnext50_32x4d', choices=sorted(resnext.ARCHS))
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  return parser


def abstract_model(arch, conv_impl, batch_size, image_size):
  """`(model, images, variables)`, the last two as shapes only: for tracing, not running."""
  model = resnext.create_model(arch, conv_impl=conv_impl)
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  return model, images, variables


def time_round_robin(candidates, rounds):
  """Median seconds of each zero-argument callable, timed in turns after one warm-up."""
  for fn in candidates.values():
    fn()
  times = {name: [] for name in candidates}
  for _ in range(rounds):
    for name, fn in candidates.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def time_in_pairs(runs, pairs, ratio_of):
  """Times two zero-argument callables (`{name: run}`, already warm) in `pairs` pairs,
  the first going first in even pairs and second in odd ones, and prints each pair.

  Returns `(times, ratios)`: each name's seconds per run, and per pair the time of
  `ratio_of[0]` over that of `ratio_of[1]` (their speed ratio). A pair's two runs see
  nearly the same load, so the median ratio is far steadier on a busy machine than two
  separately timed medians.
  """
  times = {name: [] for name in runs}
  ratios = []
  for i in range(pairs):
    order = list(runs.items())
    for name, run in (order if i % 2 == 0 else order[::-1]):
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
    ratios.append(times[ratio_of[0]][-1] / times[ratio_of[1]][-1])
    print(f'pair {i + 1}: ' + ', '.join(f'{name} {t[-1]:.3f} s' for name, t in times.items())
          + f', ratio {ratios[-1]:.2f} (load average {os.getloadavg()[0]:.1f})', flush=True)
  return times, ratios
