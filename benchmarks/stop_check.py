"""What checking for a stop request costs per step on several processes.

    python benchmarks/stop_check.py --calls=2000

Starts two processes on this machine (gloo collectives, 127.0.0.1) and times, in each,
JAX's preemption sync point (what the trainer calls every step) and, for comparison, an
allgather of a flag over all processes (what a check without the preemption service
needs). Prints the mean microseconds per call of each.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def _worker(port: int, process_id: int, calls: int) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=process_id)
  results = {}
  for name, check in (
      ('sync_point', multihost_utils.reached_preemption_sync_point),
      ('allgather', lambda i: bool(np.any(multihost_utils.process_allgather(np.asarray(False)))))):
    check(0)  # compiles the allgather
    start = time.perf_counter()
    for i in range(1, calls + 1):
      check(i)
    results[name] = (time.perf_counter() - start) / calls * 1e6
  if process_id == 0:
    print(f'sync_point_us={results["sync_point"]:.2f}')
    print(f'allgather_us={results["allgather"]:.2f}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--calls', type=int, default=2000)
  parser.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--port', type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker is not None:
    _worker(args.port, args.worker, args.calls)
    return
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', JAX_PLATFORMS='cpu')
  workers = [subprocess.Popen([sys.executable, __file__, f'--calls={args.calls}',
                               f'--worker={i}', f'--port={port}'], env=env)
             for i in range(2)]
  sys.exit(max(w.wait() for w in workers))


if __name__ == '__main__':
  main()
