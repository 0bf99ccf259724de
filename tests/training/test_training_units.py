"""Trainer pieces that need no dataset: schedule, optimizer, weight merging, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from resnext_jax.model.resnext import ResNeXt, init_variables, normalize_images
from resnext_jax.training import checkpoints, default_config, optim, sharding, steps, variables


def make_config(**overrides):
  config = default_config.get_config()
  config.update(overrides)
  return config


def test_derived_schedule_of_the_seed_recipe():
  schedule = optim.derive_schedule(make_config(batch_size=512), 1_281_167)
  assert schedule.steps_per_epoch == 2502
  assert schedule.total_steps == 250_200
  assert schedule.base_learning_rate == pytest.approx(0.2)
  assert schedule.boundaries == (75_060, 150_120, 225_180)
  assert schedule.eval_every_steps == 2502
  assert optim.derive_schedule(make_config(num_train_steps=7), 1000).total_steps == 7


def test_batch_larger_than_dataset_is_refused():
  with pytest.raises(ValueError, match='batch_size=256 is larger than the 100 training'):
    optim.derive_schedule(make_config(), 100)


def test_step_schedule_decays_tenfold_at_each_boundary():
  config = make_config(batch_size=256, num_epochs=4, lr_boundaries=(1, 2, 3))
  schedule = optim.derive_schedule(config, 2560)  # 10 steps per epoch
  lr = optim.create_learning_rate_fn(config, schedule)
  got = [float(lr(s)) for s in (0, 9, 10, 19, 20, 30, 39)]
  np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 0.001, 1e-4, 1e-4], rtol=1e-5)


def test_cosine_schedule_with_warmup():
  config = make_config(batch_size=256, num_epochs=10, lr_schedule='cosine', warmup_epochs=1)
  schedule = optim.derive_schedule(config, 2560)
  lr = optim.create_learning_rate_fn(config, schedule)
  assert float(lr(0)) == pytest.approx(0.01)
  assert float(lr(9)) == pytest.approx(0.1)
  assert float(lr(10)) == pytest.approx(0.1)
  assert float(lr(55)) == pytest.approx(0.05, rel=1e-3)
  assert float(lr(99)) < 1e-3
  with pytest.raises(ValueError, match="lr_schedule='linear'"):
    optim.create_learning_rate_fn(make_config(lr_schedule='linear'), schedule)


@pytest.mark.parametrize('nesterov', [False, True])
def test_optimizer_matches_pytorch_sgd(nesterov):
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(3, 4)).astype(np.float32),
            'b': rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(3)]
  config = make_config(nesterov=nesterov, weight_decay=0.01)
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
  config = make_config(weight_decay=0.5, weight_decay_on_bn_and_bias=False, momentum=0.0)
  tx = optim.create_optimizer(config, lambda step: 1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(updates['kernel'], -0.5)
  np.testing.assert_allclose(updates['scale'], 0.0)


TINY = dict(stage_sizes=(1, 1), cardinality=4, width_per_group=2, base_planes=8)


def test_merge_pretrained_replaces_only_a_head_of_a_different_size():
  source = init_variables(ResNeXt(num_classes=10, **TINY), jax.random.PRNGKey(1), 32)
  target = init_variables(ResNeXt(num_classes=3, **TINY), jax.random.PRNGKey(2), 32)
  merged, not_loaded = variables.merge_pretrained(jax.device_get(target),
                                                jax.device_get(source), 'SRC')
  assert not_loaded == ['params/fc/bias: checkpoint (10,), this config (3,)',
                        'params/fc/kernel: checkpoint (64, 10), this config (64, 3)']
  np.testing.assert_array_equal(merged['params']['fc']['kernel'],
                                target['params']['fc']['kernel'])
  np.testing.assert_array_equal(merged['params']['conv1']['kernel'],
                                source['params']['conv1']['kernel'])
  np.testing.assert_array_equal(merged['batch_stats']['bn1']['var'],
                                source['batch_stats']['bn1']['var'])


def test_merge_pretrained_refuses_a_different_backbone():
  source = init_variables(ResNeXt(num_classes=3, **TINY), jax.random.PRNGKey(1), 32)
  other = dict(TINY, stage_sizes=(1, 2))
  target = init_variables(ResNeXt(num_classes=3, **other), jax.random.PRNGKey(2), 32)
  with pytest.raises(ValueError, match=r'init_from=SRC does not fit.*15 variables differ'
                                       r'.*\n  params/layer2_1/bn1/bias: missing, '
                                       r'this config \(16,\)'):
    variables.merge_pretrained(jax.device_get(target), jax.device_get(source), 'SRC')
  wider = dict(TINY, width_per_group=4)
  target = init_variables(ResNeXt(num_classes=3, **wider), jax.random.PRNGKey(2), 32)
  with pytest.raises(ValueError, match=r'checkpoint \(8,\), this config \(16,\)'):
    variables.merge_pretrained(jax.device_get(target), jax.device_get(source), 'SRC')


def test_batch_size_must_divide_over_devices():
  mesh = sharding.create_mesh((-1,))
  assert mesh.devices.size == 8
  with pytest.raises(ValueError, match=r'batch_size=12 does not divide over the 8 devices.*'
                                       r'multiple of 8 \(e\.g\. 8 or 16\)'):
    sharding.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match='only a 1-D data-parallel mesh'):
    sharding.create_mesh((4, 2))


def _run_steps(mesh, batches, config, model):
  tx = optim.create_optimizer(config, lambda step: 0.1)
  jitted = steps.jit_steps(model, tx, mesh, learning_rate_fn=lambda step: 0.1,
                          label_smoothing=config.label_smoothing)
  variables = jax.device_get(init_variables(model, jax.random.PRNGKey(0), 32))
  state = sharding.put_replicated(steps.create_train_state(variables, tx),
                                 sharding.replicated(mesh))
  losses = []
  for batch in batches:
    global_batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, metrics = jitted.train(state, global_batch)
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state)


def test_eight_devices_train_like_one():
  config = make_config(label_smoothing=0.0)
  model = ResNeXt(num_classes=5, **TINY)
  rng = np.random.default_rng(0)
  batches = [{'image': rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
              'label': rng.integers(0, 5, (16,), dtype=np.int32)} for _ in range(3)]
  losses8, state8 = _run_steps(sharding.create_mesh((8,)), batches, config, model)
  losses1, state1 = _run_steps(sharding.create_mesh((1,)), batches, config, model)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(state8.batch_stats), jax.tree.leaves(state1.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_eval_metrics_count_only_real_examples():
  model = ResNeXt(num_classes=10, **TINY)
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


def test_progress_line_gives_time_left_once_compilation_is_behind(monkeypatch):
  from resnext_jax.training import reporting
  clock = iter([0.0, 30.0, 32.0])  # start; 10 steps incl. compile; 10 more steps
  monkeypatch.setattr(reporting.time, 'perf_counter', lambda: next(clock))
  progress = reporting.ProgressLine(total_steps=110, batch_size=16, start_step=0)
  first = progress(10, 1.5, 0.1)
  assert first.endswith('includes compilation') and 'step 10/110' in first
  assert progress(20, 1.2, 0.1) == ('step 20/110 | loss 1.2000 | lr 0.1 | 80.0 img/s | '
                                    '0m18s left')


def test_checkpoint_shape_mismatches_name_each_difference():
  saved = {'batch_stats': {'m': np.zeros(2)},
           'params': {'a': np.zeros((2, 3)), 'b': np.zeros(4), 'old': np.zeros(1)}}
  wanted = {'batch_stats': {'m': np.zeros(3)},
            'params': {'a': np.zeros((2, 3)), 'b': np.zeros(5), 'new': np.zeros((1, 2))}}
  assert list(checkpoints.shape_mismatches(saved, wanted).items()) == [  # params first
      ('params/b', 'params/b: checkpoint (4,), this config (5,)'),
      ('params/new', 'params/new: missing, this config (1, 2)'),
      ('params/old', 'params/old: in the checkpoint, not in this config'),
      ('batch_stats/m', 'batch_stats/m: checkpoint (2,), this config (3,)')]
  assert not checkpoints.shape_mismatches(saved, saved)
