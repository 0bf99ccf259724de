"""Trains or evaluates a ResNeXt: python train.py --config=configs/quickstart.py --workdir=DIR.

Every field of the config can be overridden on the command line (--config.batch_size=64).
Rerunning the same command resumes from the latest checkpoint in DIR.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnext_jax import checkpoints, trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.jsonl.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, checkpoints.CheckpointError,
          trainer.TrainingDivergedError) as e:
    logging.debug('Traceback of the error below:', exc_info=True)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
