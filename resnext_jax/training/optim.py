"""The optimizer and learning-rate schedule a config asks for, derived once.

Imports only jax and optax (configs are read by attribute, without ml_collections), so
that `python -m resnext_jax.benchmark` builds the very optimizer the trainer uses.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Every number derived from the config and the dataset size, computed once."""
  steps_per_epoch: int
  total_steps: int
  base_learning_rate: float  # config.learning_rate scaled by batch_size / 256
  warmup_steps: int
  boundaries: tuple[int, ...]  # steps where the step schedule decays
  eval_every_steps: int


def derive_schedule(config, num_train_examples: int) -> Schedule:
  """The schedule's numbers for `config` (a ConfigDict of the fields in default_config)."""
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


def create_learning_rate_fn(config, schedule: Schedule) -> optax.Schedule:
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


def create_optimizer(config, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """The config's SGD (`sgd` with config.momentum, nesterov and weight decay)."""
  return sgd(learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov,
             weight_decay=config.weight_decay,
             decay_norms_and_biases=config.weight_decay_on_bn_and_bias)


def sgd(learning_rate: float | optax.Schedule, *, momentum: float, weight_decay: float,
        nesterov: bool = False,
        decay_norms_and_biases: bool = True) -> optax.GradientTransformation:
  """PyTorch-style SGD: weight decay added to the gradient, then momentum.

  Without `decay_norms_and_biases`, only parameters of two or more dimensions (kernels)
  are decayed.
  """
  mask = None
  if not decay_norms_and_biases:
    mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))
