"""Runs our benchmark and the torchvision reference side by side and prints the ratios.

    python benchmarks/compare_cpu.py --mode=train --batch_size=16 --rounds=3

Each round runs `python -m resnext_jax.benchmark` and `benchmarks/torch_reference.py`
one after the other (alternating which goes first), in fresh processes with the same
flags, and reads their `images_per_sec=` lines. On a shared machine the load changes
from minute to minute; taking the ratio within each round and the median over rounds
keeps that noise out of the comparison. Extra flags after `--` go to our benchmark only
(e.g. `-- --conv_impl=xla`).
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='resnext50_32x4d')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--mode', default='train', choices=('train', 'eval'))
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--timeout', type=int, default=1800, help='seconds per run')
  args, ours_extra = parser.parse_known_args(argv)
  return args, [a for a in ours_extra if a != '--']


def images_per_sec(cmd, timeout):
  """Runs `cmd`, echoes its summary lines and returns its images_per_sec."""
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  lines = out.stdout.strip().splitlines()
  match = re.fullmatch(r'images_per_sec=([0-9.]+)', lines[-1]) if lines else None
  if out.returncode or not match:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stdout}\n{out.stderr[-3000:]}')
  for line in lines:
    if line.startswith(('compile_s', 'warmup_s', 'step_s')):
      print('    ' + line)
  return float(match.group(1))


def main(argv=None):
  args, ours_extra = parse_args(argv)
  common = [f'--arch={args.arch}', f'--batch_size={args.batch_size}',
            f'--image_size={args.image_size}', f'--mode={args.mode}',
            f'--steps={args.steps}', f'--dtype={args.dtype}']
  ours_cmd = [sys.executable, '-m', 'resnext_jax.benchmark'] + common + ours_extra
  torch_cmd = [sys.executable, os.path.join(HERE, 'torch_reference.py')] + common
  print('ours: ' + ' '.join(ours_cmd[1:]))
  print('torch: ' + ' '.join(torch_cmd[1:]))
  ratios = []
  for i in range(args.rounds):
    runs = {}
    order = ('ours', 'torch') if i % 2 == 0 else ('torch', 'ours')
    for name in order:
      print(f'round {i + 1} {name} (load average {os.getloadavg()[0]:.1f})', flush=True)
      runs[name] = images_per_sec(ours_cmd if name == 'ours' else torch_cmd, args.timeout)
    ratios.append(runs['ours'] / runs['torch'])
    print(f'round {i + 1}: ours {runs["ours"]:.2f} img/s, torch {runs["torch"]:.2f} img/s, '
          f'ratio {ratios[-1]:.2f}', flush=True)
  print(f'ratios: {" ".join(f"{r:.2f}" for r in ratios)}')
  print(f'ratio_median={statistics.median(ratios):.3f}')


if __name__ == '__main__':
  main(sys.argv[1:])
