"""Preprocessing, as TF graph functions run inside tf.data.

It follows mmcls' ImageNet recipe: train = RandomResizedCrop (area 0.08-1, aspect
3/4-4/3, ten tries then a centre crop, as torchvision and mmcls sample it) taken from the
compressed JPEG, bilinear resize, horizontal flip with p=0.5; eval = resize the shorter
side to image_size / 0.875, centre crop. Images leave the host as uint8; the train step
normalises them on the device (four times less host-to-device traffic than float32).
"""

import math

import tensorflow as tf

EVAL_CROP_FRACTION = 0.875  # Eval resizes the shorter side to image_size / this, then crops.
CROP_ASPECT_RATIOS = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Any supported encoded image -> uint8 RGB [h, w, 3] (grayscale and RGBA converted)."""
  return tf.cond(tf.io.is_jpeg(encoded),
                 lambda: tf.io.decode_jpeg(encoded, channels=3),
                 lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))


def preprocess_train(encoded: tf.Tensor, seed: tf.Tensor, *, image_size: int,
                     min_area: float = 0.08) -> tf.Tensor:
  """Random-resized crop (decoding only the crop of a JPEG), resize, random flip."""
  # All the randomness of one example in one draw: crop tries, crop place, flip.
  uniforms = tf.random.stateless_uniform([2 * CROP_ATTEMPTS + 3], seed)

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = _random_crop_window(shape[0], shape[1], uniforms[:-1], min_area)
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack(window), channels=3)

  def other():
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = _random_crop_window(shape[0], shape[1], uniforms[:-1], min_area)
    return image[y:y + h, x:x + w]

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image = _to_uint8(tf.image.resize(image, [image_size, image_size], method='bilinear'))
  return tf.cond(uniforms[-1] < 0.5, lambda: tf.reverse(image, [1]), lambda: image)


def preprocess_eval(encoded: tf.Tensor, *, image_size: int, resize_size: int | None = None,
                    interpolation: str = 'bilinear') -> tf.Tensor:
  """Resize the shorter side to `resize_size` (default image_size / 0.875), then take the
  central `image_size` square. `interpolation`: 'bilinear' or 'bicubic'."""
  return center_crop(decode_image(encoded), image_size=image_size, resize_size=resize_size,
                     interpolation=interpolation)


def default_resize_size(image_size: int) -> int:
  """The eval resize when none is given: image_size / 0.875 (256 for 224)."""
  return round(image_size / EVAL_CROP_FRACTION)


def check_eval_preprocessing(image_size: int, resize_size: int, interpolation: str) -> None:
  """Refuses settings that `preprocess_eval` cannot follow, naming the config field."""
  if interpolation not in ('bilinear', 'bicubic'):
    raise ValueError(f'config.eval_interpolation={interpolation!r}; use bilinear or bicubic.')
  if resize_size < image_size:
    raise ValueError(f'config.eval_resize_size={resize_size} is smaller than '
                     f'config.image_size={image_size}, the crop taken from the resized '
                     'image; use at least image_size (or -1 for image_size / 0.875).')


def center_crop(image: tf.Tensor, *, image_size: int, resize_size: int | None = None,
                interpolation: str = 'bilinear') -> tf.Tensor:
  """`preprocess_eval` of a decoded uint8 [h, w, 3] image."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  short_side = resize_size or default_resize_size(image_size)
  new_shape = tf.cast(tf.round(shape * (short_side / tf.reduce_min(shape))), tf.int32)
  new_shape = tf.maximum(new_shape, short_side)  # Guards the short side against rounding.
  image = tf.image.resize(image, new_shape, method=interpolation)
  top = (new_shape[0] - image_size) // 2
  left = (new_shape[1] - image_size) // 2
  return _to_uint8(image[top:top + image_size, left:left + image_size])


def _random_crop_window(height: tf.Tensor, width: tf.Tensor, uniforms: tf.Tensor,
                        min_area: float) -> tuple[tf.Tensor, ...]:
  """(top, left, crop height, crop width) sampled as torchvision's RandomResizedCrop does.

  Up to ten tries of a random area fraction in [min_area, 1] and a log-uniform aspect ratio in
  [3/4, 4/3]; the first that fits is placed uniformly at random. If none fits, the centred
  crop of the whole image with its aspect ratio clamped to that range. `uniforms` holds
  2 * CROP_ATTEMPTS + 2 draws from [0, 1).
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  lo, hi = CROP_ASPECT_RATIOS
  areas = h * w * (min_area + (1 - min_area) * uniforms[:CROP_ATTEMPTS])
  ratios = tf.exp(math.log(lo) + math.log(hi / lo) * uniforms[CROP_ATTEMPTS:2 * CROP_ATTEMPTS])
  crop_w = tf.round(tf.sqrt(areas * ratios))
  crop_h = tf.round(tf.sqrt(areas / ratios))
  fits = (crop_w >= 1) & (crop_w <= w) & (crop_h >= 1) & (crop_h <= h)
  first = tf.argmax(tf.cast(fits, tf.int32))  # The first try that fits.
  found = tf.reduce_any(fits)

  aspect = w / h
  fallback_w = tf.where(aspect > hi, tf.round(h * hi), w)
  fallback_h = tf.where(aspect < lo, tf.round(w / lo), h)
  crop_h = tf.where(found, crop_h[first], fallback_h)
  crop_w = tf.where(found, crop_w[first], fallback_w)

  def offset(u, free):  # Uniform over the 0 .. free offsets; centred for the fallback.
    return tf.cast(tf.where(found, tf.minimum(tf.floor(u * (free + 1)), free),
                            tf.floor(free / 2)), tf.int32)

  top = offset(uniforms[2 * CROP_ATTEMPTS], h - crop_h)
  left = offset(uniforms[2 * CROP_ATTEMPTS + 1], w - crop_w)
  return top, left, tf.cast(crop_h, tf.int32), tf.cast(crop_w, tf.int32)


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds resized pixels to the nearest uint8 (bicubic ones may overshoot [0, 255])."""
  return tf.cast(tf.clip_by_value(image, 0.0, 255.0) + 0.5, tf.uint8)

