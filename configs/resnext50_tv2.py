"""ResNeXt-50 32x4d on ImageNet-1k with torchvision's V2 recipe (its IMAGENET1K_V2 weights).

Command:
  python train.py --config=configs/resnext50_tv2.py --workdir=runs/resnext50_tv2 \
      --config.data_dir=~/tensorflow_datasets --config.manual_dir=~/imagenet

torchvision's references/classification recipe for these weights: SGD momentum 0.9, lr
0.5 at batch 1024 (0.125 per 256 images here, scaled with batch_size), cosine decay after
5 linear warmup epochs, 600 epochs, weight decay 2e-5 and none on norms, label smoothing
0.1, Mixup 0.2 / CutMix 1.0 (one of the two per batch), TrivialAugmentWide, random
erasing 0.1, an EMA of the weights (decay 0.99998 adjusted for batch and run length,
updated every 32 steps), train crops of 176 px, eval resize 232 and crop 224.
Left out: torchvision's repeated-augmentation sampler (--ra-reps 4); its warmup starts at
1% of the lr where ours starts at 0; ours also exempts the classifier's bias from weight
decay (torchvision exempts only the norms).
Expected: 81.198 top-1 / 95.340 top-5 (torchvision's result for these weights; its
published checkpoint is the EMA, so compare eval_ema_top1).
Cost: 600 epochs x 1.28M images x 4.27 GMACs at 224 px, x0.62 at 176 px (about 1.2e19
FLOPs with the backward pass): six times the mmcls recipe's compute, so about a day on 8
GPUs at the ~1,000 img/s per GPU (bfloat16, 224 px) of resnext50.py. TrivialAugmentWide
and random erasing halve the images each host core prepares (about 395 per CPU-second at
176 px, docs/performance.md): give each accelerator about 4 host cores.
Data: ImageNet-1k through tfds' imagenet2012 builder, as configs/resnext50.py.
"""

from resnext_jax.training import default_config


def get_config():
  config = default_config.get_config()
  config.arch = 'resnext50_32x4d'
  config.batch_size = 1024
  config.learning_rate = 0.125  # per 256 images: 0.5 at batch 1024
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 5
  config.num_epochs = 600
  config.weight_decay = 2e-5
  config.weight_decay_on_bn_and_bias = False
  config.label_smoothing = 0.1
  config.mixup_alpha = 0.2
  config.cutmix_alpha = 1.0
  config.auto_augment = 'trivial_augment_wide'
  config.random_erasing = 0.1
  config.ema_decay = 0.99998
  config.ema_every_steps = 32
  config.train_image_size = 176
  config.image_size = 224
  config.eval_resize_size = 232
  config.checkpoint_every_steps = 2000
  return config
