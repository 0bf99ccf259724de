"""Mixup and CutMix on the global batch, inside the jitted train step, as torchvision's
classification recipe does them (`transforms.v2.MixUp` / `CutMix` under a `RandomChoice`).

Each example is paired with its neighbour in the batch rolled by one (example i with
i - 1), one lam ~ Beta(alpha, alpha) is drawn per batch, and the labels become soft
targets `lam * onehot(y) + (1 - lam) * onehot(roll(y))`, to be scored with
`soft_cross_entropy`. Everything is a pure function of a PRNG key with static shapes, so
it runs in the step on the sharded batch. The caller derives that key from the run's seed
and the step, `jax.random.fold_in(jax.random.PRNGKey(seed), state.step)`, so that the
mixing of step s is the same whether the run got there uninterrupted or resumed from a
checkpoint.
"""

import jax
import jax.numpy as jnp
import optax


def mix_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_classes: int,
              mixup_alpha: float, cutmix_alpha: float,
              switch_prob: float = 0.5) -> tuple[jax.Array, jax.Array]:
  """Mixup or CutMix of an NHWC batch; returns (images, float32 [N, num_classes] targets).

  With both alphas > 0 a batch gets CutMix with probability `switch_prob` and Mixup
  otherwise (0.5: torchvision's RandomChoice of the two); with one alpha 0, always the
  other. Both 0 is refused, as torchvision refuses alpha <= 0: a run without mixing keeps
  integer labels and `cross_entropy` rather than calling this. The alphas and
  `switch_prob` are static (config numbers).

  Integer (uint8) images come back float32 in the same 0-255 units, float images in their
  own dtype; CutMix returns the same dtype as Mixup so the two can be chosen at run time.
  Normalisation is affine per channel and both mixes are convex combinations, so
  `normalize_images` may run on the result exactly as on unmixed uint8 images: mixing
  before or after it gives the same input to the model.
  """
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f'mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} must '
                     'be >= 0.')
  if not mixup_alpha and not cutmix_alpha:
    raise ValueError('mix_batch needs mixup_alpha > 0 or cutmix_alpha > 0; without '
                     'mixing, train on the integer labels instead.')
  if not 0 <= switch_prob <= 1:
    raise ValueError(f'switch_prob={switch_prob} must be within [0, 1].')
  choice_key, lam_key, x_key, y_key = jax.random.split(key, 4)
  if mixup_alpha and cutmix_alpha:
    use_cutmix = jax.random.bernoulli(choice_key, switch_prob)
  else:
    use_cutmix = jnp.asarray(bool(cutmix_alpha))
  alpha = jnp.where(use_cutmix, jnp.float32(cutmix_alpha), jnp.float32(mixup_alpha))
  lam = jax.random.beta(lam_key, alpha, alpha)

  height, width = images.shape[1:3]
  box = _cutmix_box(x_key, y_key, lam, height, width)
  box_fraction = jnp.sum(box, dtype=jnp.int32) / jnp.float32(height * width)
  # Mixup weighs every pixel of the example by lam; CutMix takes the box from the partner
  # (weight 0) and keeps the rest (weight 1), and its label lam is the kept area.
  weight = jnp.where(use_cutmix, 1 - box[None, :, :, None].astype(jnp.float32), lam)
  lam = jnp.where(use_cutmix, 1 - box_fraction, lam)

  out_dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
  pixels = images.astype(jnp.float32)
  mixed = weight * pixels + (1 - weight) * jnp.roll(pixels, 1, axis=0)
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  targets = lam * onehot + (1 - lam) * jnp.roll(onehot, 1, axis=0)
  return mixed.astype(out_dtype), targets


def _cutmix_box(x_key: jax.Array, y_key: jax.Array, lam: jax.Array, height: int,
                width: int) -> jax.Array:
  """A bool [height, width] mask of torchvision's CutMix box: a uniform centre, half-sides
  int(0.5 * sqrt(1 - lam) * side), clipped to the image. Built from iota comparisons so
  its shape stays static whatever the box."""
  center_x = jax.random.randint(x_key, (), 0, width)
  center_y = jax.random.randint(y_key, (), 0, height)
  half = 0.5 * jnp.sqrt(1 - lam)
  half_w = jnp.floor(half * width).astype(jnp.int32)
  half_h = jnp.floor(half * height).astype(jnp.int32)
  x1, x2 = jnp.maximum(center_x - half_w, 0), jnp.minimum(center_x + half_w, width)
  y1, y2 = jnp.maximum(center_y - half_h, 0), jnp.minimum(center_y + half_h, height)
  rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
  return (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)


def soft_cross_entropy(logits: jax.Array, soft_targets: jax.Array,
                       label_smoothing: float = 0.0) -> jax.Array:
  """Per-example float32 cross-entropy against probability targets, smoothed as
  torch.nn.CrossEntropyLoss(label_smoothing=eps) smooths them: targets * (1 - eps) + eps / K.
  """
  targets = soft_targets.astype(jnp.float32)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
