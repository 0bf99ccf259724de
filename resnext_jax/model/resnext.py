"""ResNeXt (Xie et al. 2017) in Flax Linen, layer for layer as torchvision and mmcls build it.

The parameter tree mirrors torchvision's state dict (`conv1`, `bn1`, `layer1_0/conv2`,
`layer1_0/downsample_conv`, `fc`, ...) so that weight conversion is a rename plus a
transpose. Images are NHWC. Parameters and batch statistics are float32 whatever the
compute `dtype`; logits are float32.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax.model.layers import BatchNorm, Conv2D
from resnext_jax.ops import pooling
from resnext_jax.ops.impl import resolve_impl

# ImageNet RGB statistics on the 0-255 scale, as mmcls and torchvision weights expect.
MEAN_RGB = (123.675, 116.28, 103.53)
STDDEV_RGB = (58.395, 57.12, 57.375)


def normalize_images(images: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """Turns uint8 (or 0-255 float) RGB images into the normalised input the model expects."""
  mean = jnp.asarray(MEAN_RGB, jnp.float32)
  std = jnp.asarray(STDDEV_RGB, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


class Bottleneck(nn.Module):
  """1x1 reduce -> 3x3 grouped conv (the aggregated transformation, strided) -> 1x1 expand."""
  features: int
  mid_features: int
  groups: int
  strides: int
  downsample: bool
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  zero_init_residual: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(self.mid_features, 1, name='conv1')(
        x, norm=self.norm(name='bn1'), relu=True)
    y = self.conv(self.mid_features, 3, strides=self.strides, groups=self.groups,
                  name='conv2')(y, norm=self.norm(name='bn2'), relu=True)
    shortcut = x
    if self.downsample:
      shortcut = self.conv(self.features, 1, strides=self.strides, name='downsample_conv')(
          x, norm=self.norm(name='downsample_bn'))
    last_scale_init = (nn.initializers.zeros if self.zero_init_residual
                       else nn.initializers.ones)
    return self.conv(self.features, 1, name='conv3')(
        y, norm=self.norm(name='bn3', scale_init=last_scale_init), residual=shortcut,
        relu=True)


class ResNeXt(nn.Module):
  """ResNeXt with `stage_sizes` bottleneck blocks per stage.

  Stage i has `cardinality * width_per_group * 2**i` channels in its grouped conv and
  outputs `4 * base_planes * 2**i` channels (base_planes=64 for every published arch;
  tests shrink it). `conv_impl` picks the implementation of the convolutions, the
  stem's max pool and the batch norms' statistics (`ops/impl.py`); it is resolved once
  per call ('auto' -> a concrete name for this backend) and never changes the parameter
  tree.
  """
  stage_sizes: Sequence[int]
  cardinality: int = 32
  width_per_group: int = 4
  num_classes: int = 1000
  base_planes: int = 64
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  zero_init_residual: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    impl = resolve_impl(self.conv_impl)
    conv = functools.partial(Conv2D, impl=impl, dtype=self.dtype)
    norm = functools.partial(BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, impl=impl)
    x = conv(self.base_planes, 7, strides=2, name='conv1')(x, norm=norm(name='bn1'), relu=True)
    x = pooling.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                         impl=impl)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = Bottleneck(
            features=4 * self.base_planes * 2**i,
            mid_features=self.cardinality * self.width_per_group * 2**i,
            groups=self.cardinality,
            strides=2 if (i > 0 and j == 0) else 1,
            downsample=(j == 0),
            conv=conv, norm=norm, zero_init_residual=self.zero_init_residual,
            name=f'layer{i + 1}_{j}')(x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(0.01), name='fc')(x)


# Published architectures, by torchvision's names: (stage sizes, cardinality, width).
ARCHS: dict[str, tuple[tuple[int, ...], int, int]] = {
    'resnext50_32x4d': ((3, 4, 6, 3), 32, 4),
    'resnext101_32x4d': ((3, 4, 23, 3), 32, 4),
    'resnext101_32x8d': ((3, 4, 23, 3), 32, 8),
    'resnext152_32x4d': ((3, 8, 36, 3), 32, 4),
    'resnext101_64x4d': ((3, 4, 23, 3), 64, 4),
    # The paper's baseline, the same network at cardinality 1 (torchvision's resnet50):
    # a yardstick for the grouped convolutions' cost.
    'resnet50': ((3, 4, 6, 3), 1, 64),
}


def create_model(arch: str, *, num_classes: int = 1000, dtype: Any = jnp.float32,
                 **overrides) -> ResNeXt:
  """Builds a published ResNeXt by name; `overrides` set any other `ResNeXt` field."""
  if arch not in ARCHS:
    raise ValueError(f'Unknown arch {arch!r}; known archs: {", ".join(ARCHS)}.')
  stage_sizes, cardinality, width = ARCHS[arch]
  fields = dict(stage_sizes=stage_sizes, cardinality=cardinality, width_per_group=width)
  fields.update(overrides)
  return ResNeXt(num_classes=num_classes, dtype=dtype, **fields)


def init_variables(model: ResNeXt, rng: jax.Array, image_size: int = 224) -> dict:
  """Initial `{'params', 'batch_stats'}` for `model` (jitted, so large archs init fast)."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return jax.jit(functools.partial(model.init, train=False))(rng, dummy)
