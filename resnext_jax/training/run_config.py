"""The config checked against the machine, the data and the workdir, before anything is
built: intervals, devices and batch sizes, class count, the recipe's step options, the
evaluation preprocessing, and a workdir that can be written. Each mistake is a ValueError
that names the field and the fix."""

import errno

import jax
import ml_collections
from absl import logging
from etils import epath

from resnext_jax.data.dataset import DatasetInfo
from resnext_jax.data.preprocessing import check_eval_preprocessing, default_resize_size
from resnext_jax.training import ema, optim, sharding, steps
from resnext_jax.weights import registry


def _check_intervals(config: ml_collections.ConfigDict) -> None:
  for field in ('log_every_steps', 'checkpoint_every_steps'):
    if config[field] < 1:
      raise ValueError(f'config.{field}={config[field]} must be >= 1 (a number of steps).')
  if config.eval_every_steps == 0 or config.eval_every_steps < -1:
    raise ValueError(f'config.eval_every_steps={config.eval_every_steps} must be >= 1, or -1 '
                     'for once per epoch.')


def _round_eval_batch(config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> ml_collections.ConfigDict:
  """The config with eval_batch_size rounded up to split over the devices (evaluation pads
  its last batch anyway), said in the log when it changes."""
  rounded = sharding.round_up_to_devices(config.eval_batch_size, mesh)
  if rounded == config.eval_batch_size:
    return config
  logging.info('config.eval_batch_size=%d rounded up to %d to split over the %d devices.',
               config.eval_batch_size, rounded, mesh.devices.size)
  config = config.copy_and_resolve_references()
  config.eval_batch_size = rounded
  return config


def fit_to_devices(
    config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, jax.sharding.Mesh]:
  """The config checked against the devices (and its eval batch fitted to them), with
  the mesh it runs on."""
  _check_intervals(config)
  mesh = sharding.create_mesh(config.mesh_shape)
  sharding.check_batch_size(config.batch_size, mesh)
  return _round_eval_batch(config, mesh), mesh


def num_classes(config: ml_collections.ConfigDict, info: DatasetInfo) -> int:
  if config.num_classes <= 0:
    return info.num_classes
  if config.num_classes < info.num_classes:
    raise ValueError(f'config.num_classes={config.num_classes} is smaller than the '
                     f'{info.num_classes} classes of {config.dataset} ({config.data_dir or "tfds"}'
                     '); use -1 for the dataset\'s count.')
  return config.num_classes


def step_options(config: ml_collections.ConfigDict,
                 schedule: optim.Schedule) -> steps.StepOptions:
  """The config's recipe additions to the train step, checked, with the EMA's decay per
  update derived as torchvision's train.py derives it."""
  for field in ('mixup_alpha', 'cutmix_alpha'):
    if config[field] < 0:
      raise ValueError(f'config.{field}={config[field]} is out of range: 0 switches it off, '
                       "> 0 is the Beta distribution's alpha.")
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f'config.ema_decay={config.ema_decay} is out of range: 0 switches it '
                     'off; the decay must be below 1.')
  if not 0 <= config.cutmix_prob <= 1:
    raise ValueError(f'config.cutmix_prob={config.cutmix_prob} must be within [0, 1].')
  if config.ema_every_steps < 1:
    raise ValueError(f'config.ema_every_steps={config.ema_every_steps} must be >= 1.')
  decay = None
  if config.ema_decay > 0:  # a short run's adjusted decay may be 0: the average copies
    decay = ema.ema_decay(config.ema_decay, every=config.ema_every_steps,
                          global_batch_size=config.batch_size,
                          num_epochs=schedule.total_steps / schedule.steps_per_epoch)
  return steps.StepOptions(
      label_smoothing=config.label_smoothing, mixup_alpha=config.mixup_alpha,
      cutmix_alpha=config.cutmix_alpha, cutmix_prob=config.cutmix_prob, seed=config.seed,
      ema_decay=decay, ema_every=config.ema_every_steps,
      ema_warmup_steps=schedule.warmup_steps)


def eval_preprocessing(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(resize, interpolation) of evaluation: the config's where set; else, evaluating
  registered weights (eval_only), their publisher's; else image_size / 0.875, bilinear."""
  entry = registry.REGISTRY.get(config.init_from) if config.eval_only else None
  resize = config.eval_resize_size
  if resize <= 0 and entry is not None:
    resize = round(entry.resize * config.image_size / entry.crop)
  elif resize <= 0:
    resize = default_resize_size(config.image_size)
  interpolation = config.eval_interpolation or (entry.interpolation if entry else 'bilinear')
  check_eval_preprocessing(config.image_size, resize, interpolation)
  if entry is not None:
    logging.info('Evaluating %s with its publisher\'s resize-to-crop ratio and '
                 'interpolation: resize %d, crop %d (config.image_size), %s.',
                 entry.name, resize, config.image_size, interpolation)
  return resize, interpolation


def check_workdir(workdir: str) -> None:
  """Creates the workdir and writes a file into it, so that an unwritable or full one is
  named before the data is prepared or a step is run."""
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    probe = epath.Path(workdir, f'.write_check_{jax.process_index()}')
    probe.write_text('resnext_jax')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except  (OSError; tf.errors on gs://)
    fix = ('free some space or choose another --workdir'
           if getattr(e, 'errno', None) == errno.ENOSPC
           else 'choose a --workdir this user can write to')
    reason = getattr(e, 'strerror', None) or str(e).splitlines()[0]
    raise ValueError(f'Cannot write to the workdir {workdir}: {reason}; {fix}.') from e
