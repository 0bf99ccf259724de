"""Several processes as one run, without hangs.

- `initialize`: `jax.distributed.initialize` with its timeouts named (initialization,
  heartbeat, shutdown) instead of left at library defaults, and Orbax's checkpoint
  barriers put on the coordination service, which bounds them.
- `check_same_everywhere`: the processes compare what each of them sees (the checkpoint
  step to resume from, the dataset's size) and all stop with one error naming the
  difference, before a collective could wait forever on it.
- `StopRequest`: SIGTERM as a request to save and stop, at one step that every process
  agrees on, even when only one process got the signal.
"""

import dataclasses
import json
import signal
import threading

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils


@dataclasses.dataclass(frozen=True)
class Timeouts:
  """Seconds: for all processes to connect; without a heartbeat before a process counts
  as dead (the others are then stopped); for all processes to reach shutdown."""
  initialization: int = 300
  heartbeat: int = 100
  shutdown: int = 300


def initialize(coordinator_address: str | None, num_processes: int | None,
               process_id: int | None, timeouts: Timeouts) -> None:
  """Connects this process to the others (arguments None: detected from the cluster)."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=timeouts.initialization,
                             heartbeat_timeout_seconds=timeouts.heartbeat,
                             shutdown_timeout_seconds=timeouts.shutdown)
  # Orbax's own default synchronizes with device collectives, which wait forever.
  flags.FLAGS.experimental_orbax_use_distributed_barrier = True


def check_same_everywhere(values: dict[str, object]) -> None:
  """Raises ValueError, on every process, if any process sees other `values`.

  `values` maps a description ('checkpoint step to resume from in WORKDIR') to what this
  process sees; they are compared as JSON.
  """
  if jax.process_count() == 1:
    return
  mine = json.dumps(values, sort_keys=True).encode()
  sizes = multihost_utils.process_allgather(np.asarray(len(mine), np.int32))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:len(mine)] = np.frombuffer(mine, np.uint8)
  gathered = multihost_utils.process_allgather(padded)
  seen = [json.loads(bytes(row[:size])) for row, size in zip(gathered, sizes)]
  lines = []
  for name in values:
    if len({json.dumps(s.get(name)) for s in seen}) > 1:
      lines.append(f'{name}: ' + ', '.join(f'process {i} sees {s.get(name)!r}'
                                           for i, s in enumerate(seen)))
  if lines:
    raise ValueError(
        'The processes of this run see different things, so they cannot train together:\n  '
        + '\n  '.join(lines) + '\nThe workdir and the data must be on storage that every '
        'host reads the same (a shared file system or a gs:// bucket), not on local disks.')


class Preempted(Exception):
  """SIGTERM arrived before training started: there is nothing to save yet."""


class StopRequest:
  """SIGTERM (preemption, a scheduler) as a request to save and stop.

  `requested()` is called at every train step and evaluation batch. With one process, it
  is true once the signal has arrived; a signal that arrives before `training_started()`
  (while the dataset is prepared or a checkpoint restored) raises `Preempted` at once.
  With several processes, JAX's preemption service owns SIGTERM: the process that gets it
  tells the coordination service, which picks the next call count that every process
  reaches, and `requested()` turns true there on all of them together. Between steps that
  costs no collective, only a flag check.
  """

  def __init__(self):
    self._multiprocess = jax.process_count() > 1
    self._received = False
    self._raise_at_once = True
    self._calls = 0
    self._previous = None

  def __enter__(self) -> 'StopRequest':
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self._received = True
    if self._raise_at_once:
      raise Preempted('SIGTERM received before training started; nothing was saved. Rerun '
                      'the same command to start again.')

  def training_started(self) -> None:
    self._raise_at_once = False

  def requested(self) -> bool:
    if not self._multiprocess:
      return self._received
    self._calls += 1
    return multihost_utils.reached_preemption_sync_point(self._calls)
