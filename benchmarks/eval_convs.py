"""Eval-mode conv + batch norm (+ shortcut) (+ ReLU): the fused C++ pass against XLA's.

    python benchmarks/eval_convs.py --arch=resnext50_32x4d --batch_size=16

The layers are the calls that the eval-mode model (`conv_impl='native'`) makes to
`ops.fused_eval.conv2d_normalized` (its 1x1 convs and its stem), recorded while tracing it.
For each distinct one it times the fused kernel and the same computation without it
('native''s convolution, then the norm, add and ReLU as XLA ops, as the model ran them
before), in turns, and reports medians; the last line weights each layer by how often
it occurs.
"""

import collections
import sys

from common import abstract_model, model_arguments, time_round_robin  # sets the allocator first

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from resnext_jax.ops import conv, fused_eval  # pylint: disable=g-import-not-at-top,wrong-import-position

Layer = collections.namedtuple('Layer', 'x_shape k_shape strides padding residual relu')


def parse_args(argv):
  parser = model_arguments(__doc__)
  parser.add_argument('--rounds', type=int, default=5, help='timed turns per candidate')
  return parser.parse_args(argv)


def fused_layers(arch, batch_size, image_size):
  """The model's calls to `conv2d_normalized` in eval mode, with their counts."""
  model, images, variables = abstract_model(arch, 'native', batch_size, image_size)
  calls = collections.Counter()
  original = fused_eval.conv2d_normalized

  def record(x, kernel, scale, offset, *, strides, padding=((0, 0), (0, 0)),
             residual=None, relu=False):
    calls[Layer(x.shape, kernel.shape, tuple(strides), tuple(map(tuple, padding)),
                residual is not None, relu)] += 1
    return original(x, kernel, scale, offset, strides=strides, padding=padding,
                    residual=residual, relu=relu)

  fused_eval.conv2d_normalized = record
  try:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  finally:
    fused_eval.conv2d_normalized = original
  return calls


def candidates(layer):
  """(fused, unfused) jitted functions of the layer's arrays."""
  def fused(x, kernel, scale, offset, residual):
    return fused_eval.conv2d_normalized(x, kernel, scale, offset, strides=layer.strides,
                                        padding=layer.padding, residual=residual,
                                        relu=layer.relu)

  def unfused(x, kernel, scale, offset, residual):
    y = conv.conv2d(x, kernel, strides=layer.strides, padding=layer.padding,
                            impl='native') * scale + offset
    y = y if residual is None else y + residual
    return jnp.maximum(y, 0) if layer.relu else y

  return jax.jit(fused), jax.jit(unfused)


def layer_inputs(layer):
  rng = np.random.default_rng(0)
  x = rng.standard_normal(layer.x_shape, np.float32)
  kernel = rng.standard_normal(layer.k_shape, np.float32) * 0.05
  out_channels = layer.k_shape[-1]
  scale, offset = np.ones(out_channels, np.float32), np.zeros(out_channels, np.float32)
  out_shape = jax.eval_shape(candidates(layer)[1], x, kernel, scale, offset, None).shape
  residual = rng.standard_normal(out_shape, np.float32) if layer.residual else None
  return jax.tree.map(jnp.asarray, (x, kernel, scale, offset, residual))


def time_layer(layer, rounds):
  """Median seconds of (fused, unfused), timed in turns."""
  args = layer_inputs(layer)
  fused, unfused = candidates(layer)
  result = time_round_robin({'fused': lambda: jax.block_until_ready(fused(*args)),
                             'unfused': lambda: jax.block_until_ready(unfused(*args))},
                            rounds)
  return result['fused'], result['unfused']


def main(argv):
  args = parse_args(argv)
  print(f'{args.arch}, batch {args.batch_size} at {args.image_size}, float32, '
        f'{jax.device_count()} x {jax.devices()[0].device_kind}; ms, median of {args.rounds}')
  print('| input | kernel | stride | residual | ReLU | count | fused | unfused | speedup |')
  print('|---|---|---:|---|---|---:|---:|---:|---:|')
  totals = [0.0, 0.0]
  for layer, count in fused_layers(args.arch, args.batch_size, args.image_size).items():
    fused, unfused = time_layer(layer, args.rounds)
    totals[0] += count * fused
    totals[1] += count * unfused
    print(f'| {"x".join(map(str, layer.x_shape))} | {"x".join(map(str, layer.k_shape))} '
          f'| {layer.strides[0]} | {"yes" if layer.residual else "no"} '
          f'| {"yes" if layer.relu else "no"} | {count} | {fused * 1e3:.1f} '
          f'| {unfused * 1e3:.1f} | {unfused / fused:.2f} |', flush=True)
  print(f'weighted total: fused {totals[0] * 1e3:.0f} ms, unfused {totals[1] * 1e3:.0f} ms, '
        f'speedup={totals[1] / totals[0]:.3f}')


if __name__ == '__main__':
  main(sys.argv[1:])
