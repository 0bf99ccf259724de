"""Per-layer timings of every distinct convolution of a ResNeXt, per implementation.

    python benchmarks/conv_layers.py --arch=resnext50_32x4d --batch_size=16 [--torch]

The layers are read off the model itself (the convolutions in the jaxpr of a train-mode
forward pass with `conv_impl='xla'`), so the list follows the architecture. For each
distinct layer and implementation it times the forward pass and the forward plus both
gradients (only the weight gradient for the stem, whose input is the image), and, with
`--torch`, PyTorch's convolution of the same shape in channels_last. The candidates of a
layer are timed in turns (round-robin) and the median is reported, so that a noisy
machine slows them alike. The last table weights each layer by how often it occurs.
(The allocator is set as train.py sets it: otherwise every large output is a fresh
mapping whose page faults are timed with the layer.)
"""

import collections
import os
import sys

from common import abstract_model, model_arguments, time_round_robin  # sets the allocator first

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.extend  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from resnext_jax.ops.conv import conv2d  # pylint: disable=g-import-not-at-top,wrong-import-position

Layer = collections.namedtuple('Layer', 'x_shape k_shape strides padding groups')


def parse_args(argv):
  parser = model_arguments(__doc__)
  parser.add_argument('--impls', default='xla,taps',
                      help='comma-separated conv_impl names to time')
  parser.add_argument('--rounds', type=int, default=3, help='timed turns per candidate')
  parser.add_argument('--torch', action='store_true', help='time PyTorch too')
  parser.add_argument('--skip', default='',
                      help='comma-separated impl:kind pairs not to time, e.g. '
                           'xla:train (XLA needs minutes for some grouped weight grads)')
  return parser.parse_args(argv)


def model_conv_layers(arch, batch_size, image_size):
  """Distinct convolutions of the model in order of appearance, with their counts."""
  model, images, variables = abstract_model(arch, 'xla', batch_size, image_size)
  jaxpr = jax.make_jaxpr(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(variables, images)
  counts = collections.Counter()

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        p = eqn.params
        counts[Layer(tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape),
                     tuple(p['window_strides']), tuple(map(tuple, p['padding'])),
                     p['feature_group_count'])] += 1
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jaxpr.jaxpr)
  return list(counts.items())


def describe(layer):
  n, h, w, c = layer.x_shape
  kh, _, _, co = layer.k_shape
  kind = f'g{layer.groups}' if layer.groups > 1 else 'dense'
  return f'{h}x{w}x{c}->{co} {kh}x{kh}/{layer.strides[0]} {kind}'


def jax_candidates(layer, impl):
  """Jitted forward and train (forward + gradients) functions of one layer."""
  needs_dx = layer.x_shape[-1] != 3  # the stem's input is the image

  def conv(x, k):
    return conv2d(x, k, strides=layer.strides, padding=layer.padding,
                  groups=layer.groups, impl=impl)

  def train(x, k, dy):
    # The output is returned too, or XLA would drop the forward pass.
    if needs_dx:
      y, vjp = jax.vjp(conv, x, k)
    else:
      y, vjp = jax.vjp(lambda k: conv(x, k), k)
    return (y,) + vjp(dy)

  return jax.jit(conv), jax.jit(train)


def torch_candidates(layer):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  n, h, w, c = layer.x_shape
  kh, kw, _, co = layer.k_shape
  conv = torch.nn.Conv2d(c, co, (kh, kw), layer.strides, layer.padding[0][0],
                         groups=layer.groups, bias=False).to(memory_format=torch.channels_last)
  x = torch.randn(n, c, h, w).to(memory_format=torch.channels_last)
  x.requires_grad_(c != 3)
  dy = torch.randn_like(conv(x)).contiguous(memory_format=torch.channels_last)

  def forward():
    with torch.no_grad():
      conv(x)

  def train():
    conv.weight.grad = None
    x.grad = None
    conv(x).backward(dy)

  return forward, train


def main(argv=None):
  args = parse_args(argv)
  impls = args.impls.split(',')
  skip = set(filter(None, args.skip.split(',')))
  layers = model_conv_layers(args.arch, args.batch_size, args.image_size)
  print(f'{args.arch}, batch {args.batch_size} at {args.image_size}: {len(layers)} distinct '
        f'convolutions, {sum(c for _, c in layers)} in all; jax {jax.__version__} on '
        f'{jax.devices()[0].device_kind}; milliseconds, median of {args.rounds}')
  names = [f'{impl}:{kind}' for impl in impls for kind in ('fwd', 'train')]
  if args.torch:
    names += ['torch:fwd', 'torch:train']
  names = [name for name in names if name not in skip]
  print(f'{"layer":34s} {"count":>5s} ' + ' '.join(f'{name:>11s}' for name in names))
  totals = collections.Counter()
  rng = np.random.default_rng(0)
  for layer, count in layers:
    x = jnp.asarray(rng.standard_normal(layer.x_shape, np.float32))
    k = jnp.asarray(rng.standard_normal(layer.k_shape, np.float32))
    candidates = {}
    for impl in impls:
      forward, train = jax_candidates(layer, impl)
      dy = jnp.ones(jax.eval_shape(forward, x, k).shape, jnp.float32)
      candidates[f'{impl}:fwd'] = (
          lambda f=forward: jax.block_until_ready(f(x, k)))
      candidates[f'{impl}:train'] = (
          lambda f=train, dy=dy: jax.block_until_ready(f(x, k, dy)))
    if args.torch:
      candidates['torch:fwd'], candidates['torch:train'] = torch_candidates(layer)
    candidates = {name: candidates[name] for name in names}
    result = time_round_robin(candidates, args.rounds)
    for name, seconds in result.items():
      totals[name] += count * seconds
    print(f'{describe(layer):34s} {count:5d} ' +
          ' '.join(f'{result[name] * 1e3:11.1f}' for name in names), flush=True)
  print(f'{"total (weighted by count)":34s} {"":5s} ' +
        ' '.join(f'{totals[name] * 1e3:11.1f}' for name in names))


if __name__ == '__main__':
  main(sys.argv[1:])
