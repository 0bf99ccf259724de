"""`python -m resnext_jax.benchmark` runs where only jax, flax, optax and numpy are installed.

A GPU machine may have nothing else, so the benchmark is run in a subprocess in which
every other dependency of the project fails to import, as if it were not installed.
"""

import os
import re
import subprocess
import sys

import pytest

NOT_INSTALLED = ('clu', 'tensorflow', 'tensorflow_datasets', 'orbax', 'ml_collections',
                 'grain', 'array_record', 'tensorboard', 'torch', 'torchvision', 'PIL')

# Runs the benchmark's __main__ with the modules above refusing to import.
RUNNER = f'''
import runpy, sys

class NotInstalled:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in {NOT_INSTALLED!r}:
      raise ModuleNotFoundError(f'{{name}} is not installed (blocked by the test)',
                                name=name)

sys.meta_path.insert(0, NotInstalled())
sys.argv = ['resnext_jax.benchmark'] + sys.argv[1:]
runpy.run_module('resnext_jax.benchmark', run_name='__main__', alter_sys=True)
'''


def run_benchmark(*flags: str) -> str:
  # CPU even where a GPU jaxlib is installed: the test checks the CPU default's choice.
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(
      [sys.executable, '-c', RUNNER, '--arch=resnext50_32x4d', '--batch_size=2',
       '--image_size=32', '--num_classes=10', '--steps=2', '--warmup=0', *flags],
      capture_output=True, text=True, env=env, timeout=900, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  return result.stdout


def test_eval_benchmark_needs_only_jax_flax_optax_numpy():
  out = run_benchmark('--mode=eval', '--conv_impl=xla')
  assert 'devices: 2 x cpu' in out
  assert re.search(r'^model_gflop_per_step=\d+\.\d', out, re.M), out
  last_line = out.strip().splitlines()[-1]
  assert re.fullmatch(r'images_per_sec=\d+\.\d+', last_line), last_line
  assert float(last_line.split('=')[1]) > 0


@pytest.mark.slow
def test_train_benchmark_with_the_cpu_default_needs_only_jax_flax_optax_numpy():
  out = run_benchmark('--mode=train', '--conv_impl=auto')
  assert 'conv_impl=auto (-> native)' in out
  assert re.search(r'^step_s median=\d', out, re.M), out
  assert re.fullmatch(r'images_per_sec=\d+\.\d+', out.strip().splitlines()[-1])


def test_the_guard_does_block():
  """The runner's guard really refuses a blocked module (else the tests above prove nothing)."""
  probe = RUNNER.split('sys.argv')[0] + 'import clu.metrics\n'
  result = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode != 0
  assert 'clu is not installed (blocked by the test)' in result.stderr


@pytest.mark.slow
def test_end_to_end_runs_the_trainer_loop_against_the_step_alone():
  """The end-to-end mode may load the input pipeline, so it runs without the guard."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  result = subprocess.run(
      [sys.executable, '-m', 'resnext_jax.benchmark', '--mode=end_to_end',
       '--arch=resnext50_32x4d', '--batch_size=4', '--image_size=32', '--num_classes=10',
       '--steps=2', '--warmup=1', '--num_files=12'],
      capture_output=True, text=True, env=env, timeout=900, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.strip().splitlines()
  assert re.match(r'end_to_end_images_per_sec=\d+\.\d+ \(steps 3-4 of the trainer loop; '
                  r'time shares: input \d\.\d{3}, step', lines[-4]), lines[-4]
  assert re.fullmatch(r'synthetic_images_per_sec=\d+\.\d+', lines[-3])
  share = float(re.fullmatch(r'input_wait_share=(\d\.\d+)', lines[-2])[1])
  ratio = float(re.fullmatch(r'ratio=(\d+\.\d+)', lines[-1])[1])
  assert 0 <= share <= 1 and ratio > 0


@pytest.mark.slow
@pytest.mark.parametrize('processes', ['separate', 'one'])
def test_compare_cpu_times_both_frameworks_in_turns(processes):
  """benchmarks/compare_cpu.py: by default each framework in a worker process of its own
  (whose set-up lines it relays), or both in one process."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='')
  result = subprocess.run(
      [sys.executable, os.path.join(root, 'benchmarks', 'compare_cpu.py'), '--mode=eval',
       '--batch_size=2', '--image_size=32', '--steps=2', '--warmup=1',
       f'--processes={processes}'],
      capture_output=True, text=True, env=env, cwd=root, timeout=900, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[0] == f'processes={processes}'
  assert any(line.startswith('[torch] device: cpu') for line in lines) == (
      processes == 'separate'), lines
  assert sum(line.startswith('pair ') for line in lines) == 2
  assert float(re.fullmatch(r'ratio=(\d+\.\d+)', lines[-1])[1]) > 0
