"""Training and evaluation: `train_and_evaluate(config, workdir)` is the main job.

Top to bottom: the run context (everything derived from the config once: mesh, model,
schedule, optimizer, jitted steps, checkpoints, reporter); restoring (falling back past a
checkpoint that cannot be read) and evaluation over the whole split; and the loop with
logging, checkpoints, resume, SIGTERM handling, a step watchdog and a stop on NaN.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from resnext_jax import storage
from resnext_jax.data import pipeline
from resnext_jax.data.prefetch import DevicePrefetcher
from resnext_jax.data.dataset import DatasetInfo
from resnext_jax.model.resnext import ResNeXt, init_variables
from resnext_jax.ops.impl import describe_choice
from resnext_jax.training import checkpoints, distributed, optim, run_config, sharding, steps
from resnext_jax.training.reporting import (InputBoundWarning, MetricsReporter, PhaseTimes,
                                            ProgressLine, describe_shares, evaluated_steps,
                                            quiet_library_logs)
from resnext_jax.training.watchdog import StepWatchdog
from resnext_jax.training.variables import build_model, initial_variables


class TrainingDivergedError(RuntimeError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunContext:
  """What one run works with, built once from the config before any step."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: ResNeXt
  schedule: optim.Schedule
  tx: optax.GradientTransformation
  jitted: steps.JittedSteps
  ckpts: checkpoints.TrainingCheckpoints
  reporter: MetricsReporter
  eval_resize_size: int  # evaluation resizes the shorter side to this, then crops
  eval_interpolation: str
  info: DatasetInfo
  stop: distributed.StopRequest
  watchdog: StepWatchdog

  @property
  def with_ema(self) -> bool:
    """Whether the state carries a moving average of the weights."""
    return self.config.ema_decay > 0

  @property
  def batch_sharding(self) -> jax.sharding.Sharding:
    return sharding.batch_sharding(self.mesh)

  @property
  def state_sharding(self) -> jax.sharding.Sharding:
    return sharding.replicated(self.mesh)


def _create_context(config: ml_collections.ConfigDict, workdir: str,
                    stop: distributed.StopRequest) -> RunContext:
  """Checks the config against the devices and data, builds everything, logs the choices."""
  config, mesh = run_config.fit_to_devices(config)
  info = pipeline.get_dataset_info(config)
  num_classes = run_config.num_classes(config, info)
  model = build_model(config, num_classes)
  schedule = optim.derive_schedule(config, info.num_train_examples)
  learning_rate_fn = optim.create_learning_rate_fn(config, schedule)
  tx = optim.create_optimizer(config, learning_rate_fn)
  overrides = f' with {config.model.to_dict()}' if config.model else ''
  logging.info('Model %s%s (%s classes, %s compute, conv_impl=%s) on %d devices; %s',
               config.arch, overrides, num_classes, jnp.dtype(model.dtype).name,
               describe_choice(config.conv_impl), mesh.devices.size, schedule)
  options = run_config.step_options(config, schedule)
  if options != steps.StepOptions():
    logging.info('Step options: %s', options)
  jitted = steps.jit_steps(model, tx, mesh, learning_rate_fn=learning_rate_fn,
                           options=options)
  resize, interpolation = run_config.eval_preprocessing(config)
  run = RunContext(
      config=config, workdir=workdir, mesh=mesh, model=model, schedule=schedule, tx=tx,
      jitted=jitted,
      ckpts=checkpoints.TrainingCheckpoints(workdir, max_to_keep=config.keep_checkpoints,
                                            timeout_secs=config.checkpoint_timeout_secs),
      reporter=MetricsReporter(workdir), eval_resize_size=resize,
      eval_interpolation=interpolation, info=info, stop=stop,
      watchdog=StepWatchdog(step_factor=config.watchdog_step_factor,
                            min_secs=config.watchdog_min_secs,
                            fixed_secs=config.watchdog_secs))
  return run


def _write_run_files(run: RunContext) -> None:
  """config.json, and model.json: what a predictor needs to rebuild the model and name
  its classes (arch, sizes, class names, eval preprocessing). Written once the workdir's
  checkpoint is known to fit this config, so a refused rerun leaves them as they were."""
  config, info = run.config, run.info
  if jax.process_index() != 0:
    return
  storage.write_text(os.path.join(run.workdir, 'config.json'),
                     config.to_json_best_effort(indent=2))
  model = run.model
  checkpoints.write_model_info(run.workdir, {
      'arch': config.arch, 'num_classes': model.num_classes, 'source': 'training run',
      'dataset': config.dataset,
      'model': {k: list(v) if isinstance(v, tuple) else v
                for k, v in config.model.to_dict().items()},
      'class_names': list(info.class_names) if info.class_names else None,
      'eval': {'resize': run.eval_resize_size, 'crop': config.image_size,
               'interpolation': run.eval_interpolation}})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from workdir if it has checkpoints) and returns the final metrics.

  Stopped by SIGTERM, it returns `{'stopped_at_step': N}` after saving step N (or raises
  `distributed.Preempted` when that came before the first step).
  """
  workdir = storage.resolve(workdir)
  run_config.check_workdir(workdir)
  quiet_library_logs()
  with distributed.StopRequest() as stop:
    run = _create_context(config, workdir, stop)
    try:
      if config.eval_only:
        return _evaluate_only(run)
      return _train(run)
    finally:
      run.ckpts.wait()
      run.ckpts.close()
      run.reporter.close()


# ----------------------------------------------------------------------------------------
# State and evaluation.


def _restore_or_create(run: RunContext) -> tuple[steps.TrainState, dict | None, bool]:
  """The latest readable checkpoint of the workdir, else a fresh state; plus the input
  position, and whether the restored step still needs the evaluation the stopped run
  did not finish. Every process must see the same checkpoints and data (checked first)."""
  config, info = run.config, run.info
  saved = run.ckpts.all_steps()
  pending_eval = bool(saved) and _is_eval_step(run, saved[-1]) and (
      saved[-1] not in evaluated_steps(run.workdir))
  distributed.check_same_everywhere({
      'checkpoint steps in WORKDIR/checkpoints': saved,
      'evaluation of the latest checkpoint still to do': pending_eval,
      'training examples': info.num_train_examples,
      'evaluation examples': info.num_eval_examples, 'classes': info.num_classes})
  if not saved:
    variables = initial_variables(config, run.model)
  else:  # only the structure matters: the checkpoint overwrites every value
    variables = jax.device_get(
        init_variables(run.model, jax.random.PRNGKey(config.seed), config.image_size))
  state = sharding.put_replicated(
      steps.create_train_state(variables, run.tx, with_ema=run.with_ema), run.state_sharding)
  logging.info('%s parameters.', f'{sum(x.size for x in jax.tree.leaves(state.params)):,}')
  if not saved:
    _write_run_files(run)
    return state, None, False
  for step in reversed(saved):
    try:
      restored, data_position = run.ckpts.restore(step, state)
      failure = None
    except checkpoints.CheckpointError:
      raise  # the checkpoint does not fit this config: falling back would not help
    except Exception as e:  # pylint: disable=broad-except
      failure = f'{type(e).__name__}: {e}'
    if jax.process_count() > 1:  # all fall back together if any process could not read
      failed = multihost_utils.process_allgather(np.asarray(failure is not None))
      failure = failure or ('another process could not read it' if np.any(failed) else None)
    if failure is None:
      _write_run_files(run)
      logging.info('Resumed from %s/%d.', run.ckpts.directory, step)
      return restored, data_position, pending_eval and step == saved[-1]
    logging.warning('Skipping checkpoint %s/%d, which cannot be read (%s); moved it to %s '
                    'and trying the one before.', run.ckpts.directory, step,
                    failure.splitlines()[0][:300], run.ckpts.set_aside(step))
  raise checkpoints.CheckpointError(
      f'None of the checkpoints in {run.ckpts.directory} (steps {saved}) can be read; see '
      'the warnings above. Move the folder away to start the run afresh.')


def _is_eval_step(run: RunContext, step: int) -> bool:
  return step % run.schedule.eval_every_steps == 0 or step == run.schedule.total_steps


def evaluate(run: RunContext, state: steps.TrainState) -> dict[str, float] | None:
  """Loss, top-1 and top-5 over every example of config.eval_split, each counted once;
  with a moving average, its results too (`eval_ema_*`), from the same batches. None when
  SIGTERM stopped it (checked at every batch)."""
  states = {'': state}
  if state.ema is not None:
    states['ema_'] = state.averaged()
  totals = {}
  for local_batch in pipeline.create_eval_iterator(
      run.config, resize_size=run.eval_resize_size, interpolation=run.eval_interpolation):
    batch = pipeline.make_global_batch(local_batch, run.batch_sharding)
    for prefix, weights in states.items():
      sums = run.jitted.eval(weights, batch)
      totals[prefix] = (sums if prefix not in totals
                        else jax.tree.map(jnp.add, totals[prefix], sums))
    run.watchdog.progress(timed=False)
    if run.stop.requested():
      return None
  if not totals:
    raise ValueError(f'The eval split {run.config.eval_split!r} gave no batches; check '
                     'config.eval_split.')
  results = {}
  for prefix, sums in jax.device_get(totals).items():
    metrics = steps.mean_eval_metrics(sums)
    results.update({f'eval_{prefix}{k[len("eval_"):]}': v for k, v in metrics.items()
                    if not (prefix and k == 'eval_count')})
  return results


def _evaluate_and_report(run: RunContext, state: steps.TrainState, step: int) -> dict | None:
  metrics = evaluate(run, state)
  if metrics is None:
    return None
  run.reporter.write(step, metrics)
  logging.info('Evaluation at step %d: %s', step, _format_metrics(metrics))
  return metrics


def _evaluate_only(run: RunContext) -> dict[str, float]:
  config = run.config
  if not config.init_from and run.ckpts.latest_step() is None:
    raise ValueError('config.eval_only needs weights: set config.init_from to a '
                     'checkpoint or converted weights, or a --workdir with checkpoints.')
  if config.init_from:
    variables = initial_variables(config, run.model, whole=True)
    state = sharding.put_replicated(steps.create_train_state(variables, run.tx),
                                    run.state_sharding)
    _write_run_files(run)
  else:
    state, _, _ = _restore_or_create(run)
  run.stop.training_started()
  step = int(jax.device_get(state.step))
  with run.watchdog.paused():
    metrics = _evaluate_and_report(run, state, step)
  if metrics is None:
    logging.warning('SIGTERM received during evaluation; stopped. Rerun to evaluate.')
    return {'stopped_at_step': step}
  return metrics


def _format_metrics(metrics: dict[str, float]) -> str:
  return ', '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                   for k, v in metrics.items())


# ----------------------------------------------------------------------------------------
# The loop.


class _StepMetrics:
  """Train metrics still on the device, checked for divergence before each log and save
  (which it does, so that no diverged state is ever saved)."""

  def __init__(self, run: RunContext, last_saved: int | None):
    self._run = run
    self.last_saved = last_saved
    self._pending = []  # device metrics not yet fetched
    self.logged = []  # host metrics since the last log line

  def add(self, metrics: dict) -> None:
    self._pending.append(metrics)

  def check(self, step: int) -> None:
    """Fetches the pending metrics; raises TrainingDivergedError on a non-finite one."""
    fetched = jax.device_get(self._pending)
    self._pending.clear()
    for i, metrics in enumerate(fetched):
      if not (np.isfinite(metrics['loss']) and np.isfinite(metrics['grad_norm'])):
        bad_step = step - len(fetched) + i + 1
        kept = (f'the last good checkpoint is step {self.last_saved} in '
                f'{self._run.ckpts.directory}' if self.last_saved is not None
                else 'no checkpoint was written')
        raise TrainingDivergedError(
            f'The loss became {metrics["loss"]} at step {bad_step}; stopping ({kept}). '
            'Lower config.learning_rate, add warmup (config.warmup_epochs), or check '
            'the data.')
    self.logged.extend(fetched)

  def save(self, step: int, state: steps.TrainState, batches: DevicePrefetcher,
           times: PhaseTimes) -> None:
    with times.phase('step'):
      self.check(step)
    with times.phase('checkpoint'), self._run.watchdog.paused():
      # With the position of the next batch a step would take.
      self._run.ckpts.save(step, state, batches.get_state())
    self.last_saved = step

  def stop_at(self, step: int, state: steps.TrainState, batches: DevicePrefetcher,
              times: PhaseTimes) -> dict[str, int]:
    """Saves `step` (unless saved already) for a SIGTERM, waits for the save, says so."""
    if self.last_saved != step:
      self.save(step, state, batches, times)
    with self._run.watchdog.paused():
      self._run.ckpts.wait()
    logging.warning('SIGTERM received: saved a checkpoint at step %d in %s and stopped. '
                    'Rerun the same command to continue.', step, self._run.ckpts.directory)
    return {'stopped_at_step': step}


def _train(run: RunContext) -> dict[str, float]:
  config, schedule, ckpts = run.config, run.schedule, run.ckpts
  state, data_position, evaluate_first = _restore_or_create(run)
  start_step = int(jax.device_get(state.step))
  train_iter = pipeline.create_train_iterator(config, start_step=start_step)
  if data_position is not None:
    train_iter.set_state(data_position)
  log = _TrainLog(run, start_step)
  metrics = _StepMetrics(run, start_step if ckpts.latest_step() is not None else None)
  final_metrics: dict[str, float] = {}
  stop_at = lambda step: metrics.stop_at(step, state, batches, log.times)
  to_device = lambda batch: pipeline.make_global_batch(batch, run.batch_sharding)
  # On an accelerator the next step is dispatched while the current one runs, so the
  # device never waits for the host. On a CPU that only makes two steps' scratch buffers
  # live at once: the heap grows and every step faults in fresh pages for a while
  # (docs/performance.md), so there each step is finished before the next starts.
  one_step_at_a_time = jax.default_backend() == 'cpu'
  with run.watchdog, DevicePrefetcher(train_iter, to_device) as batches:
    run.stop.training_started()
    if evaluate_first:
      logging.info('Step %d was saved but its evaluation did not finish: evaluating it.',
                   start_step)
      final_metrics = log.evaluate(state, start_step)
      if final_metrics is None:
        return stop_at(start_step)
    for step in range(start_step + 1, schedule.total_steps + 1):
      with log.times.phase('input'):
        batch = next(batches)
      with log.times.phase('step'):
        state, step_metrics = run.jitted.train(state, batch)
        if one_step_at_a_time:
          jax.block_until_ready(step_metrics)
      run.watchdog.progress()
      metrics.add(step_metrics)
      if run.stop.requested():
        return stop_at(step)
      is_last = step == schedule.total_steps
      if step % config.log_every_steps == 0 or is_last:
        with log.times.phase('step'):
          metrics.check(step)
        log.write(step, metrics.logged)
        metrics.logged.clear()
      if step % config.checkpoint_every_steps == 0 or is_last:
        metrics.save(step, state, batches, log.times)
      if _is_eval_step(run, step):
        final_metrics = log.evaluate(state, step)
        if final_metrics is None:
          return stop_at(step)

  with run.watchdog.paused():
    ckpts.wait()
  logging.info('Done. Checkpoints: %s; TensorBoard logs and metrics.jsonl: %s',
               ckpts.directory, run.workdir)
  return final_metrics


class _TrainLog:
  """Each log step's console line and metrics: the mean train metrics since the last
  one, the speed, and where the wall time went (and, once, whether input held it up)."""

  def __init__(self, run: RunContext, start_step: int):
    self._run = run
    self._progress = ProgressLine(run.schedule.total_steps, run.config.batch_size,
                                  start_step)
    self.times = PhaseTimes()
    self._input_bound = InputBoundWarning()
    self._evaluated = False

  def evaluate(self, state: steps.TrainState, step: int) -> dict | None:
    """Evaluates and reports; the first evaluation compiles, so the watchdog waits it out."""
    with self.times.phase('eval'):
      if self._evaluated:
        return _evaluate_and_report(self._run, state, step)
      self._evaluated = True
      with self._run.watchdog.paused():
        return _evaluate_and_report(self._run, state, step)

  def write(self, step: int, logged: list[dict]) -> None:
    loss = float(np.mean([m['loss'] for m in logged]))
    learning_rate = float(logged[-1]['learning_rate'])
    shares = self.times.shares()
    line = self._progress(step, loss, learning_rate)
    self._run.reporter.write(step, {
        'train_loss': loss, 'learning_rate': learning_rate,
        'train_top1': float(np.mean([m['top1'] for m in logged])),
        'images_per_sec': self._progress.images_per_sec, **shares})
    logging.info('%s | %s', line, describe_shares(shares))
    self._input_bound.check(shares)
