"""Every config field with its default: the seed's recipe (mmcls
resnext50-32x4d_8xb32_in1k).

Config files in configs/ start from `get_config()` here and change what differs, so a
field has one default in one place. Derived numbers (steps per epoch, scaled learning
rate, schedule boundaries) are computed in `optim.derive_schedule` and logged.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model.
  config.arch = 'resnext50_32x4d'  # a name from resnext_jax.model.resnext.ARCHS
  config.model = ml_collections.ConfigDict()  # overrides of ResNeXt fields (tiny models)
  config.num_classes = -1  # -1: the dataset's number of classes
  # Compute dtype: 'auto' (bfloat16 on GPU and TPU, whose matrix units run it several
  # times faster; float32 on CPU, which has no such speed-up), 'float32' or 'bfloat16'.
  config.dtype = 'auto'
  config.conv_impl = 'auto'  # 'auto', 'xla', 'taps' or 'native': resnext_jax/ops/impl.py
  config.zero_init_residual = True

  # Data (resnext_jax/data/).
  config.dataset = 'imagenet2012'
  config.data_dir = ''  # tfds data dir ('' = tfds default), or an image-folder root
  config.manual_dir = ''  # where ILSVRC2012_img_{train,val}.tar are, for preparation
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.image_size = 224
  config.batch_size = 256  # global, over all devices and hosts
  config.eval_batch_size = 256
  config.train_crop_min_area = 0.08  # RandomResizedCrop's lower area bound
  config.train_image_size = -1  # the train crop's size; -1: image_size (the eval crop)
  # After the crop and flip, on the host: '' (none), 'trivial_augment_wide' or
  # 'rand_augment' (torchvision's op sets and magnitudes; resnext_jax/data/augment.py).
  config.auto_augment = ''
  config.rand_augment_num_ops = 2
  config.rand_augment_magnitude = 9  # of 31 bins
  config.random_erasing = 0.0  # the chance that an example gets a box erased
  # Eval: shorter side resized to this, then the central image_size crop. -1: image_size /
  # 0.875, or with eval_only the registered init_from weights' own size.
  config.eval_resize_size = -1
  config.eval_interpolation = ''  # 'bilinear' or 'bicubic'; '': bilinear, or the weights'
  config.cache_dir = ''  # where image-folder scans are cached ('' = ~/.cache/resnext_jax)

  # Optimisation: SGD with momentum, lr scaled linearly with batch_size / 256.
  config.learning_rate = 0.1  # per 256 images
  config.lr_schedule = 'step'  # 'step' (x lr_decay_factor at lr_boundaries) or 'cosine'
  config.lr_boundaries = (30, 60, 90)  # epochs
  config.lr_decay_factor = 0.1
  config.warmup_epochs = 0.0
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.weight_decay_on_bn_and_bias = True  # mmcls decays every parameter
  config.label_smoothing = 0.0
  # Mixup and CutMix on the device, on the global batch (training/mixing.py): each on when
  # its alpha > 0; with both on, a batch gets CutMix with probability cutmix_prob.
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  config.cutmix_prob = 0.5
  # A moving average of params and BN statistics (training/ema.py), evaluated beside the
  # weights and saved in checkpoints; 0 = off. The decay is torchvision's nominal one,
  # adjusted for batch size, ema_every_steps and num_epochs as its train.py does; the
  # average copies the weights during warmup_epochs.
  config.ema_decay = 0.0
  config.ema_every_steps = 32
  config.num_epochs = 100
  config.num_train_steps = -1  # > 0 overrides num_epochs

  # Bookkeeping.
  config.seed = 0
  config.mesh_shape = (-1,)  # data-parallel over all devices
  config.log_every_steps = 100
  config.eval_every_steps = -1  # -1: once per epoch (and always at the end)
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  # Seconds every process may take to finish a checkpoint save (Orbax's commit barrier).
  config.checkpoint_timeout_secs = 1200
  # The step watchdog (training/watchdog.py): a process whose steps stop for
  # watchdog_step_factor x the median step time (at least watchdog_min_secs), or for
  # watchdog_secs when > 0, logs every thread's stack and exits 75. 0 and 0: off.
  config.watchdog_step_factor = 20.0
  config.watchdog_min_secs = 300.0
  config.watchdog_secs = 0.0
  config.init_from = ''  # weights to start from: a registered name, URL, file or directory
  config.init_from_ema = False  # take init_from's moving average (a workdir of an EMA run)
  config.eval_only = False  # evaluate init_from (or the workdir's checkpoint) and stop
  return config
