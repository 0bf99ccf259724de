"""Model variables and training state on disk, via Orbax.

Two layouts exist. A *variables directory* is what the converter writes:

    DIR/variables/      Orbax checkpoint of {'params', 'batch_stats'} (float32 numpy)
    DIR/model.json      {"arch", "num_classes", "source", and where known "class_names",
                        "model" (ResNeXt fields of a custom size), "eval" (resize, crop)}

A *training workdir* holds an Orbax `CheckpointManager` directory:

    WORKDIR/checkpoints/<step>/state/   the TrainState as a nested dict
    WORKDIR/checkpoints/<step>/data/    the input iterator's position (JSON)
    WORKDIR/model.json                  as above, for the run's model and dataset

`load_variables` is the one entry point for reading weights back, whatever wrote them.
"""

import json
import os
import uuid
from typing import Any

import flax
import jax
from etils import epath
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from resnext_jax import storage

VARIABLES_ITEM = 'variables'
CHECKPOINTS_DIR = 'checkpoints'
STATE_ITEM = 'state'
DATA_ITEM = 'data'
MODEL_INFO_FILE = 'model.json'
UNREADABLE_DIR = 'unreadable_checkpoints'


class CheckpointError(ValueError):
  """A path that does not hold what the caller needs; the message says what to do."""


def check_output_dir(directory: str, overwrite: bool) -> None:
  """Refuses to write into a non-empty directory (or over a file) unless `overwrite`."""
  path = epath.Path(directory)
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise CheckpointError(
        f'Output directory {directory} exists and is not empty; choose a new directory '
        'or pass --overwrite to replace it.')
  if path.exists() and not path.is_dir():
    raise CheckpointError(f'Output path {directory} exists and is not a directory.')


def save_variables(variables: dict, directory: str, *, model_info: dict[str, Any],
                   overwrite: bool = False) -> None:
  """Writes `variables` and `model_info` to `directory` atomically.

  The checkpoint is written to a temporary sibling and renamed into place, so a failure
  half-way never leaves a directory that looks complete (on a local disk; on a bucket the
  rename copies object by object). An existing
  non-empty `directory` (local or `gs://...`) is refused unless `overwrite`.
  """
  directory = storage.resolve(directory)
  check_output_dir(directory, overwrite)
  target = epath.Path(directory)
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = target.parent / f'.{target.name}.partial-{uuid.uuid4().hex[:8]}'
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / VARIABLES_ITEM, jax.tree.map(np.asarray, variables))
    checkpointer.wait_until_finished()
    write_model_info(str(staging), model_info)
    if target.exists():
      target.rmtree()
    staging.rename(target)
  finally:
    if staging.exists():
      staging.rmtree()


def read_model_info(directory: str) -> dict[str, Any] | None:
  """The `model.json` written beside converted variables, or None where there is none."""
  text = storage.read_text(os.path.join(directory, MODEL_INFO_FILE))
  return None if text is None else json.loads(text)


def write_model_info(directory: str, model_info: dict[str, Any]) -> None:
  """Writes `model.json` into `directory` atomically (a reader never sees half a file)."""
  storage.write_text(os.path.join(directory, MODEL_INFO_FILE), json.dumps(model_info, indent=2))


def find_model_info(path: str) -> dict[str, Any] | None:
  """The `model.json` of `path` or of the workdir it lies in (a step directory, or the
  `checkpoints/` folder); None if there is none."""
  path = storage.resolve(path)
  for directory in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    info = read_model_info(directory)
    if info is not None:
      return info
  return None


def _latest_step_dir(checkpoints_dir: str) -> str | None:
  steps = [int(p.name) for p in epath.Path(checkpoints_dir).iterdir()
           if p.name.isdigit() and (p / STATE_ITEM).is_dir()]
  return os.path.join(checkpoints_dir, str(max(steps))) if steps else None


def _saved_tree(item_dir: str) -> Any:
  """The saved arrays' metadata (shape, dtype) in their tree, without reading them."""
  return ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir)).tree


def shape_mismatches(saved_tree: dict, target_tree: dict) -> dict[str, str]:
  """Where two nested dicts of arrays differ in keys or shapes: {'a/b/c': line}, params first.

  Shared by resuming (any difference refuses) and by `init_from` (a head may differ).
  """
  # None stands for an absent part (a state without a moving average): nothing to compare.
  saved = {k: v for k, v in flax.traverse_util.flatten_dict(saved_tree, sep='/').items()
           if v is not None}
  wanted = {k: v for k, v in flax.traverse_util.flatten_dict(target_tree, sep='/').items()
            if v is not None}
  lines = {}
  for key in sorted(saved.keys() | wanted.keys(), key=lambda k: (k[:7] != 'params/', k)):
    if key not in wanted:
      lines[key] = f'{key}: in the checkpoint, not in this config'
    elif key not in saved:
      lines[key] = f'{key}: missing, this config {tuple(np.shape(wanted[key]))}'
    elif tuple(saved[key].shape) != tuple(np.shape(wanted[key])):
      lines[key] = (f'{key}: checkpoint {tuple(saved[key].shape)}, '
                    f'this config {tuple(np.shape(wanted[key]))}')
  return lines


def _restore_as_numpy(item_dir: str) -> dict:
  """Restores host numpy arrays, whatever devices or processes wrote the checkpoint."""
  tree = _saved_tree(item_dir)
  target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), tree)
  return ocp.StandardCheckpointer().restore(item_dir, target)


def load_variables(path: str, *, ema: bool = False) -> dict:
  """Reads `{'params', 'batch_stats'}` (numpy arrays) from any checkpoint we write.

  `path` may be a converter output, a training workdir (its latest checkpoint), a
  workdir's `checkpoints/` folder, or one step directory of it. With `ema`, the moving
  average of a training checkpoint (a run with config.ema_decay > 0) instead of its
  weights.
  """
  path = storage.resolve(path)
  if not epath.Path(path).exists():
    raise CheckpointError(f'No checkpoint at {path}: the path does not exist.')
  if epath.Path(path, VARIABLES_ITEM).is_dir():
    if ema:
      raise CheckpointError(f'{path} holds converted or exported weights, without a moving '
                            'average: load it without ema (ema=False; '
                            'config.init_from_ema=False).')
    restored = _restore_as_numpy(os.path.join(path, VARIABLES_ITEM))
  else:
    step_dir = path if epath.Path(path, STATE_ITEM).is_dir() else None
    for candidate in (os.path.join(path, CHECKPOINTS_DIR), path):
      if step_dir is None and epath.Path(candidate).is_dir():
        step_dir = _latest_step_dir(candidate)
    if step_dir is None:
      raise CheckpointError(
          f'{path} is not a resnext_jax checkpoint: expected a training workdir, one of '
          f'its checkpoint steps, or a converter output (with a {VARIABLES_ITEM}/ '
          'folder). Convert PyTorch weights with '
          '`python -m resnext_jax.convert --arch=ARCH --input=FILE --output=DIR`.')
    restored = _restore_as_numpy(os.path.join(step_dir, STATE_ITEM))
    if ema:
      if not restored.get('ema'):
        raise CheckpointError(
            f'{step_dir} has no moving average (its run had config.ema_decay=0): load its '
            'weights without ema (ema=False; config.init_from_ema=False).')
      restored = restored['ema']
  return {'params': restored['params'], 'batch_stats': restored['batch_stats']}


class TrainingCheckpoints:
  """Saves and restores the train state with the input position, keeping the last few.

  Saving is asynchronous: the step loop continues while Orbax writes into a temporary
  folder that it renames when complete, so a process killed mid-save leaves the previous
  checkpoints intact; the next run removes the leftover folder. `timeout_secs` bounds
  the wait for every process to finish a save. The state is stored as a nested dict
  (`flax.serialization.to_state_dict`) so that the files do not depend on Python class
  names.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3, timeout_secs: int = 1200):
    self.directory = os.path.join(storage.resolve(workdir), CHECKPOINTS_DIR)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            async_options=ocp.options.AsyncOptions(timeout_secs=timeout_secs)),
        item_names=(STATE_ITEM, DATA_ITEM))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The complete checkpoints' steps, ascending."""
    return sorted(self._manager.all_steps())

  def set_aside(self, step: int) -> str:
    """Moves an unreadable checkpoint out of the way (to `UNREADABLE_DIR` beside the
    checkpoints, kept for inspection), so that the run can save that step again; returns
    where it went."""
    target = epath.Path(os.path.dirname(self.directory), UNREADABLE_DIR, str(step))
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      if target.exists():
        target.rmtree()
      epath.Path(self.directory, str(step)).rename(target)
    if jax.process_count() > 1:  # the others read the folder only once it has moved
      multihost_utils.sync_global_devices(f'resnext_jax_set_aside_{step}')
    self._manager.reload()
    return str(target)

  def save(self, step: int, state: Any, data_position: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
        DATA_ITEM: ocp.args.JsonSave(data_position)}), force=True)

  def restore(self, step: int, target_state: Any) -> tuple[Any, dict]:
    """Restores into the structure, dtypes and shardings of `target_state`.

    Raises `CheckpointError` listing the differing arrays when the saved state has
    other keys or shapes; this is checked on the metadata first, so that no read is
    started that would fail (Orbax leaves a failed read's tasks behind).
    """
    target = flax.serialization.to_state_dict(target_state)
    mismatches = list(shape_mismatches(
        _saved_tree(os.path.join(self.directory, str(step), STATE_ITEM)), target).values())
    if mismatches:
      raise CheckpointError(
          f'The checkpoint at {self.directory}/{step} does not fit this config (a '
          'different arch, num_classes or optimizer?). Use a new --workdir, or restore '
          f'the config the run started with (saved in its config.json). '
          f'{len(mismatches)} arrays differ, first:\n  ' + '\n  '.join(mismatches[:8]))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract),
        DATA_ITEM: ocp.args.JsonRestore()}))
    state = flax.serialization.from_state_dict(target_state, restored[STATE_ITEM])
    return state, restored[DATA_ITEM]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
