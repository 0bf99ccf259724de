"""Finetune pretrained ResNeXt-50 weights on your own image folder.

Command:
  python -m resnext_jax.convert --arch=resnext50_32x4d \
      --input=resnext50_32x4d-1a0047aa.pth --output=weights/rx50
  python train.py --config=configs/finetune.py --workdir=runs/finetune \
      --config.data_dir=/path/to/images --config.init_from=weights/rx50

Images go in DATA_DIR/train/<class>/* and DATA_DIR/validation/<class>/*; the class count
comes from the folders, and the 1000-class head is replaced (the log lists what was not
loaded). Recipe: SGD momentum 0.9, cosine decay from lr 0.01 at batch 64 with one warmup
epoch, weight decay 1e-4 except on BN and biases, 10 epochs at 224.
Expected: depends on your data. Cost: 10 epochs of 4.27 GMACs per image forward; on
one modern GPU about 1,000 images/s; dtype 'auto' computes in bfloat16 on GPU and TPU,
float32 on CPU.
"""

from resnext_jax.training import default_config


def get_config():
  config = default_config.get_config()
  config.arch = 'resnext50_32x4d'
  config.dataset = 'image_folder'
  config.init_from = ''  # set on the command line: converted or trained weights
  config.batch_size = 64
  config.eval_batch_size = 64
  config.num_epochs = 10
  config.learning_rate = 0.04  # per 256 images: 0.01 at batch 64
  config.lr_schedule = 'cosine'
  config.warmup_epochs = 1
  config.weight_decay_on_bn_and_bias = False
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  return config
