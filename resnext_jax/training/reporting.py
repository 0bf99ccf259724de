"""Where metrics go: clu writers (TensorBoard + console), WORKDIR/metrics.jsonl, progress lines.

metrics.jsonl holds one JSON object per write, `{"step": N, "<name>": value, ...}`, so
people and scripts can follow a run without TensorBoard.
"""

import json
import logging as std_logging
import os
import time
from typing import Mapping

import jax
from absl import logging
from clu import metric_writers


class _DropLibraryInfo(std_logging.Filter):
  """Keeps Orbax's per-save INFO chatter (dozens of lines a checkpoint) off the console."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


_LIBRARY_FILTER = _DropLibraryInfo()


def quiet_library_logs() -> None:
  """Drops INFO logs of the checkpoint library; warnings and errors still show."""
  std_logging.getLogger('absl').addFilter(_LIBRARY_FILTER)  # adding twice is a no-op


class MetricsReporter:
  """Writes scalar metrics to every sink; only process 0 writes files."""

  def __init__(self, workdir: str):
    self._is_writer = jax.process_index() == 0
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not self._is_writer)
    self._jsonl_path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self._writer.write_scalars(step, scalars)
    if self._is_writer:
      with open(self._jsonl_path, 'a') as f:
        f.write(json.dumps({'step': int(step), **scalars}) + '\n')

  def close(self) -> None:
    self._writer.flush()
    self._writer.close()


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

  def __call__(self, step: int, loss: float, learning_rate: float) -> str:
    now = time.perf_counter()
    steps = max(step - self._last_step, 1)
    seconds_per_step = (now - self._last_time) / steps
    self._last_step, self._last_time = step, now
    images_per_sec = self._batch_size / seconds_per_step if seconds_per_step else 0.0
    # The first interval includes compilation, so it says nothing about the pace.
    left = (f'{format_duration((self._total - step) * seconds_per_step)} left'
            if self._measured else 'includes compilation')
    self._measured = True
    return (f'step {step}/{self._total} | loss {loss:.4f} | lr {learning_rate:.4g} | '
            f'{images_per_sec:.1f} img/s | {left}')
