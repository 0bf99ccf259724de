"""An exponential moving average of the model's variables (params and batch_stats), as
torchvision's classification reference keeps one (`ExponentialMovingAverage`, an
`AveragedModel` with use_buffers=True, driven by its train.py).

`update_ema` is a pure function of the step, so it runs inside the jitted train step and a
resumed run averages exactly like an uninterrupted one. Its step convention: `step` is the
0-based index of the optimizer step just applied (the train state's step before it is
incremented, the one the learning-rate schedule sees), and the model variables passed are
those after that step. torchvision updates after the optimizer step of batch i when
`i % model_ema_steps == 0`, with i counted from 0 within each epoch; here the cadence runs
over the global step, which is the same whenever steps per epoch is a multiple of `every`
(otherwise only the phase within each epoch differs).
"""

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay(decay: float, *, every: int, global_batch_size: int,
              num_epochs: float) -> float:
  """The decay per update from the nominal `decay`, as torchvision's train.py adjusts it.

  The adjustment (from pycls) keeps the average's horizon, measured in epochs, the same
  whatever the batch size, update interval and run length: 1 - decay is scaled by
  global_batch_size * every / num_epochs, and capped at 1 (an average that only copies).
  """
  if not 0 <= decay <= 1:
    raise ValueError(f'decay={decay} must be within [0, 1].')
  if every < 1 or global_batch_size < 1 or num_epochs <= 0:
    raise ValueError(f'every={every}, global_batch_size={global_batch_size} and '
                     f'num_epochs={num_epochs} must be positive.')
  alpha = (1.0 - decay) * global_batch_size * every / num_epochs
  return 1.0 - min(1.0, alpha)


def init_ema(model_tree: Any) -> Any:
  """The average's starting value: a copy of the model's variables in buffers of its own,
  so that a train state holding both can be donated to the jitted step (XLA refuses to
  donate one buffer twice)."""
  return jax.tree.map(jnp.copy, model_tree)


def update_ema(ema_tree: Any, model_tree: Any, step: jax.Array, *, decay: float,
               every: int = 1, warmup_steps: int = 0) -> Any:
  """The average after optimizer step `step` (see the module docstring for the convention).

  On steps with `step % every == 0` a floating leaf becomes
  `decay * ema + (1 - decay) * model`; on the others it is kept. torchvision resets its
  count of averages after every update within the lr warmup epochs, so each such update,
  and the first one after warmup, copies the model instead: here, an update copies when
  the previous update (at step - every) fell before `warmup_steps`, or there was none.
  Step 0 therefore always copies, whatever `ema_tree` held. Non-floating leaves, if any,
  are copied on every update.
  """
  if every < 1:
    raise ValueError(f'every={every} must be >= 1.')
  if warmup_steps < 0:
    raise ValueError(f'warmup_steps={warmup_steps} must be >= 0.')
  step = jnp.asarray(step)
  updates = step % every == 0
  copies = step - every < warmup_steps

  def update(ema, model):
    model = model.astype(ema.dtype)
    if not jnp.issubdtype(ema.dtype, jnp.floating):
      return jnp.where(updates, model, ema)
    averaged = (decay * ema + (1 - decay) * model).astype(ema.dtype)
    return jnp.where(updates, jnp.where(copies, model, averaged), ema)

  return jax.tree.map(update, ema_tree, model_tree)
