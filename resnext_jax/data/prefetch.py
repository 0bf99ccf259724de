"""Global batches prepared and put on the devices while the current step runs.

A thread reads the next local batch from the training iterator and makes it a global
array on the devices (the host-to-device copy), so that the train step finds its input
waiting (double buffering). The position it reports is that of the batches handed to
the loop, not of the one being prepared, so a checkpoint resumes exactly at the next
batch a step would have consumed.
"""

import queue
import threading
from typing import Any, Callable

import jax

_POLL_S = 0.1


class DevicePrefetcher:
  """Iterates `(global batch)` from `iterator` (a TrainIterator), `depth` batches ahead.

  `get_state()` is the iterator's state after the last batch handed out. Use it as a
  context manager (or call `close()`), so that the thread stops with the loop.
  """

  def __init__(self, iterator, to_device: Callable[[Any], Any], depth: int = 1):
    self._iterator = iterator
    self._to_device = to_device
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._state = iterator.get_state()
    self._thread = threading.Thread(target=self._produce, name='device-prefetch',
                                    daemon=True)
    self._thread.start()

  def _produce(self) -> None:
    try:
      while self._put((self._to_device(next(self._iterator)), self._iterator.get_state())):
        pass
    except Exception as e:  # pylint: disable=broad-except
      self._put((None, e))  # raised in the loop, where it can stop the run

  def _put(self, item) -> bool:
    """Queues `item` unless the prefetcher is closed first; False once closed."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self) -> 'DevicePrefetcher':
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batch, state = self._queue.get()
    if batch is None:
      raise state
    self._state = state
    return batch

  def get_state(self) -> dict:
    return self._state

  def close(self) -> None:
    self._stop.set()
    while self._thread.is_alive():
      try:  # unblock a producer waiting to put
        self._queue.get(timeout=_POLL_S)
      except queue.Empty:
        pass
    self._thread.join()

  def __enter__(self) -> 'DevicePrefetcher':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
