"""torchvision's ResNeXt through the same kind of step as `python -m resnext_jax.benchmark`.

    python benchmarks/torch_reference.py --arch=resnext50_32x4d --batch_size=16 --mode=train

The step mirrors `resnext_jax.steps`: uint8 images already on the device, normalised in
the step, cross-entropy, SGD with momentum 0.9 and weight decay 1e-4, BatchNorm in train
mode (eval: logits, loss and top-5 without autograd). channels_last memory format by
default; `--dtype=bfloat16` runs the model under autocast (on GPUs, as usual for AMP).
On CPU it uses as many threads as the process may run on (what XLA uses too) unless
`--threads` says otherwise. The last line is `images_per_sec=<float>`, as ours.
Needs only torch and torchvision.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

# Stage sizes, cardinality and width per group, as in resnext_jax.models.ARCHS.
ARCHS = {
    'resnext50_32x4d': ((3, 4, 6, 3), 32, 4),
    'resnext101_32x4d': ((3, 4, 23, 3), 32, 4),
    'resnext101_32x8d': ((3, 4, 23, 3), 32, 8),
    'resnext152_32x4d': ((3, 8, 36, 3), 32, 4),
    'resnext101_64x4d': ((3, 4, 23, 3), 64, 4),
    'resnet50': ((3, 4, 6, 3), 1, 64),
}
MEAN_RGB = (123.675, 116.28, 103.53)
STDDEV_RGB = (58.395, 57.12, 57.375)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='resnext50_32x4d', choices=sorted(ARCHS))
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--mode', default='train', choices=('train', 'eval'))
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--memory_format', default='channels_last',
                      choices=('channels_last', 'contiguous'))
  parser.add_argument('--threads', type=int, default=0,
                      help='CPU threads (0: as many as this process may use)')
  parser.add_argument('--compile', action='store_true', help='wrap the model in torch.compile')
  return parser.parse_args(argv)


def build_model(arch: str, num_classes: int) -> torch.nn.Module:
  stage_sizes, groups, width = ARCHS[arch]
  return torchvision.models.resnet.ResNet(
      torchvision.models.resnet.Bottleneck, list(stage_sizes), num_classes=num_classes,
      groups=groups, width_per_group=width)


def build_step(args):
  """Builds the model, optimizer and batch; returns `run_step()`, one step to completion."""
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  if device.type == 'cpu':
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  torch.backends.cudnn.benchmark = True
  memory_format = (torch.channels_last if args.memory_format == 'channels_last'
                   else torch.contiguous_format)
  name = torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'
  print(f'device: {name}, torch {torch.__version__}, torchvision '
        f'{torchvision.__version__}, threads {torch.get_num_threads()}')
  print(f'arch={args.arch} mode={args.mode} batch_size={args.batch_size} '
        f'image_size={args.image_size} dtype={args.dtype} '
        f'memory_format={args.memory_format} compile={args.compile}')

  model = build_model(args.arch, args.num_classes).to(device, memory_format=memory_format)
  net = torch.compile(model) if args.compile else model
  optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  mean = torch.tensor(MEAN_RGB, device=device).view(1, 3, 1, 1)
  std = torch.tensor(STDDEV_RGB, device=device).view(1, 3, 1, 1)
  generator = torch.Generator().manual_seed(0)
  images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size),
                         dtype=torch.uint8, generator=generator).to(
                             device, memory_format=memory_format)
  labels = torch.randint(0, args.num_classes, (args.batch_size,),
                         generator=generator).to(device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=args.dtype == 'bfloat16')

  def train_step():
    x = ((images.float() - mean) / std).contiguous(memory_format=memory_format)
    with autocast:
      logits = net(x)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss

  @torch.inference_mode()
  def eval_step():
    x = ((images.float() - mean) / std).contiguous(memory_format=memory_format)
    with autocast:
      logits = net(x).float()
    loss = F.cross_entropy(logits, labels, reduction='sum')
    top5 = (logits.topk(5, dim=-1).indices == labels[:, None]).any(-1).sum()
    return loss + top5

  model.train(args.mode == 'train')
  step = train_step if args.mode == 'train' else eval_step

  def run_step():
    out = step()
    if device.type == 'cuda':
      torch.cuda.synchronize()
    else:
      out.item()

  return run_step


def main(argv=None) -> float:
  args = parse_args(argv)
  run_step = build_step(args)
  start = time.perf_counter()
  for _ in range(args.warmup):
    run_step()
  warmup_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  print(f'warmup_s={warmup_s:.1f}')
  print(f'step_s median={step_s:.4f} min={min(times):.4f} max={max(times):.4f} '
        f'(over {len(times)} steps)')
  images_per_sec = args.batch_size / step_s
  print(f'images_per_sec={images_per_sec:.2f}')
  return images_per_sec


if __name__ == '__main__':
  main(sys.argv[1:])
