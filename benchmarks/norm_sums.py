"""Training batch norm sums: the one-pass C++ kernel ('native') against XLA's reductions.

    python benchmarks/norm_sums.py --arch=resnext50_32x4d --batch_size=16

The tensors are the inputs of the train-mode model's batch norms, recorded while tracing
it. For each distinct shape it times, in turns, the forward pair (sums of x and x * x)
and the backward pair (of g and g * x), each as one `kernels.cpu.calls.channel_sums` call and
as XLA's two reductions, and weights each shape by how often it occurs. With
`--step_pairs=N` it then times the whole train step (`python -m resnext_jax.benchmark`'s)
compiled with XLA's reductions and with the kernel, in N alternating pairs, and prints
the median ratio of their speeds.
"""

import collections
import statistics
import sys

from common import abstract_model, model_arguments, time_in_pairs, time_round_robin  # sets the allocator first

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from resnext_jax import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnext_jax.kernels.cpu import build as cpu_build, calls as cpu_calls  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnext_jax.ops import norm_stats  # pylint: disable=g-import-not-at-top,wrong-import-position

PIXELS = (0, 1, 2)


def parse_args(argv):
  parser = model_arguments(__doc__)
  parser.add_argument('--rounds', type=int, default=9, help='timed turns per candidate')
  parser.add_argument('--step_pairs', type=int, default=0,
                      help='then time the whole train step with and without the kernel, '
                           'in this many alternating pairs')
  return parser.parse_args(argv)


def norm_input_shapes(arch, batch_size, image_size):
  """Shapes of the train-mode model's batch-norm inputs, with their counts."""
  model, images, variables = abstract_model(arch, 'native', batch_size, image_size)
  shapes = collections.Counter()
  original = norm_stats.moments

  def record(x, impl):
    shapes[x.shape] += 1
    return original(x, impl)

  norm_stats.moments = record
  try:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']),
                   variables, images)
  finally:
    norm_stats.moments = original
  return shapes


CANDIDATES = {
    'fwd kernel': jax.jit(lambda x, g: cpu_calls.channel_sums(x)),
    'fwd xla': jax.jit(lambda x, g: (jnp.sum(x, PIXELS), jnp.sum(x * x, PIXELS))),
    'bwd kernel': jax.jit(lambda x, g: cpu_calls.channel_sums(g, x)),
    'bwd xla': jax.jit(lambda x, g: (jnp.sum(g, PIXELS), jnp.sum(g * x, PIXELS))),
}


def main(argv):
  args = parse_args(argv)
  reason = cpu_build.unavailable_reason()  # builds the kernels
  if reason:
    sys.exit(f'The C++ kernels {reason}.')
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
  if args.step_pairs:
    compare_train_steps(args)


def compare_train_steps(args):
  """The train step compiled with XLA's reductions and with the kernel, timed in turns."""
  step_args = benchmark.parse_args([f'--arch={args.arch}', f'--batch_size={args.batch_size}',
                                    f'--image_size={args.image_size}', '--mode=train',
                                    '--conv_impl=native'])
  with_kernel = norm_stats.uses_kernel
  norm_stats.uses_kernel = lambda x, impl: False
  try:
    steps = {'xla': benchmark.build_step(step_args)[0]}
  finally:
    norm_stats.uses_kernel = with_kernel
  steps['kernel'] = benchmark.build_step(step_args)[0]
  for run in steps.values():
    run()
  times, ratios = time_in_pairs(steps, args.step_pairs, ratio_of=('xla', 'kernel'))
  print(f'train step: xla median {statistics.median(times["xla"]):.3f} s, kernel median '
        f'{statistics.median(times["kernel"]):.3f} s; speedup median '
        f'{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}) '
        f'over {args.step_pairs} pairs')


if __name__ == '__main__':
  main(sys.argv[1:])
