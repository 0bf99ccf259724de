"""The schedule and optimizer a config derives, against hand computations and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from resnext_jax.training import optim
from tests.helpers import config_with


def test_derived_schedule_of_the_seed_recipe():
  schedule = optim.derive_schedule(config_with(batch_size=512), 1_281_167)
  assert schedule.steps_per_epoch == 2502
  assert schedule.total_steps == 250_200
  assert schedule.base_learning_rate == pytest.approx(0.2)
  assert schedule.boundaries == (75_060, 150_120, 225_180)
  assert schedule.eval_every_steps == 2502
  assert optim.derive_schedule(config_with(num_train_steps=7), 1000).total_steps == 7


def test_batch_larger_than_dataset_is_refused():
  with pytest.raises(ValueError, match='batch_size=256 is larger than the 100 training'):
    optim.derive_schedule(config_with(), 100)


def test_step_schedule_decays_tenfold_at_each_boundary():
  config = config_with(batch_size=256, num_epochs=4, lr_boundaries=(1, 2, 3))
  schedule = optim.derive_schedule(config, 2560)  # 10 steps per epoch
  lr = optim.create_learning_rate_fn(config, schedule)
  got = [float(lr(s)) for s in (0, 9, 10, 19, 20, 30, 39)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 1e-4, 1e-4], rtol=1e-5)


def test_cosine_schedule_with_warmup():
  config = config_with(batch_size=256, num_epochs=10, lr_schedule='cosine', warmup_epochs=1)
  schedule = optim.derive_schedule(config, 2560)
  lr = optim.create_learning_rate_fn(config, schedule)
  assert float(lr(0)) == pytest.approx(0.01)
  assert float(lr(9)) == pytest.approx(0.1)
  assert float(lr(10)) == pytest.approx(0.1)
  assert float(lr(55)) == pytest.approx(0.05, rel=1e-3)
  assert float(lr(99)) < 1e-3
  with pytest.raises(ValueError, match="lr_schedule='linear'"):
    optim.create_learning_rate_fn(config_with(lr_schedule='linear'), schedule)


@pytest.mark.parametrize('nesterov', [False, True])
def test_optimizer_matches_pytorch_sgd(nesterov):
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(3, 4)).astype(np.float32),
            'b': rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(3)]
  config = config_with(nesterov=nesterov, weight_decay=0.01)
  tx = optim.create_optimizer(config, lambda step: 0.1)
  ours, opt_state = dict(params), tx.init(params)
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, ours)
    ours = optax.apply_updates(ours, updates)

  theirs = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
  sgd = torch.optim.SGD(theirs.values(), lr=0.1, momentum=0.9, weight_decay=0.01,
                        nesterov=nesterov)
  for g in grads:
    for k, p in theirs.items():
      p.grad = torch.tensor(g[k])
    sgd.step()
  for k in params:
    np.testing.assert_allclose(ours[k], theirs[k].detach().numpy(), rtol=1e-5, atol=1e-6)


def test_weight_decay_can_skip_batchnorm_and_biases():
  params = {'kernel': jnp.ones((2, 2)), 'scale': jnp.ones((2,))}
  config = config_with(weight_decay=0.5, weight_decay_on_bn_and_bias=False, momentum=0.0)
  tx = optim.create_optimizer(config, lambda step: 1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.5)
  np.testing.assert_allclose(updates['scale'], 0.0)
