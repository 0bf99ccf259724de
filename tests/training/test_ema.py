"""The EMA of params and batch_stats: torchvision's decay adjustment, its update and warmup
rules step by step against torch's AveragedModel, and the same under jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.optim import swa_utils

from resnext_jax.training.ema import ema_decay, init_ema, update_ema


def test_decay_is_adjusted_like_torchvision():
  # torchvision's resnet50 recipe: 8 GPUs x 128 images, EMA every 32 steps, 600 epochs.
  adjusted = 1 - (1 - 0.99998) * (8 * 128 * 32 / 600)
  assert ema_decay(0.99998, every=32, global_batch_size=1024, num_epochs=600) == (
      pytest.approx(adjusted, abs=1e-15))
  assert ema_decay(0.9, every=32, global_batch_size=1024, num_epochs=10) == 0.0  # capped
  with pytest.raises(ValueError):
    ema_decay(1.5, every=1, global_batch_size=8, num_epochs=1)


def test_update_by_hand():
  models = [np.float32(v) for v in (1.0, 3.0, -2.0, 5.0)]
  ema = jnp.float32(100.0)  # whatever it starts from, step 0 copies
  expected = []
  for step, model in enumerate(models):
    ema = update_ema(ema, model, step, decay=0.9)
    expected.append(models[0] if step == 0 else 0.9 * expected[-1] + 0.1 * model)
    np.testing.assert_allclose(ema, expected[-1], rtol=1e-6)


def test_every_k_steps_and_warmup_copies():
  tree = {'w': jnp.zeros(2), 'count': jnp.zeros((), jnp.int32)}
  history = []
  for step in range(12):
    model = {'w': jnp.full(2, float(step + 1)), 'count': jnp.asarray(step, jnp.int32)}
    tree = update_ema(tree, model, step, decay=0.5, every=2, warmup_steps=5)
    history.append((float(tree['w'][0]), int(tree['count'])))
  # Updates on even steps only; 0, 2, 4 are in warmup and copy, and so does 6, the first
  # update after it (torchvision reset its count at 4); 8 and 10 average.
  assert history[:8] == [(1, 0), (1, 0), (3, 2), (3, 2), (5, 4), (5, 4), (7, 6), (7, 6)]
  assert history[8:] == [(8, 8), (8, 8), (9.5, 10), (9.5, 10)]


class _TorchvisionEMA(swa_utils.AveragedModel):
  """torchvision's references/classification/utils.py ExponentialMovingAverage."""

  def __init__(self, model, decay):
    super().__init__(model, avg_fn=lambda avg, new, _: decay * avg + (1 - decay) * new,
                     use_buffers=True)


@pytest.mark.parametrize('reference', ['torchvision', 'ema_multi_avg_fn'])
def test_matches_torch_averaged_model_over_epochs_with_warmup(reference):
  decay, every, steps_per_epoch, epochs, warmup_epochs = 0.7, 2, 4, 4, 1
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
  if reference == 'torchvision':
    averaged = _TorchvisionEMA(model, decay)
  else:
    averaged = swa_utils.AveragedModel(
        model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)
  names = [name for name, value in model.state_dict().items() if value.is_floating_point()]
  ema = init_ema({name: jnp.asarray(model.state_dict()[name].numpy()) for name in names})
  update = jax.jit(functools.partial(update_ema, decay=decay, every=every,
                                     warmup_steps=warmup_epochs * steps_per_epoch))
  rng = np.random.default_rng(0)
  for epoch in range(epochs):
    for i in range(steps_per_epoch):  # torchvision's train_one_epoch, after optimizer.step()
      values = {name: rng.normal(size=model.state_dict()[name].shape).astype(np.float32)
                for name in names}
      with torch.no_grad():
        for name in names:
          model.state_dict()[name].copy_(torch.from_numpy(values[name]))
      if i % every == 0:
        averaged.update_parameters(model)
        if epoch < warmup_epochs:
          averaged.n_averaged.fill_(0)
      ema = update(ema, values, jnp.int32(epoch * steps_per_epoch + i))
      expected = averaged.module.state_dict()
      for name in names:
        np.testing.assert_allclose(ema[name], expected[name].numpy(), atol=1e-6, err_msg=name)


def test_jit_matches_eager_and_keeps_dtypes():
  tree = {'params': {'kernel': jnp.ones((3, 2))},
          'batch_stats': {'mean': jnp.zeros(2), 'var': jnp.ones(2, jnp.bfloat16)}}
  model = jax.tree.map(lambda x: x * 3 + 1, tree)
  update = functools.partial(update_ema, decay=0.99, every=3, warmup_steps=0)
  for step in (3, 4, 6):
    eager, jitted = update(tree, model, step), jax.jit(update)(tree, model, jnp.int32(step))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a, b)
  assert update(tree, model, 6)['batch_stats']['var'].dtype == jnp.bfloat16
