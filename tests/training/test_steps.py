"""The jitted steps over a mesh: batch checks, 8 devices like 1, exact eval sums."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnext_jax.model.resnext import ResNeXt, init_variables, normalize_images
from resnext_jax.training import optim, sharding, steps
from tests.helpers import TINY_MODEL, config_with


def test_batch_size_must_divide_over_devices():
  mesh = sharding.create_mesh((-1,))
  assert mesh.devices.size == 8
  with pytest.raises(ValueError, match=r'batch_size=12 does not divide over the 8 devices.*'
                                       r'multiple of 8 \(e\.g\. 8 or 16\)'):
    sharding.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match='only a 1-D data-parallel mesh'):
    sharding.create_mesh((4, 2))


def test_a_smaller_mesh_takes_devices_from_every_process():
  class Device:
    def __init__(self, process_index, i):
      self.process_index, self.id = process_index, i

  devices = [Device(p, i) for p in range(4) for i in range(8)]  # 4 hosts x 8 chips
  chosen = sharding.spread_over_processes(devices, 8, (8,))
  assert [(d.process_index, d.id) for d in chosen] == [
      (p, i) for p in range(4) for i in range(2)]
  with pytest.raises(ValueError, match=r'6 devices do not split evenly over the 4 processes'):
    sharding.spread_over_processes(devices, 6, (6,))


def _run_steps(mesh, batches, config, model, options=steps.StepOptions()):
  tx = optim.create_optimizer(config, lambda step: 0.1)
  jitted = steps.jit_steps(model, tx, mesh, learning_rate_fn=lambda step: 0.1,
                          options=options)
  variables = jax.device_get(init_variables(model, jax.random.PRNGKey(0), 32))
  state = sharding.put_replicated(
      steps.create_train_state(variables, tx, with_ema=options.ema_decay is not None),
      sharding.replicated(mesh))
  losses = []
  for batch in batches:
    global_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, metrics = jitted.train(state, global_batch)
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state)


@pytest.mark.parametrize('options', [
    steps.StepOptions(),
    # Mixup/CutMix pair examples across the shards of the batch; the average is updated
    # from the gathered weights.
    steps.StepOptions(label_smoothing=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, seed=3,
                      ema_decay=0.5, ema_every=1, ema_warmup_steps=1),
], ids=['plain', 'recipe'])
def test_eight_devices_train_like_one(options):
  config = config_with(label_smoothing=0.0)
  model = ResNeXt(num_classes=5, **TINY_MODEL)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
              'label': rng.integers(0, 5, (16,), dtype=np.int32)} for _ in range(3)]
  losses8, state8 = _run_steps(sharding.create_mesh((8,)), batches, config, model, options)
  losses1, state1 = _run_steps(sharding.create_mesh((1,)), batches, config, model, options)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for part in ('params', 'batch_stats', 'ema'):
    for a, b in zip(jax.tree.leaves(getattr(state8, part)),
                    jax.tree.leaves(getattr(state1, part))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if options.ema_decay is not None:  # the average lags the weights after the warmup copy
    assert not np.allclose(state8.ema['params']['fc']['kernel'], state8.params['fc']['kernel'])


def test_eval_metrics_count_only_real_examples():
  model = ResNeXt(num_classes=10, **TINY_MODEL)
  variables = jax.device_get(init_variables(model, jax.random.PRNGKey(0), 32))
  state = steps.create_train_state(variables, optax.sgd(0.1))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (10,), dtype=np.int32)
  real = steps.eval_step(state, {'image': images[:8], 'label': labels[:8]}, model=model)
  padded = steps.eval_step(
      state, {'image': np.concatenate([images[:8], 0 * images[8:]]), 'label': labels,
              'mask': np.array([True] * 8 + [False] * 2)}, model=model)
  assert int(padded['count']) == 8
  assert steps.mean_eval_metrics(padded) == pytest.approx(steps.mean_eval_metrics(real),
                                                          rel=1e-6)
  # By hand from the logits: each real example's loss, top-1 and top-5 hits.
  logits = np.asarray(model.apply(variables, normalize_images(images[:8], jnp.float32),
                                  train=False))
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(float(real['loss']),
                             -np.sum(log_probs[np.arange(8), labels[:8]]), rtol=1e-5)
  assert int(real['top1']) == np.sum(np.argmax(logits, -1) == labels[:8])
  top5_hits = np.sum(np.any(np.argsort(-logits, -1)[:, :5] == labels[:8, None], -1))
  assert 0 < top5_hits < 8  # neither all nor none: the comparison matters
  assert int(real['top5']) == top5_hits
  with pytest.raises(ValueError, match='no examples'):
    steps.mean_eval_metrics({'loss': 0.0, 'top1': 0, 'top5': 0, 'count': 0})
