"""Where metrics go: TensorBoard (clu's writer), WORKDIR/metrics.jsonl, and one console
line per log step (the progress line, with where the time went) and per evaluation.

metrics.jsonl holds one JSON object per write, `{"step": N, "<name>": value, ...}`, so
people and scripts can follow a run without TensorBoard.
"""

import contextlib
import json
import logging as std_logging
import os
import time
from typing import Iterator, Mapping

import jax
from absl import logging
from clu import metric_writers

from resnext_jax import storage


METRICS_FILE = 'metrics.jsonl'


class _DropLibraryInfo(std_logging.Filter):
  """Keeps Orbax's per-save INFO chatter (dozens of lines a checkpoint) off the console."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


_LIBRARY_FILTER = _DropLibraryInfo()


def quiet_library_logs() -> None:
  """Drops INFO logs of the checkpoint library and JAX's probe for backends that are not
  there ("Unable to initialize backend 'tpu'" on every CPU or GPU run); warnings and
  errors still show."""
  std_logging.getLogger('absl').addFilter(_LIBRARY_FILTER)  # adding twice is a no-op
  std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)


class MetricsReporter:
  """Writes scalar metrics to TensorBoard and metrics.jsonl, from process 0 only (the
  console gets the trainer's own lines, so nothing is printed twice)."""

  def __init__(self, workdir: str):
    self._writer = None
    if jax.process_index() == 0:
      self._writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
    self._jsonl_path = os.path.join(workdir, METRICS_FILE)

  def write(self, step: int, scalars: Mapping[str, float | int]) -> None:
    if self._writer is None:
      return
    self._writer.write_scalars(step, {k: float(v) for k, v in scalars.items()})
    exact = {k: v if isinstance(v, int) else float(v) for k, v in scalars.items()}
    storage.append_text(self._jsonl_path, json.dumps({'step': int(step), **exact}) + '\n')

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


def evaluated_steps(workdir: str) -> set[int]:
  """The steps metrics.jsonl has an evaluation of (a resumed run finishes a missing one)."""
  text = storage.read_text(os.path.join(workdir, METRICS_FILE)) or ''
  try:
    records = [json.loads(line) for line in text.splitlines() if '"eval_loss"' in line]
  except ValueError:  # a line cut short by a crash: judge by the whole lines
    records = [json.loads(line) for line in text.splitlines()[:-1] if '"eval_loss"' in line]
  return {int(r['step']) for r in records}


# Where a training loop's wall time goes; the rest (logging, the loop itself) is "other".
PHASES = ('input', 'step', 'eval', 'checkpoint')
# Above this share of the time waiting for input batches, a run is input-bound.
INPUT_BOUND_SHARE = 0.1


class PhaseTimes:
  """Wall time by phase between two reports: waiting for input, train steps, evaluation,
  checkpointing. A train step's time is counted where the host waits for its result."""

  def __init__(self):
    self._since = time.perf_counter()
    self._spent = dict.fromkeys(PHASES, 0.0)

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self._spent[name] += time.perf_counter() - start

  def shares(self) -> dict[str, float]:
    """`{'time_input': share, ...}` of the wall time since the last call, which starts
    the next interval."""
    now = time.perf_counter()
    total = max(now - self._since, 1e-9)
    shares = {f'time_{name}': spent / total for name, spent in self._spent.items()}
    self._since, self._spent = now, dict.fromkeys(PHASES, 0.0)
    return shares


def describe_shares(shares: Mapping[str, float]) -> str:
  """"input 3% step 95% eval 0% checkpoint 2%"."""
  return ' '.join(f'{name[len("time_"):]} {share:.0%}' for name, share in shares.items())


class InputBoundWarning:
  """Says once per run, when waiting for input takes more than INPUT_BOUND_SHARE of an
  interval (not the first, which includes compilation), what to try."""

  def __init__(self):
    self._said = False
    self._intervals = 0

  def check(self, shares: Mapping[str, float]) -> None:
    self._intervals += 1
    share = shares['time_input']
    if self._said or self._intervals == 1 or share <= INPUT_BOUND_SHARE:
      return
    self._said = True
    logging.warning(
        'The run is input-bound: %.0f%% of the time since the last log went to waiting '
        'for input batches, so the accelerators idle. Try a host with more CPU cores per '
        'accelerator (decoding runs on all of them), data on a faster local disk (tfds '
        'array_record files), smaller training images (config.image_size), or fewer '
        'expensive augmentations.', 100 * share)


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


class ProgressLine:
  """Formats "step 120/1000 | loss 2.3 | lr 0.1 | 520 img/s | 3m10s left" lines."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int):
    self._total = total_steps
    self._batch_size = batch_size
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._measured = False
    self.images_per_sec = 0.0  # over the last interval

  def __call__(self, step: int, loss: float, learning_rate: float) -> str:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    images_per_sec = self._batch_size / seconds_per_step if seconds_per_step else 0.0
    self.images_per_sec = images_per_sec
    # The first interval includes compilation, so it says nothing about the pace.
    left = (f'{format_duration((self._total - step) * seconds_per_step)} left'
            if self._measured else 'includes compilation')
    self._measured = True
    return (f'step {step}/{self._total} | loss {loss:.4f} | lr {learning_rate:.4g} | '
            f'{images_per_sec:.1f} img/s | {left}')
