"""ResNeXt-101 32x4d on ImageNet-1k with MMClassification's recipe.

Command:
  python train.py --config=configs/resnext101_32x4d.py --workdir=runs/resnext101_32x4d \
      --config.data_dir=~/tensorflow_datasets --config.manual_dir=~/imagenet

The recipe of configs/resnext50.py (mmcls: SGD 0.9, lr 0.1 per 256, wd 1e-4, 100 epochs,
x0.1 at 30/60/90, batch 256, 224 crops) with the resnext101_32x4d architecture.
Expected: 78.61 top-1 / 94.17 top-5 (mmcls' result).
Cost: 8.03 GMACs per 224 image forward, 100 epochs of ImageNet-1k.
Compute: dtype 'auto' (the default), bfloat16 on GPU and TPU, whose matrix units run it
several times faster than float32, with parameters, BN statistics and the loss in
float32; float32 on CPU. mmcls trained in float32: --config.dtype=float32 matches it.
"""

from resnext_jax.training import default_config


def get_config():
  config = default_config.get_config()
  config.arch = 'resnext101_32x4d'
  return config
