"""The pure train and eval steps, shared by the trainer and the benchmark.

Batches arrive as uint8 images (normalised here, on the device) with int32 labels, and
for evaluation a `mask` that marks real (not padding) examples. Loss is float32. What a
recipe adds to the plain step (label smoothing, Mixup/CutMix on the global batch, an
average of the weights) is in `StepOptions`, off by default. `jit_steps` wraps the steps
in `jax.jit` with explicit shardings, for the trainer and the benchmark alike. Only jax,
flax and optax are imported here (no clu, no TensorFlow, no Orbax), so that the
benchmark, which runs these steps, works wherever JAX does.
"""

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnext_jax.model.resnext import normalize_images
from resnext_jax.training import ema, mixing, sharding


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step (and checkpoints)."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # The moving average {'params', 'batch_stats'} (with StepOptions.ema_decay), else None.
  ema: Any = None

  def averaged(self) -> 'TrainState':
    """This state with the moving average in place of the weights, to evaluate it."""
    return self.replace(params=self.ema['params'], batch_stats=self.ema['batch_stats'])


def create_train_state(variables: dict, tx: optax.GradientTransformation, *,
                       with_ema: bool = False) -> TrainState:
  """Wraps initial (or restored) model variables and a fresh optimizer state (and, with
  `with_ema`, a moving average that starts as a copy of the variables)."""
  params = variables['params']
  average = None
  if with_ema:
    average = ema.init_ema({'params': params, 'batch_stats': variables['batch_stats']})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables['batch_stats'], opt_state=tx.init(params),
                    ema=average)


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """What a training recipe adds to the plain step; the defaults add nothing (the seed
  recipe). Mixing draws from `seed` folded with the step, so a resumed run mixes exactly
  as an uninterrupted one."""
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0  # > 0: Mixup with lam ~ Beta(alpha, alpha)
  cutmix_alpha: float = 0.0  # > 0: CutMix with lam ~ Beta(alpha, alpha)
  cutmix_prob: float = 0.5  # with both on: the chance a batch gets CutMix, not Mixup
  seed: int = 0
  ema_decay: float | None = None  # a number: keep a moving average, this decay per update
  ema_every: int = 1  # update it every this many steps ...
  ema_warmup_steps: int = 0  # ... copying the weights instead while warming up

  @property
  def mixes(self) -> bool:
    return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy in float32, with optional label smoothing."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(state: TrainState, batch: dict, *, model: nn.Module,
               tx: optax.GradientTransformation, learning_rate_fn=None,
               options: StepOptions = StepOptions()) -> tuple[TrainState, dict]:
  """One SGD step on the global batch; returns the new state and scalar metrics."""
  images, targets = batch['image'], None
  if options.mixes:
    key = jax.random.fold_in(jax.random.key(options.seed), state.step)
    images, targets = mixing.mix_batch(
        key, images, batch['label'], num_classes=model.num_classes,
        mixup_alpha=options.mixup_alpha, cutmix_alpha=options.cutmix_alpha,
        switch_prob=options.cutmix_prob)
  images = normalize_images(images, model.dtype)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'])
    if targets is None:
      losses = cross_entropy(logits, batch['label'], model.num_classes,
                             options.label_smoothing)
    else:
      losses = mixing.soft_cross_entropy(logits, targets, options.label_smoothing)
    return jnp.mean(losses), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss,
      'top1': jnp.mean(jnp.argmax(logits, -1) == batch['label']),
      'grad_norm': optax.tree.norm(grads),  # the trainer stops on a non-finite value
  }
  if learning_rate_fn is not None:
    metrics['learning_rate'] = learning_rate_fn(state.step)
  average = state.ema
  if options.ema_decay is not None:
    average = ema.update_ema(average, {'params': params, 'batch_stats': batch_stats},
                             state.step, decay=options.ema_decay, every=options.ema_every,
                             warmup_steps=options.ema_warmup_steps)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema=average)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module) -> dict[str, jax.Array]:
  """Sum of the loss, top-1 and top-5 hits over a (padded) batch's mask=True examples.

  Sums and a `count` rather than means, so that batches add up exactly across an eval
  pass whatever their padding; `mean_eval_metrics` divides once at the end.
  """
  images = normalize_images(batch['image'], model.dtype)
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       images, train=False)
  labels = batch['label']
  mask = batch.get('mask', jnp.ones(labels.shape, bool))
  top5 = jax.lax.top_k(logits, min(5, model.num_classes))[1]
  loss = cross_entropy(logits, labels, model.num_classes)
  hits = {'top1': jnp.argmax(logits, -1) == labels,
          'top5': jnp.any(top5 == labels[:, None], axis=-1)}
  # A padding example's loss never enters; counts are int32, exact for any eval set.
  sums = {'loss': jnp.sum(jnp.where(mask, loss, jnp.float32(0)))}
  sums.update({name: jnp.sum(mask & hit, dtype=jnp.int32) for name, hit in hits.items()})
  sums['count'] = jnp.sum(mask, dtype=jnp.int32)
  return sums


def mean_eval_metrics(sums: dict) -> dict[str, float]:
  """`eval_loss`, `eval_top1`, `eval_top5` (means) and `eval_count` from summed `eval_step`s."""
  count = float(sums['count'])
  if not count:
    raise ValueError('The evaluation saw no examples (every batch was padding).')
  results = {f'eval_{name}': float(total) / count
             for name, total in sums.items() if name != 'count'}
  results['eval_count'] = int(count)
  return results


@dataclasses.dataclass(frozen=True)
class JittedSteps:
  train: Any  # (state, batch) -> (state, metrics); donates the state
  eval: Any  # (state, batch) -> the batch's metric sums (eval_step)


def jit_steps(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, *,
              learning_rate_fn=None, options: StepOptions = StepOptions()) -> JittedSteps:
  """The train and eval steps, jitted with the state replicated and batches split over
  `mesh` (what `pjit` became)."""
  state_sharding = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, learning_rate_fn=learning_rate_fn,
                        options=options),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, state_sharding), donate_argnums=0)
  evaluate_batch = jax.jit(functools.partial(eval_step, model=model),
                           in_shardings=(state_sharding, batch_sharding),
                           out_shardings=state_sharding)
  return JittedSteps(train=train, eval=evaluate_batch)
