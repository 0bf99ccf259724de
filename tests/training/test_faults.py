"""Faults of one process, with real processes and signals: the step watchdog's rules (its
real stall is in test_multihost.py), kill -9 during an asynchronous save, an unreadable
latest checkpoint, SIGTERM before training and during evaluation, and the mistakes a user
can make in the command."""

import glob
import os
import signal
import subprocess
import time

import pytest

from resnext_jax.data import pipeline
from resnext_jax.training import checkpoints, distributed, trainer, watchdog
from tests.helpers import ROOT, read_metrics, tiny_config, train_command


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


# ----------------------------------------------------------------------------------------
# The watchdog's rules, on its own thread with a recording stall handler.


def _wait_for(condition, seconds):
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline and not condition():
    time.sleep(0.05)
  return condition()


def test_watchdog_automatic_limit_arms_after_timed_steps_and_respects_its_floor():
  dog = watchdog.StepWatchdog(step_factor=3, min_secs=0.4, fixed_secs=0)
  for _ in range(watchdog.STEPS_BEFORE_AUTOMATIC_LIMIT - 1):
    dog.progress()
  assert dog.limit() is None  # the first steps compile: not judged yet
  dog.progress()
  assert dog.limit() == 0.4  # 3 x a tiny median is below the floor
  off = watchdog.StepWatchdog(step_factor=0, min_secs=1, fixed_secs=0)
  assert not off.enabled


def test_watchdog_fires_on_a_stall_but_not_while_paused_or_progressing():
  stalls = []
  dog = watchdog.StepWatchdog(step_factor=0, min_secs=0, fixed_secs=1.0,
                              on_stall=stalls.append)
  with dog:
    for _ in range(6):  # progress every 0.3 s keeps it quiet
      time.sleep(0.3)
      dog.progress()
    with dog.paused():
      time.sleep(1.6)
    assert not stalls
    assert _wait_for(lambda: stalls, 5)
  assert 'no training step or evaluation batch finished' in stalls[0]
  assert f'exits with status {watchdog.EXIT_STATUS}' in stalls[0]


# ----------------------------------------------------------------------------------------
# Checkpoints.


@pytest.mark.slow
def test_kill_9_during_an_async_save_keeps_the_previous_checkpoint(shapes_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  # A wide head (20,000 classes) makes each save write ~10 MB, long enough to be caught.
  command = lambda steps: train_command(workdir, shapes_dir, steps) + [
      '--config.num_classes=20000', '--config.checkpoint_every_steps=1',
      '--config.keep_checkpoints=100']
  process = subprocess.Popen(command(200), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  partial = lambda: [p for p in glob.glob(os.path.join(ckpt_dir, '*'))
                     if 'tmp' in os.path.basename(p)]
  try:
    # Wait until at least one save completed and another is being written.
    assert _wait_for(lambda: process.poll() is None and partial() and any(
        n.isdigit() for n in os.listdir(ckpt_dir)), 240), 'no save in progress was seen'
    process.kill()
  finally:
    process.wait()
  left = partial()
  complete = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert left, 'the kill came after the save finished; nothing to test'
  rerun = subprocess.run(command(complete[-1] + 2), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'Resumed from {ckpt_dir}/{complete[-1]}' in rerun.stderr
  assert not partial(), 'the interrupted save was not cleaned up'


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(shapes_dir, tmp_path,
                                                                       caplog):
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(tiny_config(shapes_dir), workdir)  # saves steps 3 and 6
  data_files = [p for p in glob.glob(os.path.join(workdir, 'checkpoints', '6', 'state', '**'),
                                     recursive=True)
                if os.path.isfile(p) and '/d/' in p]
  assert data_files
  for path in data_files:
    with open(path, 'r+b') as f:
      f.write(b'\0' * 64)  # the array data overwritten, the metadata intact
  caplog.set_level('INFO')
  trainer.train_and_evaluate(tiny_config(shapes_dir, num_train_steps=9), workdir)
  messages = '\n'.join(r.getMessage() for r in caplog.records)
  assert f'Skipping checkpoint {workdir}/checkpoints/6, which cannot be read' in messages
  assert f'Resumed from {workdir}/checkpoints/3' in messages
  assert os.path.isdir(os.path.join(workdir, checkpoints.UNREADABLE_DIR, '6'))  # kept aside
  assert checkpoints.TrainingCheckpoints(workdir).latest_step() == 9


# ----------------------------------------------------------------------------------------
# SIGTERM outside the train steps.


def test_sigterm_before_training_stops_at_once(shapes_dir, tmp_path, monkeypatch):
  real = pipeline.get_dataset_info

  def preempted_while_preparing(config):
    info = real(config)
    os.kill(os.getpid(), signal.SIGTERM)
    return info

  monkeypatch.setattr(pipeline, 'get_dataset_info', preempted_while_preparing)
  with pytest.raises(distributed.Preempted, match='before training started'):
    trainer.train_and_evaluate(tiny_config(shapes_dir), str(tmp_path / 'run'))
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_sigterm_in_the_final_evaluation_is_finished_by_the_rerun(shapes_dir, tmp_path,
                                                                   monkeypatch):
  workdir = str(tmp_path / 'run')
  real = pipeline.create_eval_iterator

  def preempted_after_one_batch(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(pipeline, 'create_eval_iterator', preempted_after_one_batch)
  config = tiny_config(shapes_dir, eval_every_steps=100)  # evaluates at the last step only
  assert trainer.train_and_evaluate(config, workdir) == {'stopped_at_step': 6}
  assert not [r for r in read_metrics(workdir) if 'eval_top1' in r]
  assert checkpoints.TrainingCheckpoints(workdir).latest_step() == 6

  monkeypatch.setattr(pipeline, 'create_eval_iterator', real)
  final = trainer.train_and_evaluate(config, workdir)
  evals = [r for r in read_metrics(workdir) if 'eval_top1' in r]
  assert [r['step'] for r in evals] == [6] and final['eval_count'] == 500
  assert not [r for r in read_metrics(workdir) if r['step'] > 6]


# ----------------------------------------------------------------------------------------
# Mistakes in the command or config: named before training, one line from train.py.


def test_config_json_is_left_alone_when_the_rerun_is_refused(shapes_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(tiny_config(shapes_dir, num_train_steps=1), workdir)
  before = open(os.path.join(workdir, 'config.json')).read()
  with pytest.raises(checkpoints.CheckpointError, match='does not fit this config'):
    trainer.train_and_evaluate(tiny_config(shapes_dir, num_classes=7), workdir)
  assert open(os.path.join(workdir, 'config.json')).read() == before


@pytest.mark.parametrize('field,value,message', [
    ('log_every_steps', 0, r'config.log_every_steps=0 must be >= 1'),
    ('checkpoint_every_steps', 0, r'config.checkpoint_every_steps=0 must be >= 1'),
    ('eval_every_steps', 0, r'config.eval_every_steps=0 must be >= 1, or -1'),
    ('num_classes', 3, r'config.num_classes=3 is smaller than the 5 classes of shapes'),
])
def test_bad_config_values_are_refused_at_start(shapes_dir, tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    trainer.train_and_evaluate(tiny_config(shapes_dir, **{field: value}), str(tmp_path))


def test_a_workdir_that_cannot_be_written_is_named(shapes_dir, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(ValueError, match=r'Cannot write to the workdir .*a_file/run: .*choose'):
    trainer.train_and_evaluate(tiny_config(shapes_dir), str(blocker / 'run'))


def test_the_eval_batch_is_rounded_up_to_the_devices(shapes_dir, tmp_path, caplog):
  caplog.set_level('INFO')
  final = trainer.train_and_evaluate(
      tiny_config(shapes_dir, eval_batch_size=100, num_train_steps=1), str(tmp_path))
  assert final['eval_count'] == 500
  assert 'config.eval_batch_size=100 rounded up to 104' in caplog.text


def test_train_py_reports_a_user_error_in_one_line(shapes_dir, tmp_path):
  result = subprocess.run(
      train_command(str(tmp_path / 'run'), shapes_dir, 2) + ['--config.log_every_steps=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      'error: config.log_every_steps=0 must be >= 1 (a number of steps).')
