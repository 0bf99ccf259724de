"""ResNeXt-50 32x4d on ImageNet-1k with MMClassification's recipe.

Command:
  python train.py --config=configs/resnext50.py --workdir=runs/resnext50 \
      --config.data_dir=~/tensorflow_datasets --config.manual_dir=~/imagenet

Reproduces mmcls `resnext50-32x4d_8xb32_in1k`: SGD momentum 0.9, lr 0.1 per 256 images
(scaled linearly with batch_size), weight decay 1e-4 on every parameter, 100 epochs,
lr x0.1 at epochs 30/60/90, batch 256, 224 crops.
Expected: 77.90 top-1 / 93.66 top-5 (mmcls' result).
Cost: 100 epochs x 1.28M images x 4.27 GMACs forward (about 3.3e18 FLOPs with the
backward pass); at ~1,000 img/s per GPU (bfloat16), about 4.5 hours on 8 GPUs.
Data: ImageNet-1k through tfds' imagenet2012 builder; put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in manual_dir and the first run prepares it (see README).
Compute: dtype 'auto' (the default), bfloat16 on GPU and TPU, whose matrix units run it
several times faster than float32, with parameters, BN statistics and the loss in
float32; float32 on CPU. mmcls trained in float32: --config.dtype=float32 matches it.
"""

from resnext_jax.training import default_config


def get_config():
  config = default_config.get_config()
  config.arch = 'resnext50_32x4d'
  return config
