"""Batches prepared ahead of the loop, with the input position of what the loop consumed."""

import threading
import time

import numpy as np
import pytest

from resnext_jax.data.prefetch import DevicePrefetcher


class _Counting:
  """Batches 1, 2, 3, ... whose state counts those drawn; fails at `fail_at` if given."""

  def __init__(self, fail_at=None):
    self.drawn = 0
    self._fail_at = fail_at

  def __next__(self):
    if self.drawn + 1 == self._fail_at:
      raise ValueError('a broken record')
    self.drawn += 1
    return {'x': np.array(self.drawn)}

  def get_state(self):
    return {'examples_seen': self.drawn}


def _wait_for(condition, seconds=10.0):
  deadline = time.monotonic() + seconds
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.01)
  return condition()


def test_the_state_is_that_of_the_batches_handed_out_not_of_those_read_ahead():
  source = _Counting()
  with DevicePrefetcher(source, to_device=lambda batch: batch) as batches:
    assert batches.get_state() == {'examples_seen': 0}
    got = [int(next(batches)['x']) for _ in range(3)]
    assert _wait_for(lambda: source.drawn >= 4)  # the next batch is prepared already
    assert got == [1, 2, 3]
    assert batches.get_state() == {'examples_seen': 3}  # what a checkpoint must save
    assert int(next(batches)['x']) == 4


def test_an_error_in_the_pipeline_reaches_the_loop():
  with DevicePrefetcher(_Counting(fail_at=3), to_device=lambda batch: batch) as batches:
    assert [int(next(batches)['x']) for _ in range(2)] == [1, 2]
    with pytest.raises(ValueError, match='a broken record'):
      next(batches)


def test_closing_stops_the_thread_that_reads_ahead():
  before = threading.active_count()
  batches = DevicePrefetcher(_Counting(), to_device=lambda batch: batch, depth=2)
  next(batches)
  start = time.monotonic()
  batches.close()
  assert time.monotonic() - start < 2
  assert threading.active_count() == before
