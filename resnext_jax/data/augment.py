"""TrivialAugmentWide, RandAugment and RandomErasing as TF graph functions for tf.data.

They follow torchvision's tensor implementations op for op (torchvision.transforms
.autoaugment and transforms._functional_tensor) on a uint8 [h, w, 3] image, after the
random-resized crop and flip, so that a recipe tuned with torchvision carries over: the same
op sets and magnitude bins, nearest-neighbour warps with black outside that pick the same
pixels (torch's float32 steps are followed, ties included), the same float32 blends
truncated to uint8, the same integer histogram equalisation. As in preprocessing.py every
random draw is stateless, so the result is a pure function of the example's seed.

One deliberate difference: torchvision builds its bins with float32 torch.linspace, whose
CPU kernel lands some bins an ulp off the exact value, which ones depending on the CPU's
vector width (TrivialAugmentWide's Translate bin 15 is 15.999999 on AVX-512, so int()
shifts 15 pixels, not 16). The bins here are the exact linspace rounded once to float32.
"""

import functools
from typing import Callable

import numpy as np
import tensorflow as tf

from resnext_jax.model.resnext import MEAN_RGB, STDDEV_RGB

# torchvision's op order (the dict order of `_augmentation_space`), which the samplers index.
OP_NAMES = ('Identity', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness',
            'Color', 'Contrast', 'Sharpness', 'Posterize', 'Solarize', 'AutoContrast',
            'Equalize')
# Ops whose magnitude gets a random sign.
SIGNED_OPS = ('ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'Rotate', 'Brightness', 'Color',
              'Contrast', 'Sharpness')
AUGMENT_NAMES = ('', 'trivial_augment_wide', 'rand_augment')
ERASE_ATTEMPTS = 10

# Folded into the example's seed, so that each augmentation draws numbers of its own rather
# than repeating the crop's (which uses that seed as it is).
_TRIVIAL_SEED_TAG = 1
_RAND_SEED_TAG = 2
_ERASE_SEED_TAG = 3


def apply_op(image: tf.Tensor, op_name: str, magnitude=0.0) -> tf.Tensor:
  """One op of torchvision's `_apply_op` on a uint8 [h, w, 3] image.

  `magnitude` is what torchvision passes (already signed): a shear as its tangent,
  translation in pixels (truncated to an int), rotation in degrees (counter-clockwise),
  Brightness/Color/Contrast/Sharpness as factor - 1, Posterize as the bits kept, Solarize
  as the threshold; the rest ignore it.
  """
  if op_name not in _OPS:
    raise ValueError(f'Unknown op {op_name!r}; valid ops: {", ".join(OP_NAMES)}.')
  return _OPS[op_name](image, _float64(magnitude))


def apply_op_index(image: tf.Tensor, op_index: tf.Tensor, magnitude: tf.Tensor) -> tf.Tensor:
  """`apply_op` with the op chosen in the graph by its index into OP_NAMES."""
  branches = [functools.partial(apply_op, image, name, magnitude) for name in OP_NAMES]
  return tf.switch_case(op_index, branches)


def magnitude_table(policy: str, num_bins: int, height=None, width=None) -> tf.Tensor:
  """[len(OP_NAMES), num_bins] float32 magnitudes: row k holds the bins of op k in torchvision's
  `_augmentation_space` of `policy` ('trivial_augment_wide' or 'rand_augment'), zeros for
  the ops without any. RandAugment translates by up to 150/331 of the image, so it needs the
  image's height and width."""
  if policy not in AUGMENT_NAMES[1:]:
    raise ValueError(f'Unknown policy {policy!r}; use trivial_augment_wide or rand_augment.')
  wide = policy == 'trivial_augment_wide'
  shear = _linspace(0.0, 0.99 if wide else 0.3, num_bins)
  if wide:
    translate_x = translate_y = _linspace(0.0, 32.0, num_bins)
  else:
    translate_x = _linspace(0.0, 150 / 331 * tf.cast(width, tf.float64), num_bins)
    translate_y = _linspace(0.0, 150 / 331 * tf.cast(height, tf.float64), num_bins)
  enhance = _linspace(0.0, 0.99 if wide else 0.9, num_bins)
  # 8 - round(bin / ((num_bins - 1) / 6)) bits kept (/ 4 for RandAugment), half to even.
  bins = tf.range(num_bins, dtype=tf.float32)
  posterize = 8 - tf.round(bins / ((num_bins - 1) / (6 if wide else 4)))
  rows = {'ShearX': shear, 'ShearY': shear, 'TranslateX': translate_x,
          'TranslateY': translate_y, 'Rotate': _linspace(0.0, 135.0 if wide else 30.0, num_bins),
          'Brightness': enhance, 'Color': enhance, 'Contrast': enhance, 'Sharpness': enhance,
          'Posterize': posterize, 'Solarize': _linspace(255.0, 0.0, num_bins)}
  zeros = tf.zeros([num_bins], tf.float32)
  return tf.stack([rows.get(name, zeros) for name in OP_NAMES])


def sample_trivial_augment_wide(seed: tf.Tensor, num_magnitude_bins: int = 31):
  """(op index, signed magnitude) that `trivial_augment_wide` applies: an op uniformly from
  OP_NAMES, one of its bins uniformly, a sign with p=1/2 for the signed ops."""
  u = tf.random.stateless_uniform([3], _fold(seed, _TRIVIAL_SEED_TAG))
  op = _uniform_index(u[0], len(OP_NAMES))
  bin_ = _uniform_index(u[1], num_magnitude_bins)
  table = magnitude_table('trivial_augment_wide', num_magnitude_bins)
  return op, _signed(table[op, bin_], op, u[2] < 0.5)


def trivial_augment_wide(image: tf.Tensor, seed: tf.Tensor,
                         num_magnitude_bins: int = 31) -> tf.Tensor:
  """torchvision's TrivialAugmentWide (one random op at a random strength) of a uint8
  [h, w, 3] image; `seed` is the example's [2] seed, the one its crop used."""
  op, magnitude = sample_trivial_augment_wide(seed, num_magnitude_bins)
  return apply_op_index(image, op, magnitude)


def sample_rand_augment(seed: tf.Tensor, height, width, num_ops: int = 2, magnitude: int = 9,
                        num_magnitude_bins: int = 31):
  """([num_ops] op indices, [num_ops] signed magnitudes) that `rand_augment` applies to an
  image of that size: ops uniformly from OP_NAMES (repeats allowed), all at bin `magnitude`,
  a sign with p=1/2 for the signed ops."""
  u = tf.random.stateless_uniform([num_ops, 2], _fold(seed, _RAND_SEED_TAG))
  ops = _uniform_index(u[:, 0], len(OP_NAMES))
  table = magnitude_table('rand_augment', num_magnitude_bins, height, width)[:, magnitude]
  return ops, _signed(tf.gather(table, ops), ops, u[:, 1] < 0.5)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2, magnitude: int = 9,
                 num_magnitude_bins: int = 31) -> tf.Tensor:
  """torchvision's RandAugment (`num_ops` random ops in a row, all at one strength) of a
  uint8 [h, w, 3] image; `seed` is the example's [2] seed, the one its crop used."""
  shape = tf.shape(image)
  ops, magnitudes = sample_rand_augment(seed, shape[0], shape[1], num_ops, magnitude,
                                        num_magnitude_bins)
  for k in range(num_ops):
    image = apply_op_index(image, ops[k], magnitudes[k])
  return image


def random_erasing(image: tf.Tensor, seed: tf.Tensor, probability: float,
                   scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0) -> tf.Tensor:
  """torchvision's RandomErasing of a uint8 [h, w, 3] image, before normalisation.

  With `probability`, up to ten tries of an area fraction uniform in `scale` and a
  log-uniform height / width ratio in `ratio`; the first rectangle strictly smaller than
  the image is placed uniformly and erased; none fitting leaves the image as it is.
  torchvision erases the normalised tensor, so `value` is in normalised units (a number or
  one per channel) and becomes the uint8 colour nearest to mean + value * stddev: the
  default 0, torchvision's, is the ImageNet mean colour (124, 116, 104).
  """
  u = tf.random.stateless_uniform([2 * ERASE_ATTEMPTS + 3], _fold(seed, _ERASE_SEED_TAG))
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)
  areas = h * w * (scale[0] + (scale[1] - scale[0]) * u[:ERASE_ATTEMPTS])
  log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
  ratios = tf.exp(log_lo + (log_hi - log_lo) * u[ERASE_ATTEMPTS:2 * ERASE_ATTEMPTS])
  erase_h = tf.round(tf.sqrt(areas * ratios))  # Half to even, as Python's round().
  erase_w = tf.round(tf.sqrt(areas / ratios))
  fits = (erase_h < h) & (erase_w < w)
  first = tf.argmax(tf.cast(fits, tf.int32))
  erase = tf.reduce_any(fits) & (u[-1] < probability)
  erase_h, erase_w = erase_h[first], erase_w[first]
  top = tf.floor(u[-3] * (h - erase_h + 1))
  left = tf.floor(u[-2] * (w - erase_w + 1))
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
  fill = np.round(np.asarray(MEAN_RGB) + np.asarray(value) * np.asarray(STDDEV_RGB))
  fill = tf.constant(np.clip(fill, 0, 255).astype(np.uint8))
  return tf.where((inside & erase)[..., None], fill, image)


def build_augment(name: str, **kwargs) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
  """The (image, seed) -> image function of a config's augmentation name: '' for none,
  'trivial_augment_wide' or 'rand_augment'; `kwargs` go to that function."""
  if name == '':
    return lambda image, seed: image
  functions = {'trivial_augment_wide': trivial_augment_wide, 'rand_augment': rand_augment}
  if name not in functions:
    raise ValueError(f'Unknown augmentation {name!r}; valid: '
                     f'{", ".join(repr(n) for n in AUGMENT_NAMES)}.')
  return functools.partial(functions[name], **kwargs)


def _float64(x) -> tf.Tensor:
  """A Python float kept whole (tf.cast would round it to float32 first), or a tensor cast."""
  return tf.cast(x, tf.float64) if tf.is_tensor(x) else tf.constant(x, tf.float64)


def _fold(seed: tf.Tensor, tag: int) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), tag)


def _uniform_index(u: tf.Tensor, n: int) -> tf.Tensor:
  """A uniform [0, 1) draw -> a uniform int32 in [0, n)."""
  return tf.minimum(tf.cast(u * n, tf.int32), n - 1)


def _signed(magnitude: tf.Tensor, op: tf.Tensor, negate: tf.Tensor) -> tf.Tensor:
  signed_op = tf.gather(tf.constant([name in SIGNED_OPS for name in OP_NAMES]), op)
  return tf.where(signed_op & negate, -magnitude, magnitude)


def _linspace(start, end, num: int) -> tf.Tensor:
  """The exact linspace rounded once to float32 (see the module docstring)."""
  start = _float64(start)
  end = _float64(end)
  steps = tf.range(num, dtype=tf.float64)
  return tf.cast(start + (end - start) * steps / (num - 1), tf.float32)


# Geometric ops. torchvision's tensor affine maps each output pixel centre, in coordinates
# centred on the image, through an inverse matrix `m` (output -> input) and reads the
# nearest input pixel, zero outside.

def _warp(image: tf.Tensor, m) -> tf.Tensor:
  """Nearest-neighbour warp by torchvision's centred inverse affine matrix `m` (six float64
  scalars), black outside.

  The source coordinates follow torch's float32 steps so that ties (a 90 degree turn of an
  odd-sized side, a shear landing on half pixels) fall the same way: the matrix scaled to
  [-1, 1] units, the grid as its CPU matmul sums it (x a0, then y a1 fused in, then a2),
  grid_sample's unnormalisation, and rounding half to even.
  """
  h, w = _size(image)
  a0, a1, a2, b0, b1, b2 = tf.unstack(tf.cast(tf.stack(m), tf.float32))
  x = tf.range(tf.cast(w, tf.float32))[None, :] - tf.cast(w / 2 - 0.5, tf.float32)
  y = tf.range(tf.cast(h, tf.float32))[:, None] - tf.cast(h / 2 - 0.5, tf.float32)

  def grid(c0, c1, c2, half_size):  # One coordinate in [-1, 1] units.
    c0, c1, c2 = (_divide(c, half_size) for c in (c0, c1, c2))
    return _opaque(_fused_multiply_add(y, c1, x * c0) + c2)  # Summed before the + 1 below.

  half_w = tf.cast(w / 2, tf.float32)
  half_h = tf.cast(h / 2, tf.float32)
  src_x = tf.round((grid(a0, a1, a2, half_w) + 1) * half_w - 0.5)  # Half to even.
  src_y = tf.round((grid(b0, b1, b2, half_h) + 1) * half_h - 0.5)
  w = tf.cast(w, tf.float32)
  h = tf.cast(h, tf.float32)
  inside = (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
  index = tf.clip_by_value(src_y, 0, h - 1) * w + tf.clip_by_value(src_x, 0, w - 1)
  warped = tf.gather(tf.reshape(image, [-1, 3]), tf.cast(index, tf.int32))
  return tf.where(inside[..., None], warped, tf.constant(0, image.dtype))


def _fused_multiply_add(a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
  """float32 a * b + c rounded once, as an FMA instruction does. The float32 product is exact
  in float64; the float64 sum is rounded to odd (its exact error, from TwoSum, nudges an even
  result one step), which makes the final rounding to float32 correct."""
  product = tf.cast(a, tf.float64) * tf.cast(b, tf.float64)
  c = tf.cast(c, tf.float64)
  total = product + c
  part = total - product
  error = (product - (total - part)) + (c - part)
  even = tf.bitwise.bitwise_and(tf.bitcast(total, tf.int64), 1) == 0
  toward = tf.where(error > 0, tf.constant(np.inf, tf.float64), -np.inf)
  total = tf.where((error != 0) & even, tf.math.nextafter(total, toward), total)
  return tf.cast(total, tf.float32)


def _shear_x(image, tangent):
  # Sheared about the top-left corner (torchvision passes center=[0, 0]); the offset is
  # summed in torchvision's order so that it rounds the same way.
  h, w = _size(image)
  t = tf.tan(_shear_angle(tangent))
  return _warp(image, (1.0, t, (w / 2 + t * (h / 2)) - w / 2, 0.0, 1.0, 0.0))


def _shear_y(image, tangent):
  h, w = _size(image)
  angle = _shear_angle(tangent)
  t = tf.sin(angle) / tf.cos(angle)  # torchvision's matrix holds sin / cos here, not tan.
  return _warp(image, (1.0, 0.0, 0.0, t, 1.0, (t * (w / 2) + h / 2) - h / 2))


def _shear_angle(tangent):
  """The shear angle in radians as torchvision gets it: radians(degrees(atan(tangent)))."""
  return _opaque(tf.atan(tangent) * (180 / np.pi)) * (np.pi / 180)


def _size(image):
  """(height, width) as float64 tensors that Grappler cannot see as constants."""
  shape = _opaque(tf.cast(tf.shape(image)[:2], tf.float64))
  return shape[0], shape[1]


def _opaque(x: tf.Tensor) -> tf.Tensor:
  """`x`, hidden from Grappler's rewrites in graphs (tf.function, tf.data).

  Its constant folding and arithmetic optimiser reassociate float arithmetic: around
  constants (such as a static image size: (c + x) - c -> x, c - (x - y) -> (c + y) - x,
  (x * c1) * c2 -> x * (c1 c2)) and along chains of adds ((x + a) + b -> x + (a + b) when a
  and b are scalars), which changes the roundings that must follow torch's. A
  PlaceholderWithDefault is neither folded nor merged into a chain.
  """
  return tf.raw_ops.PlaceholderWithDefault(input=x, shape=x.shape)


def _divide(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
  """float32 a / b, rounded as float32 division rounds, whatever Grappler does: it turns a
  division by a constant into a multiplication by its reciprocal, which would round
  differently in float32; in float64 the result still rounds to the same float32 (a float32
  quotient is never within float64's error of a float32 rounding boundary)."""
  return tf.cast(tf.cast(a, tf.float64) / tf.cast(b, tf.float64), tf.float32)


def _translate_x(image, pixels):
  return _warp(image, (1.0, 0.0, -tf.cast(tf.cast(pixels, tf.int32), tf.float64), 0.0, 1.0, 0.0))


def _translate_y(image, pixels):
  return _warp(image, (1.0, 0.0, 0.0, 0.0, 1.0, -tf.cast(tf.cast(pixels, tf.int32), tf.float64)))


def _rotate(image, degrees):
  angle = degrees * (np.pi / 180)
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _warp(image, (cos, -sin, 0.0, sin, cos, 0.0))


# Colour ops, in torchvision's arithmetic: float32 blends truncated to uint8.

def _blend(image: tf.Tensor, degenerate, factor: tf.Tensor) -> tf.Tensor:
  """factor * image + (1 - factor) * degenerate, clamped and truncated to uint8; both weights
  are worked out in float64 and rounded to float32, as torch does with Python floats."""
  blended = (tf.cast(factor, tf.float32) * tf.cast(image, tf.float32) +
             tf.cast(1.0 - factor, tf.float32) * tf.cast(degenerate, tf.float32))
  return tf.cast(tf.clip_by_value(blended, 0.0, 255.0), tf.uint8)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """[h, w, 1] uint8 luma, truncated, with torchvision's weights and order of sums."""
  r, g, b = tf.unstack(tf.cast(image, tf.float32), axis=-1)
  return tf.cast(0.2989 * r + 0.587 * g + 0.114 * b, tf.uint8)[..., None]


def _brightness(image, magnitude):
  return _blend(image, 0.0, 1.0 + magnitude)


def _color(image, magnitude):
  return _blend(image, _grayscale(image), 1.0 + magnitude)


def _contrast(image, magnitude):
  # The mean luma as torch computes it: an exact integer sum (below 2^24 up to 256x256
  # images) divided once in float32.
  gray = tf.cast(_grayscale(image), tf.int32)
  mean = _divide(tf.reduce_sum(gray), tf.size(gray))
  return _blend(image, mean, 1.0 + magnitude)


def _sharpness(image, magnitude):
  # Blurred by [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 inside a one-pixel border that keeps the
  # original, in integers: a sum over 13 is never a tie, so (2 sum + 13) // 26 rounds it as
  # torch rounds its float32 convolution, whatever order that sums in.
  pixels = tf.cast(image, tf.int32)
  columns = pixels[:-2] + pixels[1:-1] + pixels[2:]
  sums = columns[:, :-2] + columns[:, 1:-1] + columns[:, 2:] + 4 * pixels[1:-1, 1:-1]
  change = (2 * sums + 13) // 26 - pixels[1:-1, 1:-1]
  blurred = pixels + tf.pad(change, [[1, 1], [1, 1], [0, 0]])  # Zero change on the border.
  return _blend(image, blurred, 1.0 + magnitude)


def _posterize(image, bits):
  shift = tf.cast(8 - tf.cast(bits, tf.int32), tf.uint8)  # Keeps the top `bits` bits.
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _solarize(image, threshold):
  # torch compares the uint8 image with the threshold in float32.
  invert = tf.cast(image, tf.float32) >= tf.cast(threshold, tf.float32)
  return tf.where(invert, 255 - image, image)


def _autocontrast(image, _):
  """Stretches each channel's [min, max] to [0, 255]; a constant channel stays."""
  pixels = tf.cast(image, tf.float32)
  low = tf.reduce_min(pixels, axis=[0, 1])
  high = tf.reduce_max(pixels, axis=[0, 1])
  flat = tf.equal(high, low)
  low = tf.where(flat, 0.0, low)
  # torch's 255 / t is 1 / t * 255, rounded twice; written so that Grappler cannot fold the
  # two into one division.
  reciprocal = _divide(1.0, high - low)
  scale = tf.where(flat, 1.0, tf.cast(tf.cast(reciprocal, tf.float64) * 255.0, tf.float32))
  return tf.cast(tf.clip_by_value((pixels - low) * scale, 0.0, 255.0), tf.uint8)


def _equalize(image, _):
  """PIL's histogram equalisation per channel, in torchvision's integer form: the step is the
  pixel count outside the brightest level present, over 255; level v maps to
  (pixels below v + step // 2) // step; a step of 0 leaves the channel."""
  pixels = tf.cast(image, tf.int32)
  bins = pixels + tf.constant([0, 256, 512])  # One histogram per channel, side by side.
  hist = tf.reshape(tf.math.bincount(bins, minlength=768, maxlength=768), [3, 256])
  brightest = tf.gather(hist, tf.reduce_max(pixels, axis=[0, 1]), batch_dims=1)
  step = (tf.size(pixels) // 3 - brightest) // 255
  safe_step = tf.maximum(step, 1)[:, None]
  below = tf.cumsum(hist, axis=1, exclusive=True)
  lut = tf.where(step[:, None] == 0, tf.range(256)[None, :],
                 tf.minimum((below + safe_step // 2) // safe_step, 255))
  return tf.cast(tf.gather(tf.reshape(lut, [768]), bins), tf.uint8)


_OPS = {
    'Identity': lambda image, _: image,
    'ShearX': _shear_x,
    'ShearY': _shear_y,
    'TranslateX': _translate_x,
    'TranslateY': _translate_y,
    'Rotate': _rotate,
    'Brightness': _brightness,
    'Color': _color,
    'Contrast': _contrast,
    'Sharpness': _sharpness,
    'Posterize': _posterize,
    'Solarize': _solarize,
    'AutoContrast': _autocontrast,
    'Equalize': _equalize,
}
