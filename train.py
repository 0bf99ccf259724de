"""Trains or evaluates a ResNeXt: python train.py --config=configs/quickstart.py --workdir=DIR.

Every field of the config can be overridden on the command line (--config.batch_size=64).
Rerunning the same command resumes from the latest checkpoint in DIR. On several hosts
(a TPU pod slice, a GPU cluster) run the same command on every host with --distributed,
or name the coordinator yourself with --coordinator_address, --num_processes and
--process_id. A mistake in the command or the config ends with one `error: ...` line and
exit status 1.
"""

import os
import sys

from resnext_jax import host_memory

# Before NumPy, JAX and TensorFlow start their threads (see host_memory.py).
host_memory.reuse_freed_memory()

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from resnext_jax.training import checkpoints, distributed, trainer  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnext_jax.weights import download  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS


def _environment_int(name: str) -> int | None:
  return int(os.environ[name]) if os.environ.get(name, '').isdigit() else None


config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.jsonl.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() with the cluster auto-detected '
                  '(TPU pod slices, SLURM, Open MPI, Kubernetes).')
flags.DEFINE_string('coordinator_address', os.environ.get('JAX_COORDINATOR_ADDRESS'),
                    'host:port of process 0, for multi-process runs without auto-detection '
                    '(default: $JAX_COORDINATOR_ADDRESS).')
flags.DEFINE_integer('num_processes', _environment_int('JAX_NUM_PROCESSES'),
                     'Number of processes (with --coordinator_address; default: '
                     '$JAX_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', _environment_int('JAX_PROCESS_ID'),
                     'This process\' index (with --coordinator_address; default: '
                     '$JAX_PROCESS_ID).')
flags.DEFINE_integer('initialization_timeout_secs', distributed.Timeouts.initialization,
                     'Seconds for every process to connect to the coordinator.')
flags.DEFINE_integer('heartbeat_timeout_secs', distributed.Timeouts.heartbeat,
                     'Seconds without a heartbeat after which a process counts as dead and '
                     'the coordination service stops the others.')
flags.DEFINE_integer('shutdown_timeout_secs', distributed.Timeouts.shutdown,
                     'Seconds for every process to reach the end of the run.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.distributed or FLAGS.coordinator_address:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           distributed.Timeouts(FLAGS.initialization_timeout_secs,
                                                FLAGS.heartbeat_timeout_secs,
                                                FLAGS.shutdown_timeout_secs))
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except distributed.Preempted as e:
    logging.warning('%s', e)
  except (ValueError, OSError, checkpoints.CheckpointError, download.DownloadError,
          trainer.TrainingDivergedError) as e:
    logging.debug('Traceback of the error below:', exc_info=True)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
