"""Our step and torchvision's, timed in turns, and the ratio of their speeds.

    python benchmarks/compare_cpu.py --mode=train --batch_size=16 --steps=7

Builds `python -m resnext_jax.benchmark`'s step (compiled) and
`benchmarks/torch_reference.py`'s step (warmed up) with the same flags, then times them
in turns, alternating which goes first, and takes the speed ratio (ours / torch) of every
adjacent pair. On a machine shared with other work the load changes from minute to
minute; the median of the pair ratios keeps that out of the comparison far better than
two separate runs would. Flags after `--` go to our benchmark only (e.g.
`-- --conv_impl=xla`); both use every core this process may run on.

By default (`--processes=separate`) each framework runs in a process of its own
(`step_worker.py`), as users run them: ours with the C allocator configured as train.py
configures it (resnext_jax/host_memory.py; unless `-- --no-reuse_freed_memory`),
torchvision's with glibc's and PyTorch's defaults; the two processes take turns, one
step each. `--processes=one` runs both in this process, which then has one allocator
setting (train.py's) and one heap for both, and both frameworks' thread pools
(docs/performance.md has what that changes).
"""

import os
import statistics
import subprocess
import sys

# With --processes=one, both frameworks run with train.py's allocator setting, made by
# `common` before PyTorch, NumPy and JAX start threads (the workers make their own).
from common import model_arguments, time_in_pairs

import step_worker  # pylint: disable=g-import-not-at-top,wrong-import-position
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
  parser.add_argument('--processes', default='separate', choices=('separate', 'one'),
                      help='a process per framework (as users run them), or both in this one')
  args, ours_extra = parser.parse_known_args(argv)
  common = [f'--arch={args.arch}', f'--batch_size={args.batch_size}',
            f'--image_size={args.image_size}', f'--mode={args.mode}',
            f'--dtype={args.dtype}', f'--warmup={args.warmup}']
  ours_argv = common + [a for a in ours_extra if a != '--']
  torch_argv = common + [f'--memory_format={args.torch_memory_format}']
  benchmark.parse_args(ours_argv)  # flag errors before anything is built
  torch_reference.parse_args(torch_argv)
  return args, ours_argv, torch_argv


class Worker:
  """A `step_worker.py` process running one framework's step, one step per request."""

  def __init__(self, framework: str, argv: list[str]):
    self.name = framework
    self.process = subprocess.Popen(
        [sys.executable, os.path.join(os.path.dirname(__file__), 'step_worker.py'),
         framework, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in self.process.stdout:
      if line.strip() == step_worker.READY:
        return
      print(f'[{framework}] {line.rstrip()}', flush=True)
    raise RuntimeError(f'the {framework} worker exited (status {self.process.wait()}) '
                       'before its step was ready; its errors are above')

  def step(self) -> None:
    self.process.stdin.write(step_worker.STEP + '\n')
    self.process.stdin.flush()
    line = self.process.stdout.readline()
    if not line.startswith('step_s='):
      raise RuntimeError(f'the {self.name} worker answered {line!r} (status '
                         f'{self.process.poll()})')

  def close(self) -> None:
    self.process.stdin.close()
    self.process.wait()


def _in_processes(ours_argv, torch_argv, pairs):
  """Times the two steps in worker processes of their own, in turns."""
  workers = [Worker('ours', ours_argv), Worker('torch', torch_argv)]
  try:
    return time_in_pairs({w.name: w.step for w in workers}, pairs,
                         ratio_of=('torch', 'ours'))
  finally:
    for worker in workers:
      worker.close()


def _in_this_process(ours_argv, torch_argv, pairs):
  """Times the two steps in this process (one allocator, one heap), in turns."""
  run_torch = torch_reference.build_step(torch_reference.parse_args(torch_argv))
  ours_args = benchmark.parse_args(ours_argv)
  run_ours, flops, compile_s = benchmark.build_step(ours_args)
  print(f'compile_s={compile_s:.1f} model_gflop_per_step={flops / 1e9:.1f}', flush=True)
  for _ in range(ours_args.warmup):
    run_torch()
    run_ours()
  return time_in_pairs({'ours': run_ours, 'torch': run_torch}, pairs,
                       ratio_of=('torch', 'ours'))


def main(argv=None) -> float:
  args, ours_argv, torch_argv = parse_args(argv)
  print(f'processes={args.processes}', flush=True)
  timed = _in_processes if args.processes == 'separate' else _in_this_process
  times, ratios = timed(ours_argv, torch_argv, args.steps)
  for name, t in times.items():
    print(f'{name}: step_s median={statistics.median(t):.4f} min={min(t):.4f} '
          f'max={max(t):.4f}, images_per_sec={args.batch_size / statistics.median(t):.2f}')
  ratio = statistics.median(ratios)
  print(f'speed ratio ours/torch: median {ratio:.3f} over {len(ratios)} pairs '
        f'(min {min(ratios):.3f}, max {max(ratios):.3f})')
  print(f'ratio={ratio:.3f}')
  return ratio


if __name__ == '__main__':
  main(sys.argv[1:])
