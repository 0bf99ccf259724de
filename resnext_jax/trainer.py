"""Training and evaluation: `train_and_evaluate(config, workdir)` is the main job.

Sections, top to bottom: the schedule and optimizer derived from the config; model
variables (fresh, or loaded from `config.init_from` with a new head where the class
count differs); the jitted, sharded steps; evaluation over the whole split; and the
loop with logging, checkpoints, resume, SIGTERM handling and a stop on NaN.
"""

import dataclasses
import functools
import os
import signal
import threading
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from resnext_jax import checkpoints, input_pipeline, sharding, steps
from resnext_jax.models import ResNeXt, create_model, init_variables
from resnext_jax.reporting import MetricsReporter, ProgressLine, quiet_library_logs

HEAD_PREFIX = 'params/fc/'


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------
# Schedule and optimizer.


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Every number derived from the config and the dataset size, computed once."""
  steps_per_epoch: int
  total_steps: int
  base_learning_rate: float  # config.learning_rate scaled by batch_size / 256
  warmup_steps: int
  boundaries: tuple[int, ...]  # steps where the step schedule decays
  eval_every_steps: int


def derive_schedule(config: ml_collections.ConfigDict, num_train_examples: int) -> Schedule:
  steps_per_epoch = num_train_examples // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'config.batch_size={config.batch_size} is larger than the '
                     f'{num_train_examples} training examples; use a smaller batch.')
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else int(config.num_epochs * steps_per_epoch))
  return Schedule(
      steps_per_epoch=steps_per_epoch,
      total_steps=total_steps,
      base_learning_rate=config.learning_rate * config.batch_size / 256,
      warmup_steps=int(config.warmup_epochs * steps_per_epoch),
      boundaries=tuple(int(e * steps_per_epoch) for e in config.lr_boundaries),
      eval_every_steps=(config.eval_every_steps if config.eval_every_steps > 0
                        else steps_per_epoch))


def create_learning_rate_fn(config: ml_collections.ConfigDict,
                            schedule: Schedule) -> optax.Schedule:
  """Step decay (mmcls) or cosine, each with optional linear warmup."""
  base, warmup = schedule.base_learning_rate, schedule.warmup_steps
  if config.lr_schedule == 'step':
    def decayed(step):
      decays = sum((step >= b).astype(jnp.int32) for b in schedule.boundaries)
      return base * config.lr_decay_factor ** decays
  elif config.lr_schedule == 'cosine':
    cosine = optax.cosine_decay_schedule(base, max(schedule.total_steps - warmup, 1))
    decayed = lambda step: cosine(jnp.maximum(step - warmup, 0))
  else:
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r}; use 'step' or 'cosine'.")

  def learning_rate(step):
    step = jnp.asarray(step)
    if not warmup:
      return decayed(step)
    return jnp.where(step < warmup, base * (step + 1) / warmup, decayed(step))
  return learning_rate


def create_optimizer(config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """PyTorch-style SGD: weight decay added to the gradient, then momentum."""
  mask = None
  if not config.weight_decay_on_bn_and_bias:
    mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask),
      optax.sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov))


# ----------------------------------------------------------------------------------------
# Model and variables.


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> ResNeXt:
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config.model.items()}
  return create_model(config.arch, num_classes=num_classes, dtype=jnp.dtype(config.dtype),
                      conv_impl=config.conv_impl,
                      zero_init_residual=config.zero_init_residual, **overrides)


def merge_pretrained(initial: dict, loaded: dict, source: str) -> tuple[dict, list[str]]:
  """Takes every variable from `loaded`, except a head it lacks or has in another shape.

  Returns the merged variables and a description of each variable that was not
  loaded. Any other difference (a missing, extra or reshaped backbone variable) means
  a different architecture and raises, naming the first mismatches.
  """
  flat_initial = flax.traverse_util.flatten_dict(initial, sep='/')
  flat_loaded = flax.traverse_util.flatten_dict(loaded, sep='/')
  differences = checkpoints.shape_mismatches(loaded, initial)
  head = {key for key in differences if key.startswith(HEAD_PREFIX) and key in flat_initial}
  mismatches = [line for key, line in differences.items() if key not in head]
  if mismatches:
    listed = '\n  '.join(mismatches[:8])
    raise ValueError(
        f'config.init_from={source} does not fit the configured model (config.arch / '
        f'config.model); {len(mismatches)} variables differ, first:\n  {listed}')
  merged = {key: value if key in head else np.asarray(flat_loaded[key], value.dtype)
            for key, value in flat_initial.items()}
  not_loaded = [line for key, line in differences.items() if key in head]
  return flax.traverse_util.unflatten_dict(merged, sep='/'), not_loaded


def initial_variables(config: ml_collections.ConfigDict, model: ResNeXt) -> dict:
  """Fresh variables from config.seed, overlaid with config.init_from when set."""
  variables = jax.device_get(
      init_variables(model, jax.random.PRNGKey(config.seed), config.image_size))
  if not config.init_from:
    return variables
  loaded = checkpoints.load_variables(config.init_from)
  variables, not_loaded = merge_pretrained(variables, loaded, config.init_from)
  logging.info('Loaded weights from %s.', config.init_from)
  if not_loaded:
    logging.warning('Not loaded (re-initialised) from %s:\n  %s', config.init_from,
                    '\n  '.join(not_loaded))
  return variables


def put_replicated(tree: Any, target: jax.sharding.Sharding) -> Any:
  """Host arrays, identical on every process, as global arrays with sharding `target`."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])
  return jax.tree.map(put, tree)


# ----------------------------------------------------------------------------------------
# Evaluation.


def evaluate(eval_fn, state: steps.TrainState, config: ml_collections.ConfigDict,
             batch_sharding: jax.sharding.Sharding) -> dict[str, float]:
  """Loss, top-1 and top-5 over every example of config.eval_split, each counted once."""
  totals = None
  for local_batch in input_pipeline.create_eval_iterator(config):
    sums = eval_fn(state, input_pipeline.make_global_batch(local_batch, batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f'The eval split {config.eval_split!r} gave no batches; check '
                     'config.eval_split.')
  return steps.mean_eval_metrics(jax.device_get(totals))


# ----------------------------------------------------------------------------------------
# The loop.


class StopSignal:
  """Turns SIGTERM (preemption, a scheduler) into a flag the loop checks every step."""

  def __init__(self):
    self._requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc_info):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def requested(self) -> bool:
    """True on every process as soon as any process got the signal."""
    if jax.process_count() == 1:
      return self._requested
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self._requested))))


@dataclasses.dataclass
class JittedSteps:
  train: Any  # (state, batch) -> (state, metrics); donates the state
  eval: Any  # (state, batch) -> the batch's metric sums (steps.eval_step)


def jit_steps(model, tx, learning_rate_fn, config, mesh) -> JittedSteps:
  """The train and eval steps, jitted with the state replicated and batches split."""
  state_sharding = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  train = jax.jit(
      functools.partial(steps.train_step, model=model, tx=tx,
                        learning_rate_fn=learning_rate_fn,
                        label_smoothing=config.label_smoothing),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, state_sharding), donate_argnums=0)
  evaluate_batch = jax.jit(functools.partial(steps.eval_step, model=model),
                           in_shardings=(state_sharding, batch_sharding),
                           out_shardings=state_sharding)
  return JittedSteps(train=train, eval=evaluate_batch)


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from workdir if it has checkpoints) and returns the final metrics."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  quiet_library_logs()
  mesh = sharding.create_mesh(config.mesh_shape)
  sharding.check_batch_size(config.batch_size, mesh)
  sharding.check_batch_size(config.eval_batch_size, mesh, 'config.eval_batch_size')

  info = input_pipeline.get_dataset_info(config)
  num_classes = config.num_classes if config.num_classes > 0 else info.num_classes
  model = build_model(config, num_classes)
  schedule = derive_schedule(config, info.num_train_examples)
  learning_rate_fn = create_learning_rate_fn(config, schedule)
  tx = create_optimizer(config, learning_rate_fn)
  overrides = f' with {config.model.to_dict()}' if config.model else ''
  logging.info('Model %s%s (%s classes, %s compute, conv_impl=%s) on %d devices; %s',
               config.arch, overrides, num_classes, config.dtype, config.conv_impl,
               mesh.devices.size, schedule)
  _write_config(config, workdir)

  ckpts = checkpoints.TrainingCheckpoints(workdir, max_to_keep=config.keep_checkpoints)
  reporter = MetricsReporter(workdir)
  jitted = jit_steps(model, tx, learning_rate_fn, config, mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  try:
    if config.eval_only:
      return _evaluate_only(config, model, tx, ckpts, reporter, jitted, mesh)
    return _train(config, model, tx, schedule, ckpts, reporter, jitted, mesh,
                  batch_sharding, workdir)
  finally:
    ckpts.wait()
    ckpts.close()
    reporter.close()


def _restore_or_create(config, model, tx, ckpts, mesh):
  """The latest checkpoint of the workdir, else a fresh state; plus the input position."""
  step = ckpts.latest_step()
  if step is None:
    variables = initial_variables(config, model)
  else:  # only the structure matters: the checkpoint overwrites every value
    variables = jax.device_get(
        init_variables(model, jax.random.PRNGKey(config.seed), config.image_size))
  state = put_replicated(steps.create_train_state(variables, tx), sharding.replicated(mesh))
  logging.info('%s parameters.', f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')
  if step is None:
    return state, None
  state, data_position = ckpts.restore(step, state)
  logging.info('Resumed from %s/%d.', ckpts.directory, step)
  return state, data_position


def _evaluate_only(config, model, tx, ckpts, reporter, jitted, mesh):
  if not config.init_from and ckpts.latest_step() is None:
    raise ValueError('config.eval_only needs weights: set config.init_from to a '
                     'checkpoint or converted weights, or a --workdir with checkpoints.')
  if config.init_from:
    variables = initial_variables(config, model)
    state = put_replicated(steps.create_train_state(variables, tx), sharding.replicated(mesh))
  else:
    state, _ = _restore_or_create(config, model, tx, ckpts, mesh)
  metrics = evaluate(jitted.eval, state, config, sharding.batch_sharding(mesh))
  step = int(jax.device_get(state.step))
  reporter.write(step, metrics)
  logging.info('Evaluation at step %d: %s', step, _format_metrics(metrics))
  return metrics


def _format_metrics(metrics: dict[str, float]) -> str:
  return ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in metrics.items())


def _train(config, model, tx, schedule, ckpts, reporter, jitted, mesh, batch_sharding,
           workdir):
  state, data_position = _restore_or_create(config, model, tx, ckpts, mesh)
  start_step = int(jax.device_get(state.step))
  train_iter = input_pipeline.create_train_iterator(config, start_step=start_step)
  if data_position is not None:
    train_iter.set_state(data_position)
  progress = ProgressLine(schedule.total_steps, config.batch_size, start_step)
  pending, logged = [], []  # device metrics not yet checked; host metrics since last log
  last_saved = start_step if ckpts.latest_step() is not None else None
  final_metrics: dict[str, float] = {}

  def check_pending(step):
    fetched = jax.device_get(pending)
    pending.clear()
    for i, metrics in enumerate(fetched):
      if not (np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])):
        bad_step = step - len(fetched) + i + 1
        kept = (f'the last good checkpoint is step {last_saved} in {ckpts.directory}'
                if last_saved is not None else 'no checkpoint was written')
        raise TrainingDivergedError(
            f'The loss became {metrics["loss"]} at step {bad_step}; stopping ({kept}). '
            'Lower config.learning_rate, add warmup (config.warmup_epochs), or check '
            'the data.')
    logged.extend(fetched)

  def save(step):
    nonlocal last_saved
    check_pending(step)  # never checkpoint a diverged state
    ckpts.save(step, state, train_iter.get_state())
    last_saved = step

  with StopSignal() as stop:
    for step in range(start_step + 1, schedule.total_steps + 1):
      batch = input_pipeline.make_global_batch(next(train_iter), batch_sharding)
      state, metrics = jitted.train(state, batch)
      pending.append(metrics)
      if stop.requested():
        save(step)
        ckpts.wait()
        logging.warning('SIGTERM received: saved a checkpoint at step %d in %s and '
                        'stopped. Rerun the same command to continue.', step,
                        ckpts.directory)
        return {'stopped_at_step': step}
      is_last = step == schedule.total_steps
      if step % config.log_every_steps == 0 or is_last:
        check_pending(step)
        loss = float(np.mean([m['loss'] for m in logged]))
        learning_rate = float(logged[-1]['learning_rate'])
        reporter.write(step, {'train_loss': loss, 'learning_rate': learning_rate,
                              'train_top1': float(np.mean([m['top1'] for m in logged]))})
        logging.info(progress(step, loss, learning_rate))
        logged.clear()
      if step % config.checkpoint_every_steps == 0 or is_last:
        save(step)
      if step % schedule.eval_every_steps == 0 or is_last:
        final_metrics = evaluate(jitted.eval, state, config, batch_sharding)
        reporter.write(step, final_metrics)
        logging.info('Evaluation at step %d: %s', step, _format_metrics(final_metrics))

  ckpts.wait()
  logging.info('Done. Checkpoints: %s; TensorBoard logs and metrics.jsonl: %s',
               ckpts.directory, workdir)
  return final_metrics
