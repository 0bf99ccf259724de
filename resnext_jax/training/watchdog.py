"""A step watchdog: a process that is alive but no longer stepping stops, loudly.

A process stuck in a hung file read, a blocked data source or a deadlock keeps answering
the coordination service's heartbeats, so the other processes wait in their next
collective forever. The watchdog thread notices that no step (or evaluation batch) has
finished for too long, logs the Python stack of every thread (where it is stuck), and
ends the process with `EXIT_STATUS`; the coordination service then stops the others.
"""

import collections
import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from typing import Callable, Iterator

from absl import logging

# EX_TEMPFAIL: a scheduler that retries on it may rerun the job, which resumes.
EXIT_STATUS = 75
# Steps timed before the automatic limit (a multiple of their median) applies.
STEPS_BEFORE_AUTOMATIC_LIMIT = 5


def _dump_stacks_and_exit(message: str) -> None:
  logging.error('%s', message)
  logging.flush()
  sys.stderr.flush()
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  os._exit(EXIT_STATUS)  # pylint: disable=protected-access


class StepWatchdog:
  """Watches that `progress()` is called often enough, from a daemon thread.

  The limit is `fixed_secs` when > 0 (armed from `start()`); otherwise `step_factor`
  times the median time between progress calls, but at least `min_secs`, armed once
  `STEPS_BEFORE_AUTOMATIC_LIMIT` steps have been timed (the first steps compile and fill
  buffers). `step_factor <= 0` and `fixed_secs <= 0` turn it off. Work that may
  legitimately take longer (a first evaluation, which compiles; the final checkpoint
  wait) runs inside `paused()`.
  """

  def __init__(self, *, step_factor: float, min_secs: float, fixed_secs: float,
               on_stall: Callable[[str], None] = _dump_stacks_and_exit):
    self._step_factor = step_factor
    self._min_secs = min_secs
    self._fixed_secs = fixed_secs
    self._on_stall = on_stall
    self._intervals = collections.deque(maxlen=100)  # the latest steps' durations
    self._last = time.monotonic()
    self._paused = 0
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None

  @property
  def enabled(self) -> bool:
    return self._fixed_secs > 0 or self._step_factor > 0

  def start(self) -> 'StepWatchdog':
    if self.enabled:
      self._last = time.monotonic()
      self._thread = threading.Thread(target=self._watch, name='step-watchdog', daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def __enter__(self) -> 'StepWatchdog':
    return self.start()

  def __exit__(self, *exc_info) -> None:
    self.stop()

  def progress(self, timed: bool = True) -> None:
    """A step (or evaluation batch) finished; `timed` steps count toward the median."""
    now = time.monotonic()
    with self._lock:
      if timed and not self._paused:
        self._intervals.append(now - self._last)
      self._last = now

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    with self._lock:
      self._paused += 1
    try:
      yield
    finally:
      with self._lock:
        self._paused -= 1
        self._last = time.monotonic()

  def limit(self) -> float | None:
    """Seconds without progress that count as a stall; None while not yet armed."""
    if self._fixed_secs > 0:
      return self._fixed_secs
    if self._step_factor <= 0 or len(self._intervals) < STEPS_BEFORE_AUTOMATIC_LIMIT:
      return None
    return max(self._min_secs, self._step_factor * statistics.median(self._intervals))

  def _watch(self) -> None:
    while not self._stop.wait(0.5):
      with self._lock:
        idle = time.monotonic() - self._last
        limit = None if self._paused else self.limit()
        median = statistics.median(self._intervals) if self._intervals else None
      if limit is not None and idle > limit:
        how = (f'{self._step_factor:g} x the median step time {median:.3g} s, at least '
               f'{self._min_secs:g} s' if self._fixed_secs <= 0 else 'config.watchdog_secs')
        self._on_stall(
            f'Step watchdog: no training step or evaluation batch finished for {idle:.0f} s '
            f'(limit {limit:.0f} s: {how}). The stacks of every thread follow; this '
            f'process exits with status {EXIT_STATUS} so that the other processes are '
            'stopped too. Rerun the same command to resume from the last checkpoint.')
        return
