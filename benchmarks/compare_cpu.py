"""Our step and torchvision's, timed in turns in one process, and the ratio of their speeds.

    python benchmarks/compare_cpu.py --mode=train --batch_size=16 --steps=7

Builds `python -m resnext_jax.benchmark`'s step (compiled) and
`benchmarks/torch_reference.py`'s step (warmed up) with the same flags, then times them
in turns, alternating which goes first, and takes the speed ratio (ours / torch) of every
adjacent pair. On a machine shared with other work the load changes from minute to
minute; the median of the pair ratios keeps that out of the comparison far better than
two separate runs would. Flags after `--` go to our benchmark only (e.g.
`-- --conv_impl=xla`); both use every core this process may run on, and both run with
the C allocator configured as train.py configures it (resnext_jax/host_memory.py; one
process has one allocator), unless `-- --no-reuse_freed_memory`.
"""

import statistics
import sys

# One process, one C allocator: both frameworks run with train.py's setting, made by
# `common` before PyTorch, NumPy and JAX start threads.
from common import model_arguments, time_in_pairs

import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnext_jax import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv):
  parser = model_arguments(__doc__)
  parser.add_argument('--mode', default='train', choices=('train', 'eval'))
  parser.add_argument('--steps', type=int, default=7, help='timed pairs of steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps of each first')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--torch_memory_format', default='channels_last',
                      choices=('channels_last', 'contiguous'),
                      help="torchvision's tensor layout (channels_last is its faster one here)")
  args, ours_extra = parser.parse_known_args(argv)
  common = [f'--arch={args.arch}', f'--batch_size={args.batch_size}',
            f'--image_size={args.image_size}', f'--mode={args.mode}',
            f'--dtype={args.dtype}']
  ours_args = benchmark.parse_args(common + [a for a in ours_extra if a != '--'])
  return args, ours_args, torch_reference.parse_args(
      common + [f'--memory_format={args.torch_memory_format}'])


def main(argv=None) -> float:
  args, ours_args, torch_args = parse_args(argv)
  run_torch = torch_reference.build_step(torch_args)
  run_ours, flops, compile_s = benchmark.build_step(ours_args)
  print(f'compile_s={compile_s:.1f}', flush=True)
  for _ in range(args.warmup):
    run_torch()
    run_ours()
  times, ratios = time_in_pairs({'ours': run_ours, 'torch': run_torch}, args.steps,
                                ratio_of=('torch', 'ours'))
  for name, t in times.items():
    print(f'{name}: step_s median={statistics.median(t):.4f} min={min(t):.4f} '
          f'max={max(t):.4f}, images_per_sec={args.batch_size / statistics.median(t):.2f}')
  benchmark.report_flops(flops, statistics.median(times['ours']), args.dtype)
  ratio = statistics.median(ratios)
  print(f'speed ratio ours/torch: median {ratio:.3f} over {len(ratios)} pairs '
        f'(min {min(ratios):.3f}, max {max(ratios):.3f})')
  print(f'ratio={ratio:.3f}')
  return ratio


if __name__ == '__main__':
  main(sys.argv[1:])
