"""Two real processes on this machine (gloo collectives, 2 CPU devices each, 127.0.0.1):
they train like one process, and survive the faults of a pod: SIGTERM on one host, a
host killed, a host that stops stepping, hosts that see different checkpoints."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from resnext_jax.data import pipeline
from resnext_jax.training import checkpoints, watchdog
from tests.helpers import ROOT, leaves, stalled_image_folder, tiny_config, train_command

STEPS = 20
# The faults' tests name the timeouts, so a dead process is noticed in seconds.
HEARTBEAT_SECS = 10


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices_per_process: int) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices_per_process}'
  env['JAX_CPU_COLLECTIVES_IMPLEMENTATION'] = 'gloo'
  return env


def _launch(workdirs, shapes_dir, extra=(), steps=STEPS):
  """Starts process 0 and 1 of one run (`workdirs`: one path, or one per process)."""
  port = _free_port()
  workdirs = [workdirs] * 2 if isinstance(workdirs, str) else workdirs
  return [
      subprocess.Popen(
          train_command(workdirs[i], shapes_dir, steps) + [
              f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={i}', f'--heartbeat_timeout_secs={HEARTBEAT_SECS}',
              '--initialization_timeout_secs=120', '--shutdown_timeout_secs=60',
              '--config.log_every_steps=1', '--config.checkpoint_every_steps=5',
              '--config.keep_checkpoints=100', *extra],
          cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def _finish(workers, timeout=600):
  return [w.communicate(timeout=timeout)[0] for w in workers]


def _wait_for_file_lines(path, lines, workers, seconds=300):
  deadline = time.time() + seconds
  while time.time() < deadline and all(w.poll() is None for w in workers):
    if os.path.exists(path) and len(open(path).readlines()) >= lines:
      return
    time.sleep(0.05)
  raise AssertionError(f'{path} did not reach {lines} lines')


def _assert_bitwise_equal(workdir_a, workdir_b):
  for a, b in zip(leaves(checkpoints.load_variables(workdir_a)),
                  leaves(checkpoints.load_variables(workdir_b))):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  shapes = str(tmp_path_factory.mktemp('shapes'))
  pipeline.get_dataset_info(tiny_config(shapes))  # generate and scan once
  return shapes


@pytest.fixture(scope='module')
def uninterrupted(shapes_dir, tmp_path_factory):
  """The workdir and outputs of an uninterrupted two-process run."""
  workdir = str(tmp_path_factory.mktemp('uninterrupted') / 'run')
  workers = _launch(workdir, shapes_dir)
  outputs = _finish(workers)
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
  return workdir, outputs


@pytest.mark.slow
def test_two_processes_train_like_one(shapes_dir, uninterrupted, tmp_path):
  multi, outputs = uninterrupted
  assert 'on 4 devices' in outputs[0]
  assert re.search(r'conv_impl=auto -> (native|taps) \(cpu, ', outputs[0])  # the choice, why
  single = str(tmp_path / 'single')
  subprocess.run(train_command(single, shapes_dir, 5), cwd=ROOT, env=_env(4),
                 check=True, capture_output=True, timeout=600)
  # After 5 steps: later, the sums' different order over processes grows chaotically.
  for a, b in zip(leaves(checkpoints.load_variables(os.path.join(multi, 'checkpoints', '5'))),
                  leaves(checkpoints.load_variables(single))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with open(os.path.join(multi, 'metrics.jsonl')) as f:
    evals = [json.loads(line) for line in f if 'eval_count' in line]
  assert [(r['step'], r['eval_count']) for r in evals] == [(STEPS, 500)]


@pytest.mark.slow
def test_sigterm_to_one_process_saves_one_step_everywhere_and_resumes_bitwise(
    shapes_dir, uninterrupted, tmp_path):
  workdir = str(tmp_path / 'run')
  workers = _launch(workdir, shapes_dir)
  _wait_for_file_lines(os.path.join(workdir, 'metrics.jsonl'), 3, workers)
  workers[1].send_signal(signal.SIGTERM)  # the preemption notice reaches one host
  outputs = _finish(workers)
  saved = []
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-3000:]
    saved += re.findall(r'SIGTERM received: saved a checkpoint at step (\d+)', output)
  assert len(saved) == 2 and saved[0] == saved[1], outputs[0][-2000:]
  assert int(saved[0]) < STEPS

  outputs = _finish(_launch(workdir, shapes_dir))
  assert f'Resumed from {workdir}/checkpoints/{saved[0]}' in outputs[0]
  _assert_bitwise_equal(workdir, uninterrupted[0])


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_both_resume_bitwise(
    shapes_dir, uninterrupted, tmp_path):
  workdir = str(tmp_path / 'run')
  workers = _launch(workdir, shapes_dir)
  _wait_for_file_lines(os.path.join(workdir, 'metrics.jsonl'), 7, workers)  # saved step 5
  workers[1].kill()
  killed_at = time.monotonic()
  survivor = workers[0].communicate(timeout=300)[0]
  took = time.monotonic() - killed_at
  workers[1].wait()
  assert workers[0].returncode != 0
  said = [line for line in survivor.splitlines()
          if re.search(r'heartbeat|died|terminat|UNAVAILABLE|ABORTED|error', line, re.I)]
  print(f'\nsurvivor exited {workers[0].returncode} {took:.1f} s after kill -9 of its peer '
        f'(heartbeat timeout {HEARTBEAT_SECS} s), saying:\n' + '\n'.join(said[:4]))
  assert took < 120

  outputs = _finish(_launch(workdir, shapes_dir))
  assert re.search(rf'Resumed from {workdir}/checkpoints/\d+', outputs[0])
  _assert_bitwise_equal(workdir, uninterrupted[0])


@pytest.mark.slow
def test_a_process_that_stops_stepping_is_stopped_by_its_watchdog(tmp_path):
  stalled = stalled_image_folder(str(tmp_path / 'images'), str(tmp_path / 'cache'))
  workers = _launch(str(tmp_path / 'run'), '', stalled + ['--config.watchdog_secs=20'])
  started = time.monotonic()
  outputs = _finish(workers, timeout=300)
  took = time.monotonic() - started
  codes = [w.returncode for w in workers]
  print(f'\nexit statuses {codes} {took:.1f} s after the start (watchdog limit 20 s)')
  assert all(code != 0 for code in codes)
  assert watchdog.EXIT_STATUS in codes
  assert any(re.search(r'File ".*image_folder\.py", line \d+ in read', o) for o in outputs)


@pytest.mark.slow
def test_processes_that_see_different_checkpoints_stop_with_one_error(
    shapes_dir, uninterrupted, tmp_path):
  own = str(tmp_path / 'host0')  # as if the workdir were on each host's local disk
  shutil.copytree(uninterrupted[0], own)
  started = time.monotonic()
  workers = _launch([own, str(tmp_path / 'host1')], shapes_dir)
  outputs = _finish(workers, timeout=300)
  print(f'\nboth stopped {time.monotonic() - started:.1f} s after the start')
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 1, output[-3000:]
    assert re.search(r'error: The processes of this run see different things.*\n  checkpoint '
                     r'steps in WORKDIR/checkpoints: process 0 sees \[5, 10, 15, 20\], '
                     r'process 1 sees \[\]\n', output), output[-3000:]
