"""Comparing a checkpoint's arrays with what a config expects."""

import numpy as np

from resnext_jax.training import checkpoints


def test_checkpoint_shape_mismatches_name_each_difference():
  saved = {'batch_stats': {'m': np.zeros(2)},
           'params': {'a': np.zeros((2, 3)), 'b': np.zeros(4), 'old': np.zeros(1)}}
  wanted = {'batch_stats': {'m': np.zeros(3)},
            'params': {'a': np.zeros((2, 3)), 'b': np.zeros(5), 'new': np.zeros((1, 2))}}
  assert list(checkpoints.shape_mismatches(saved, wanted).items()) == [  # params first
      ('params/b', 'params/b: checkpoint (4,), this config (5,)'),
      ('params/new', 'params/new: missing, this config (1, 2)'),
      ('params/old', 'params/old: in the checkpoint, not in this config'),
      ('batch_stats/m', 'batch_stats/m: checkpoint (2,), this config (3,)')]
  assert not checkpoints.shape_mismatches(saved, saved)
