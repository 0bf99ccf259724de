"""Augmentations against torchvision: every op pixel for pixel on the same uint8 images,
the magnitude bins, the samplers (pure functions of the seed, covering every op, bin and
sign), random erasing's rectangles, probability and colour, and the config name check.

All comparisons are exact. The colour ops repeat torch's float32 arithmetic step for step
(truncation included), and the sums whose order is unknown (contrast's mean, sharpness's
3x3 blur) are integers or never near a rounding tie. The warps follow torch's float32 grid,
including the fused multiply-add of its CPU matmul, and round half to even as grid_sample
does, so even exact half-pixel ties (a 90 degree turn of an odd side, a whole-number shear)
pick torch's pixel; on a CPU whose BLAS summed the 3-term grid product in another order,
only such tie pixels could differ.
"""

import functools

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode, autoaugment

from resnext_jax.data import augment
from resnext_jax.model.resnext import MEAN_RGB, STDDEV_RGB
import tensorflow as tf  # pylint: disable=g-bad-import-order  (after torch, see conftest)

_MEAN_COLOUR = (124, 116, 104)  # MEAN_RGB rounded: torchvision's erase value 0.


def _images() -> dict[str, np.ndarray]:
  """Odd and even sides (ties of the warps), full and narrow ranges (autocontrast,
  equalize), a constant channel and a two-level one (their degenerate branches)."""
  rng = np.random.default_rng(0)
  rows, cols = np.mgrid[0:64, 0:48]
  degenerate = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
  degenerate[..., 0] = 77
  degenerate[..., 1] = np.where(rng.random((40, 56)) < 0.999, 200, 10)
  return {
      'noise_33x47': rng.integers(0, 256, (33, 47, 3), dtype=np.uint8),
      'narrow_40x56': rng.integers(60, 121, (40, 56, 3), dtype=np.uint8),
      'gradient_64x48': np.stack([rows * 4, cols * 5, (rows + cols) * 2], -1).astype(np.uint8),
      'degenerate_40x56': degenerate,
  }


# pylint: disable=protected-access  (torchvision's bins and ops themselves are the reference)
IMAGES = _images()
TRIVIAL_SPACE = autoaugment.TrivialAugmentWide()._augmentation_space(31)


def _rand_space(height, width):
  return autoaugment.RandAugment()._augmentation_space(31, (height, width))


def _magnitudes(op: str) -> list[float]:
  """The magnitudes torchvision can pass for `op`, as it passes them (float32 bins read out
  as Python floats, both signs when signed), plus ties a real bin could only come near."""
  values = set()
  for space in (TRIVIAL_SPACE, _rand_space(40, 56)):
    bins, signed = space[op]
    for value in bins.reshape(-1).tolist():
      values.update({float(value), -float(value)} if signed else {float(value)})
  extra = {'ShearX': [0.5, -1.0, 3.0], 'ShearY': [0.5, -1.0, 3.0],
           'Rotate': [90.0, -90.0, 180.0]}
  return sorted(values | set(extra.get(op, [])))


@functools.cache
def _traced(op: str):
  return tf.function(lambda image, magnitude: augment.apply_op(image, op, magnitude))


def _torchvision(image: np.ndarray, op: str, magnitude: float) -> np.ndarray:
  chw = torch.from_numpy(image).permute(2, 0, 1).contiguous()
  out = autoaugment._apply_op(chw, op, magnitude, InterpolationMode.NEAREST, None)
  return out.permute(1, 2, 0).numpy()


def _seeds(n: int, run_seed: int = 7) -> tf.data.Dataset:
  return tf.data.Dataset.range(n).map(lambda p: tf.stack([tf.constant(run_seed, tf.int64), p]))


def _map_seeds(fn, n: int, run_seed: int = 7):
  """fn(seed) for seeds (run_seed, 0 .. n-1), run as the input pipeline runs it: a tf.data
  map, in graph mode."""
  return next(iter(_seeds(n, run_seed).map(fn, num_parallel_calls=2).batch(n)))


@pytest.mark.parametrize('policy', ['trivial_augment_wide', 'rand_augment'])
def test_magnitude_bins_match_torchvision(policy):
  height, width = 40, 56
  space = TRIVIAL_SPACE if policy == 'trivial_augment_wide' else _rand_space(height, width)
  table = augment.magnitude_table(policy, 31, height, width).numpy()
  for k, op in enumerate(augment.OP_NAMES):
    want = np.broadcast_to(space[op][0].numpy().astype(np.float32), (31,))
    # torch.linspace's float32 CPU kernel is up to an ulp off the exact bin (which ulp
    # depends on the CPU's vector width); ours are the exact bins rounded once.
    np.testing.assert_array_less(np.abs(table[k] - want), np.spacing(np.abs(want)) * 1.01,
                                 err_msg=op)
    assert space[op][1] == (op in augment.SIGNED_OPS), op
  if policy == 'trivial_augment_wide':  # The one bin where that ulp changes int(): 16 pixels.
    assert table[augment.OP_NAMES.index('TranslateX'), 15] == 16.0


@pytest.mark.parametrize('op', augment.OP_NAMES)
def test_op_matches_torchvision(op):
  for name, image in IMAGES.items():
    for magnitude in _magnitudes(op):
      got = _traced(op)(tf.constant(image), tf.constant(magnitude, tf.float64)).numpy()
      want = _torchvision(image, op, magnitude)
      mismatched = np.any(got != want, axis=-1)
      assert not mismatched.any(), (
          f'{op}({magnitude}) on {name}: {mismatched.sum()} pixels differ, e.g. at '
          f'{np.argwhere(mismatched)[0]}')


def test_python_magnitude_is_not_rounded_to_float32():
  # 1 + -0.99 in float64 is 0.01 and 0.01 * 100 truncates to 1; through float32 first, 0.
  image = np.full((8, 8, 3), 100, np.uint8)
  got = augment.apply_op(tf.constant(image), 'Brightness', -0.99).numpy()
  np.testing.assert_array_equal(got, _torchvision(image, 'Brightness', -0.99))


def test_unknown_op_is_refused_with_the_valid_ones():
  with pytest.raises(ValueError, match='Invert.*valid ops: Identity, ShearX'):
    augment.apply_op(tf.zeros([4, 4, 3], tf.uint8), 'Invert')


@pytest.mark.parametrize('augmentation', [
    augment.trivial_augment_wide,
    augment.rand_augment,
    functools.partial(augment.random_erasing, probability=0.5),
], ids=['trivial_augment_wide', 'rand_augment', 'random_erasing'])
def test_augmentation_is_a_pure_function_of_the_seed(augmentation):
  image = tf.constant(IMAGES['noise_33x47'])
  first = _map_seeds(lambda seed: augmentation(image, seed), 64).numpy()
  again = _map_seeds(lambda seed: augmentation(image, seed), 64).numpy()
  np.testing.assert_array_equal(first, again)
  eager = augmentation(image, tf.constant([7, 5], tf.int64)).numpy()
  np.testing.assert_array_equal(eager, first[5])
  other_run = _map_seeds(lambda seed: augmentation(image, seed), 64, run_seed=8).numpy()
  # Draws that change nothing (Identity, bin 0, no erasing: half the time at p=0.5) repeat;
  # the rest differ from seed to seed.
  assert np.mean(np.any(first != other_run, axis=(1, 2, 3))) > 0.5
  assert len({x.tobytes() for x in first}) > 24


def test_trivial_augment_wide_draws_every_op_bin_and_sign_uniformly():
  n = 14_000
  ops, magnitudes = (x.numpy() for x in _map_seeds(augment.sample_trivial_augment_wide, n))
  counts = np.bincount(ops, minlength=len(augment.OP_NAMES))
  assert np.all(np.abs(counts - n / 14) < 0.15 * n / 14), counts  # 1000 +- 150: 5 sigma.
  table = augment.magnitude_table('trivial_augment_wide', 31).numpy()
  for k, op in enumerate(augment.OP_NAMES):
    # ~1000 draws over at most 62 (bin, sign) pairs: each is expected about 16 times.
    want = set(table[k]) | ({-x for x in table[k]} if op in augment.SIGNED_OPS else set())
    assert set(magnitudes[ops == k]) == want, op


def test_trivial_augment_wide_applies_the_sampled_op():
  image = tf.constant(IMAGES['gradient_64x48'])
  for position in range(12):
    seed = tf.constant([3, position], tf.int64)
    op, magnitude = augment.sample_trivial_augment_wide(seed)
    want = augment.apply_op(image, augment.OP_NAMES[int(op)], magnitude)
    np.testing.assert_array_equal(augment.trivial_augment_wide(image, seed), want)


def test_trivial_augment_wide_in_tf_data_matches_torchvision():
  # The graph tf.data runs (switch_case over the ops, Grappler's rewrites) against
  # torchvision's ops at the drawn magnitudes, on odd sides where the warps meet ties.
  image = IMAGES['noise_33x47']
  n = 300
  out = _map_seeds(lambda seed: augment.trivial_augment_wide(tf.constant(image), seed), n)
  ops, magnitudes = _map_seeds(augment.sample_trivial_augment_wide, n)
  for got, op, magnitude in zip(out.numpy(), ops.numpy(), magnitudes.numpy()):
    op = augment.OP_NAMES[op]
    np.testing.assert_array_equal(got, _torchvision(image, op, float(magnitude)),
                                  err_msg=f'{op}({magnitude})')


def test_rand_augment_in_tf_data_matches_torchvision():
  image = IMAGES['gradient_64x48']
  n = 150
  out = _map_seeds(
      lambda seed: augment.rand_augment(tf.constant(image), seed, magnitude=30), n)
  ops, magnitudes = _map_seeds(
      lambda seed: augment.sample_rand_augment(seed, 64, 48, magnitude=30), n)
  for got, drawn_ops, drawn_magnitudes in zip(out.numpy(), ops.numpy(), magnitudes.numpy()):
    want = image
    for op, magnitude in zip(drawn_ops, drawn_magnitudes):
      want = _torchvision(want, augment.OP_NAMES[op], float(magnitude))
    np.testing.assert_array_equal(got, want, err_msg=f'{drawn_ops} {drawn_magnitudes}')


def test_rand_augment_draws_every_op_and_sign_at_its_fixed_magnitude():
  height, width = 40, 56
  ops, magnitudes = (x.numpy() for x in _map_seeds(
      lambda seed: augment.sample_rand_augment(seed, height, width), 3000))
  assert ops.shape == magnitudes.shape == (3000, 2)
  space = _rand_space(height, width)
  for k, op in enumerate(augment.OP_NAMES):
    bins, signed = space[op]
    bin9 = np.float32(bins[9] if bins.ndim else bins)
    for position in range(2):
      drawn = magnitudes[ops[:, position] == k, position]
      assert len(drawn) > 150, (op, position)  # ~214 expected.
      np.testing.assert_allclose(np.abs(drawn), abs(bin9), rtol=2e-7, err_msg=op)
      assert (drawn < 0).any() == (signed and bin9 != 0), (op, position)


def test_rand_augment_applies_the_sampled_ops_in_order():
  image = tf.constant(IMAGES['noise_33x47'])
  for position in range(12):
    seed = tf.constant([3, position], tf.int64)
    ops, magnitudes = augment.sample_rand_augment(seed, 33, 47, num_ops=3, magnitude=20)
    want = image
    for op, magnitude in zip(ops.numpy(), magnitudes):
      want = augment.apply_op(want, augment.OP_NAMES[op], magnitude)
    got = augment.rand_augment(image, seed, num_ops=3, magnitude=20)
    np.testing.assert_array_equal(got, want)


def _erased(probability, n, **kwargs):
  """[n, 48, 64] masks of the pixels random_erasing changed in a constant image, and the
  [n, 48, 64, 3] results."""
  image = tf.fill([48, 64, 3], tf.constant(7, tf.uint8))
  out = _map_seeds(lambda seed: augment.random_erasing(image, seed, probability, **kwargs), n)
  out = out.numpy()
  return np.any(out != 7, axis=-1), out


def test_random_erasing_rectangles_follow_scale_and_ratio():
  scale, ratio = (0.02, 0.33), (0.3, 3.3)
  masks, out = _erased(1.0, 400, scale=scale, ratio=ratio)
  area = 48 * 64
  erased = masks.any(axis=(1, 2))
  assert erased.mean() > 0.95  # All ten tries missing the image is rare at these bounds.
  edges = []
  for mask, pixels in zip(masks[erased], out[erased]):
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = len(rows), len(cols)
    assert mask.sum() == h * w and rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
    assert h < 48 and w < 64
    # h and w are each rounded by up to half a pixel from sqrt(area * ratio), sqrt(area / ratio).
    assert scale[0] * area - (h + w) / 2 - 1 <= h * w <= scale[1] * area + (h + w) / 2 + 1
    assert (h - 0.5) / (w + 0.5) <= ratio[1] and (h + 0.5) / (w - 0.5) >= ratio[0]
    np.testing.assert_array_equal(pixels[mask], np.broadcast_to(_MEAN_COLOUR, (h * w, 3)))
    edges.append((rows[0], cols[0], rows[-1], cols[-1]))
  # Placed anywhere, touching each side of the image now and then.
  np.testing.assert_array_equal(np.min(edges, axis=0)[:2], [0, 0])
  np.testing.assert_array_equal(np.max(edges, axis=0)[2:], [47, 63])


def test_random_erasing_respects_the_probability():
  assert not _erased(0.0, 200)[0].any()
  erased = _erased(0.3, 1000)[0].any(axis=(1, 2))
  assert abs(erased.mean() - 0.3) < 0.05  # sd 0.015, and a few draws find no rectangle.


def test_random_erasing_value_is_torchvisions_after_normalisation():
  assert tuple(np.round(MEAN_RGB).astype(int)) == _MEAN_COLOUR
  value = (1.0, -1.5, 0.25)
  masks, out = _erased(1.0, 20, value=value)
  pixels = out[masks]
  normalised = (pixels - np.array(MEAN_RGB)) / np.array(STDDEV_RGB)
  # The nearest uint8: within half a level of torchvision's value after normalisation.
  assert np.all(np.abs(normalised - value) <= 0.5 / np.array(STDDEV_RGB))


def test_build_augment():
  image = tf.constant(IMAGES['noise_33x47'])
  seed = tf.constant([1, 2], tf.int64)
  np.testing.assert_array_equal(augment.build_augment('')(image, seed), image)
  np.testing.assert_array_equal(augment.build_augment('trivial_augment_wide')(image, seed),
                                augment.trivial_augment_wide(image, seed))
  np.testing.assert_array_equal(
      augment.build_augment('rand_augment', num_ops=1, magnitude=30)(image, seed),
      augment.rand_augment(image, seed, num_ops=1, magnitude=30))
  with pytest.raises(ValueError) as error:
    augment.build_augment('autoaugment')
  for name in ("'autoaugment'", "''", "'trivial_augment_wide'", "'rand_augment'"):
    assert name in str(error.value)
