"""Model variables on disk: converted weights and (later) training checkpoints, via Orbax.

A *variables directory* is what the converter writes:

    DIR/variables/      Orbax checkpoint of {'params', 'batch_stats'} (float32 numpy)
    DIR/model.json      {"arch": ..., "num_classes": ..., "source": ...}

`load_variables` is the one entry point for reading weights back, whatever wrote them.
"""

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

VARIABLES_ITEM = 'variables'
MODEL_INFO_FILE = 'model.json'


class CheckpointError(ValueError):
  """A path that does not hold what the caller needs; the message says what to do."""


def check_output_dir(directory: str, overwrite: bool) -> None:
  """Refuses to write into a non-empty directory (or over a file) unless `overwrite`."""
  if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
    raise CheckpointError(
        f'Output directory {directory} exists and is not empty; choose a new directory '
        'or pass --overwrite to replace it.')
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise CheckpointError(f'Output path {directory} exists and is not a directory.')


def save_variables(variables: dict, directory: str, *, model_info: dict[str, Any],
                   overwrite: bool = False) -> None:
  """Writes `variables` and `model_info` to `directory` atomically.

  The checkpoint is written to a temporary sibling and renamed into place, so a failure
  half-way never leaves a directory that looks complete. An existing non-empty
  `directory` is refused unless `overwrite`.
  """
  directory = os.path.abspath(directory)
  check_output_dir(directory, overwrite)
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix='.' + os.path.basename(directory) + '.', dir=parent)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(staging, VARIABLES_ITEM),
                      jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    with open(os.path.join(staging, MODEL_INFO_FILE), 'w') as f:
      json.dump(model_info, f, indent=2)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.rename(staging, directory)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)


def read_model_info(directory: str) -> dict[str, Any] | None:
  """The `model.json` written beside converted variables, or None where there is none."""
  path = os.path.join(directory, MODEL_INFO_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def load_variables(path: str) -> dict:
  """Reads `{'params', 'batch_stats'}` (numpy arrays) from a variables directory."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise CheckpointError(f'No checkpoint at {path}: the path does not exist.')
  item = os.path.join(path, VARIABLES_ITEM)
  if not os.path.isdir(item):
    raise CheckpointError(
        f'{path} is not a resnext_jax checkpoint: expected a converter output '
        f'(with a {VARIABLES_ITEM}/ folder). Convert PyTorch weights with '
        '`python -m resnext_jax.convert --arch=ARCH --input=FILE --output=DIR`.')
  restored = ocp.StandardCheckpointer().restore(item)
  return {'params': restored['params'], 'batch_stats': restored['batch_stats']}
