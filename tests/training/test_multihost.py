"""Two real processes on this machine train like one process with the same devices."""

import json
import os
import re
import socket
import subprocess

import numpy as np
import pytest

from resnext_jax.data import pipeline
from resnext_jax.training import checkpoints
from tests.helpers import ROOT, leaves, tiny_config, train_command


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices_per_process: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices_per_process}'
  env['JAX_CPU_COLLECTIVES_IMPLEMENTATION'] = 'gloo'
  return env


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  shapes_dir = str(tmp_path / 'shapes')
  pipeline.get_dataset_info(tiny_config(shapes_dir))  # generate and scan once
  steps = 4
  multi = str(tmp_path / 'multi')
  port = _free_port()
  workers = [
      subprocess.Popen(
          train_command(multi, shapes_dir, steps) + [
              f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}'],
          cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [w.communicate(timeout=600)[0] for w in workers]
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output
  assert 'on 4 devices' in outputs[0]
  assert re.search(r'conv_impl=auto -> (native|taps) \(cpu, ', outputs[0])  # the choice, why

  single = str(tmp_path / 'single')
  subprocess.run(train_command(single, shapes_dir, steps), cwd=ROOT, env=_env(4),
                 check=True, capture_output=True, timeout=600)
  for a, b in zip(leaves(checkpoints.load_variables(multi)),
                  leaves(checkpoints.load_variables(single))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with open(os.path.join(multi, 'metrics.jsonl')) as f:
    evals = [json.loads(line) for line in f if 'eval_count' in line]
  assert [(r['step'], r['eval_count']) for r in evals] == [(steps, 500)]
