"""Training batch norm sums: the one-pass C++ kernel ('native') against XLA's reductions.

    python benchmarks/norm_sums.py --arch=resnext50_32x4d --batch_size=16

The tensors are the inputs of the train-mode model's batch norms, recorded while tracing
it. For each distinct shape it times, in turns, the forward pair (sums of x and x * x)
and the backward pair (of g and g * x), each as one `cpu_kernels.channel_sums` call and
as XLA's two reductions; the last line weights each shape by how often it occurs.
"""

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from resnext_jax import host_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == '__main__':
  host_memory.reuse_freed_memory()  # as train.py does (see conv_layers.py)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from conv_layers import time_round_robin  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnext_jax import cpu_kernels, models, norm_sums  # pylint: disable=g-import-not-at-top,wrong-import-position

PIXELS = (0, 1, 2)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='resnext50_32x4d', choices=sorted(models.ARCHS))
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--rounds', type=int, default=9, help='timed turns per candidate')
  return parser.parse_args(argv)


def norm_input_shapes(arch, batch_size, image_size):
  """Shapes of the train-mode model's batch-norm inputs, with their counts."""
  model = models.create_model(arch, conv_impl='native')
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  shapes = collections.Counter()
  original = norm_sums.moments

  def record(x, impl):
    shapes[x.shape] += 1
    return original(x, impl)

  norm_sums.moments = record
  try:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
                   variables, images)
  finally:
    norm_sums.moments = original
  return shapes


CANDIDATES = {
    'fwd kernel': jax.jit(lambda x, g: cpu_kernels.channel_sums(x)),
    'fwd xla': jax.jit(lambda x, g: (jnp.sum(x, PIXELS), jnp.sum(x * x, PIXELS))),
    'bwd kernel': jax.jit(lambda x, g: cpu_kernels.channel_sums(g, x)),
    'bwd xla': jax.jit(lambda x, g: (jnp.sum(g, PIXELS), jnp.sum(g * x, PIXELS))),
}


def main(argv):
  args = parse_args(argv)
  cpu_kernels._require()  # pylint: disable=protected-access
  print(f'{args.arch}, batch {args.batch_size} at {args.image_size}, float32, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}; ms, median of {args.rounds}')
  print('| norm input | count | ' + ' | '.join(CANDIDATES) + ' |')
  print('|---|---:|' + '---:|' * len(CANDIDATES))
  totals = collections.Counter()
  rng = np.random.default_rng(0)
  for shape, count in norm_input_shapes(args.arch, args.batch_size, args.image_size).items():
    x, g = (jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(2))
    result = time_round_robin(
        {name: (lambda f=fn: jax.block_until_ready(f(x, g))) for name, fn in CANDIDATES.items()},
        args.rounds)
    for name, seconds in result.items():
      totals[name] += count * seconds
    print(f'| {"x".join(map(str, shape))} | {count} | '
          + ' | '.join(f'{result[name] * 1e3:.2f}' for name in CANDIDATES) + ' |', flush=True)
  print('| weighted total | | ' + ' | '.join(f'{totals[name] * 1e3:.0f}' for name in CANDIDATES)
        + ' |')
  print(f'speedup: forward {totals["fwd xla"] / totals["fwd kernel"]:.2f}, '
        f'backward {totals["bwd xla"] / totals["bwd kernel"]:.2f}')


if __name__ == '__main__':
  main(sys.argv[1:])
