"""Mixup and CutMix on the batch: torchvision's pairing, box and label rules, determinism,
jit over a sharded batch, and the soft-target loss against torch's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from resnext_jax.model.resnext import normalize_images
from resnext_jax.training import sharding
from resnext_jax.training.mixing import mix_batch, soft_cross_entropy

NUM_CLASSES = 10


def _batch(n=8, height=16, width=12, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
  labels = np.arange(n, dtype=np.int32) % NUM_CLASSES  # neighbours' labels all differ
  return images, labels


def _lam(targets, labels):
  """lam of the batch, read back from the first example's own-class weight."""
  return float(targets[0, labels[0]])


def test_targets_are_distributions_over_own_and_partner_class():
  images, labels = _batch()
  for seed in range(4):
    _, targets = mix_batch(jax.random.PRNGKey(seed), images, labels, num_classes=NUM_CLASSES,
                           mixup_alpha=0.2, cutmix_alpha=1.0)
    targets = np.asarray(targets)
    assert targets.shape == (8, NUM_CLASSES) and targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(-1), 1, atol=1e-6)
    lam = _lam(targets, labels)
    np.testing.assert_allclose(targets[np.arange(8), labels], lam, atol=1e-6)
    np.testing.assert_allclose(targets[np.arange(8), np.roll(labels, 1)], 1 - lam, atol=1e-6)


def test_mixup_blends_each_image_with_the_previous_one():
  images, labels = _batch()
  mixed, targets = mix_batch(jax.random.PRNGKey(1), images, labels, num_classes=NUM_CLASSES,
                             mixup_alpha=0.8, cutmix_alpha=0.0)
  assert mixed.dtype == jnp.float32  # uint8 in, float out: a blend is not an integer
  lam = _lam(np.asarray(targets), labels)
  assert 0 < lam < 1
  x = images.astype(np.float32)
  np.testing.assert_allclose(mixed, lam * x + (1 - lam) * np.roll(x, 1, axis=0), atol=1e-4)


def test_cutmix_pastes_one_box_whose_area_is_the_partner_weight():
  images, labels = _batch()
  images[:] = (np.arange(8, dtype=np.uint8) * 20 + 10)[:, None, None, None]  # one value each
  partner = np.roll(images, 1, axis=0)
  boxes = set()
  for seed in range(6):
    mixed, targets = mix_batch(jax.random.PRNGKey(seed), images, labels,
                               num_classes=NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=1.0)
    mixed = np.asarray(mixed)
    assert np.all((mixed == images) | (mixed == partner))  # pixels are moved, never blended
    taken = np.all(mixed == partner, axis=-1)
    np.testing.assert_array_equal(taken, taken[:1].repeat(8, 0))  # one box for the batch
    rows, cols = np.nonzero(taken[0])
    if rows.size:  # a rectangle
      assert rows.size == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
      boxes.add((rows.min(), rows.max(), cols.min(), cols.max()))
    fraction = taken[0].mean()
    np.testing.assert_allclose(targets[np.arange(8), np.roll(labels, 1)], fraction, atol=1e-6)
  assert len(boxes) > 1


def test_switch_prob_chooses_cutmix_or_mixup():
  images, labels = _batch()
  x = images.astype(np.float32)
  mix = functools.partial(mix_batch, images=images, labels=labels, num_classes=NUM_CLASSES,
                          mixup_alpha=1.0, cutmix_alpha=1.0)
  kinds = []
  for seed in range(8):
    key = jax.random.PRNGKey(seed)
    always_cutmix = np.asarray(mix(key, switch_prob=1.0)[0])
    assert np.all((always_cutmix == x) | (always_cutmix == np.roll(x, 1, axis=0)))
    always_mixup, targets = mix(key, switch_prob=0.0)
    lam = _lam(np.asarray(targets), labels)
    np.testing.assert_allclose(always_mixup, lam * x + (1 - lam) * np.roll(x, 1, axis=0),
                               atol=1e-4)
    targets = np.asarray(mix(key)[1])
    kinds.append(np.any(targets != np.asarray(mix(key, switch_prob=0.0)[1])))
  assert any(kinds) and not all(kinds)  # 0.5: both kinds occur


def test_both_alphas_zero_is_refused():
  images, labels = _batch()
  with pytest.raises(ValueError, match='mixup_alpha > 0 or cutmix_alpha > 0'):
    mix_batch(jax.random.PRNGKey(0), images, labels, num_classes=NUM_CLASSES,
              mixup_alpha=0.0, cutmix_alpha=0.0)
  with pytest.raises(ValueError, match='must be >= 0'):
    mix_batch(jax.random.PRNGKey(0), images, labels, num_classes=NUM_CLASSES,
              mixup_alpha=-1.0, cutmix_alpha=1.0)


def test_same_key_same_mix_and_jit_over_a_sharded_batch():
  images, labels = _batch(n=16)
  mix = functools.partial(mix_batch, num_classes=NUM_CLASSES, mixup_alpha=0.2,
                          cutmix_alpha=1.0)
  key = jax.random.fold_in(jax.random.PRNGKey(0), 7)  # (seed, step), as the step derives it
  eager = mix(key, images, labels)
  for a, b in zip(eager, mix(key, images, labels)):
    np.testing.assert_array_equal(a, b)
  other = mix(jax.random.fold_in(jax.random.PRNGKey(0), 8), images, labels)
  assert not np.array_equal(eager[1], other[1])
  mesh = sharding.create_mesh((8,))
  batch = jax.device_put((images, labels), sharding.batch_sharding(mesh))
  jitted = jax.jit(mix)(key, *batch)
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize('alphas', [(1.0, 0.0), (0.0, 1.0)])
def test_mixing_commutes_with_normalisation(alphas):
  images, labels = _batch()
  mix = functools.partial(mix_batch, jax.random.PRNGKey(3), labels=labels,
                          num_classes=NUM_CLASSES, mixup_alpha=alphas[0],
                          cutmix_alpha=alphas[1])
  mixed_then_normalised = normalize_images(mix(images=images)[0])
  normalised_then_mixed = mix(images=normalize_images(images))[0]
  np.testing.assert_allclose(mixed_then_normalised, normalised_then_mixed, atol=1e-5)


def test_soft_cross_entropy_matches_torch_with_label_smoothing():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, NUM_CLASSES)).astype(np.float32) * 3
  targets = rng.dirichlet(np.ones(NUM_CLASSES) * 0.3, size=6).astype(np.float32)
  for eps in (0.0, 0.1):
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits), torch.from_numpy(targets), reduction='none',
        label_smoothing=eps).numpy()
    np.testing.assert_allclose(soft_cross_entropy(logits, targets, eps), expected, atol=1e-5)
