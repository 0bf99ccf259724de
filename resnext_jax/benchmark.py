"""Times the trainer's own train (or eval) step on synthetic data already on the device.

    python -m resnext_jax.benchmark --arch=resnext50_32x4d --batch_size=16 --mode=train

The step is the trainer's own: `training.steps.jit_steps` over `training.sharding`'s mesh
of all devices (state replicated and donated, batch split), with `training.optim.sgd` at
the recipe's momentum and weight decay, BatchNorm in train mode. Reported: compile time,
the median (and min / max) of the timed steps, the model's FLOPs per step from XLA's cost
analysis of the step built with `conv_impl='xla'` (so every implementation is credited
with the same work; a `fori_loop` would otherwise be counted once), the FLOP/s that makes,
and MFU where the device's peak is in `PEAK_FLOPS`. The last line is
`images_per_sec=<float>`.

The train and eval modes need only jax, flax, optax, numpy and this package's model and
step code (no TensorFlow, clu or orbax; tests/test_benchmark.py blocks them), so they run
wherever JAX does: from a checkout, or after `pip install --no-deps -e .`.

    python -m resnext_jax.benchmark --mode=end_to_end --batch_size=16 --steps=5

runs the trainer's whole loop on generated JPEGs against the step alone (`end_to_end`);
it needs the full requirements. Its last lines are `input_wait_share=<float>` and
`ratio=<end-to-end images/s over the step alone's>`.
"""

import argparse
import statistics
import sys
import time

from resnext_jax import host_memory

# As train.py does, before NumPy and JAX start threads (host_memory.py says why).
if __name__ == '__main__' and '--no-reuse_freed_memory' not in sys.argv:
  host_memory.reuse_freed_memory()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from resnext_jax.model import resnext  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnext_jax.ops import impl as impls  # pylint: disable=g-import-not-at-top,wrong-import-position
from resnext_jax.training import optim, sharding, steps  # pylint: disable=g-import-not-at-top,wrong-import-position

# Dense peak FLOP/s per device (tensor cores; float32 means TF32, which XLA uses for
# float32 convolutions and matmuls on these GPUs by default). Matched against
# `device_kind` by substring, first match wins.
PEAK_FLOPS = (
    ('H200', {'bfloat16': 989e12, 'float32': 494e12}),
    ('H100 PCIe', {'bfloat16': 756e12, 'float32': 378e12}),
    ('H100', {'bfloat16': 989e12, 'float32': 494e12}),
    ('A100', {'bfloat16': 312e12, 'float32': 156e12}),
    ('TPU v4', {'bfloat16': 275e12}),
    ('TPU v5 lite', {'bfloat16': 197e12}),
    ('TPU v5e', {'bfloat16': 197e12}),
    ('TPU v5p', {'bfloat16': 459e12}),
    ('TPU v6', {'bfloat16': 918e12}),
)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--arch', default='resnext50_32x4d', choices=sorted(resnext.ARCHS))
  parser.add_argument('--batch_size', type=int, default=16, help='global batch size')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--num_classes', type=int, default=1000)
  parser.add_argument('--mode', default='train', choices=('train', 'eval', 'end_to_end'),
                      help='end_to_end: the trainer loop on generated JPEGs against the '
                           'train step alone (loads TensorFlow)')
  parser.add_argument('--num_files', type=int, default=256,
                      help='end_to_end: generated 500x375 JPEGs to train on')
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=1, help='untimed steps after compiling')
  parser.add_argument('--conv_impl', default='auto',
                      choices=['auto'] + sorted(impls.IMPLEMENTATIONS))
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--reuse_freed_memory', default=True,
                      action=argparse.BooleanOptionalAction,
                      help='configure the C allocator as train.py does (host_memory.py); '
                           'applied at start-up, before JAX is imported')
  return parser.parse_args(argv)


def peak_flops(device, dtype: str):
  """The device's dense peak for `dtype`, or None where it is not known (e.g. CPUs)."""
  for key, peaks in PEAK_FLOPS:
    if key in device.device_kind:
      return peaks.get(dtype)
  return None


def _step_function(args, model, tx, mesh):
  jitted = steps.jit_steps(model, tx, mesh)
  return jitted.train if args.mode == 'train' else jitted.eval


def model_flops(args, state, batch, tx, mesh) -> float:
  """FLOPs of one step as XLA counts them for the reference implementation."""
  model = resnext.create_model(args.arch, num_classes=args.num_classes,
                               dtype=jnp.dtype(args.dtype), conv_impl='xla')
  cost = _step_function(args, model, tx, mesh).lower(state, batch).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', 0.0)) if cost else 0.0


def build_step(args):
  """Builds model, state and batch and compiles the step.

  Returns `(run_step, flops, compile_s)`: `run_step()` runs one step to completion
  (carrying the donated state from call to call), `flops` is the model's FLOPs per step
  (0 if XLA does not say).
  """
  mesh = sharding.create_mesh()
  sharding.check_batch_size(args.batch_size, mesh, '--batch_size')
  devices = jax.devices()
  impl = impls.resolve_impl(args.conv_impl)
  print(f'devices: {len(devices)} x {devices[0].device_kind} ({jax.default_backend()}), '
        f'jax {jax.__version__}')
  print(f'arch={args.arch} mode={args.mode} batch_size={args.batch_size} '
        f'image_size={args.image_size} dtype={args.dtype} conv_impl={args.conv_impl} '
        f'(-> {impl})')

  model = resnext.create_model(args.arch, num_classes=args.num_classes,
                               dtype=jnp.dtype(args.dtype), conv_impl=impl)
  variables = resnext.init_variables(model, jax.random.key(0), args.image_size)
  tx = optim.sgd(0.1, momentum=0.9, weight_decay=1e-4)  # the recipe's, at batch 256
  state = jax.device_put(steps.create_train_state(variables, tx), sharding.replicated(mesh))
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      'image': rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3),
                            dtype=np.uint8),
      'label': rng.integers(0, args.num_classes, (args.batch_size,), dtype=np.int32),
  }, sharding.batch_sharding(mesh))

  flops = model_flops(args, state, batch, tx, mesh)
  fn = _step_function(args, model, tx, mesh)
  start = time.perf_counter()
  compiled = fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  def run_step():
    nonlocal state
    if args.mode == 'train':
      state, metrics = compiled(state, batch)
    else:
      metrics = compiled(state, batch)
    jax.block_until_ready(metrics)

  return run_step, flops, compile_s


def report_flops(flops: float, step_s: float, dtype: str):
  if flops:
    achieved = flops / step_s
    line = f'model_gflop_per_step={flops / 1e9:.1f} achieved_tflops={achieved / 1e12:.3f}'
    devices = jax.devices()
    peak = peak_flops(devices[0], dtype)
    if peak:
      line += f' mfu={achieved / (peak * len(devices)):.3f}'
    print(line)


def time_step(args) -> float:
  """Compiles and times the step alone; prints the figures, returns images/s."""
  run_step, flops, compile_s = build_step(args)
  for _ in range(args.warmup):
    run_step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)

  step_s = statistics.median(times)
  print(f'compile_s={compile_s:.1f}')
  print(f'step_s median={step_s:.4f} min={min(times):.4f} max={max(times):.4f} '
        f'(over {len(times)} steps)')
  report_flops(flops, step_s, args.dtype)
  return args.batch_size / step_s


# Fewest untimed steps of the trainer loop in the end_to_end mode (see `end_to_end`).
LOOP_WARMUP_STEPS = 2


def end_to_end(args) -> float:
  """The trainer's own loop (`train_and_evaluate`: JPEG decoding on the host, prefetch to
  the devices, the jitted step, logging) on generated ImageNet-like JPEGs, then the step
  alone on device-resident batches; prints both rates, the loop's share of time spent
  waiting for input, and their ratio. Loads TensorFlow and the input pipeline."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from resnext_jax import input_benchmark  # pylint: disable=g-import-not-at-top
  from resnext_jax.training import default_config, trainer  # pylint: disable=g-import-not-at-top

  # Untimed loop steps: the first compiles, the second grows the heap to the step's
  # buffers (faulting in fresh pages; host_memory.py).
  warmup = max(args.warmup, LOOP_WARMUP_STEPS)
  with tempfile.TemporaryDirectory() as root:
    input_benchmark.write_images(os.path.join(root, 'train'), args.num_files)
    input_benchmark.write_images(os.path.join(root, 'validation'), 2)
    config = default_config.get_config()
    config.update(dataset='image_folder', data_dir=root,
                  cache_dir=os.path.join(root, 'cache'), arch=args.arch,
                  num_classes=args.num_classes, image_size=args.image_size,
                  batch_size=args.batch_size, eval_batch_size=args.batch_size,
                  dtype=args.dtype, conv_impl=args.conv_impl,
                  num_train_steps=warmup + args.steps, log_every_steps=warmup,
                  eval_every_steps=10**9, checkpoint_every_steps=10**9)
    workdir = os.path.join(root, 'run')
    trainer.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      timed = [r for r in map(json.loads, f) if 'images_per_sec' in r][-1]
  synthetic = time_step(argparse.Namespace(**{**vars(args), 'mode': 'train'}))
  shares = ', '.join(f'{k[len("time_"):]} {v:.3f}' for k, v in timed.items()
                     if k.startswith('time_'))
  print(f'end_to_end_images_per_sec={timed["images_per_sec"]:.2f} (steps {warmup + 1}-'
        f'{warmup + args.steps} of the trainer loop; time shares: {shares})')
  print(f'synthetic_images_per_sec={synthetic:.2f}')
  print(f'input_wait_share={timed["time_input"]:.3f}')
  ratio = timed['images_per_sec'] / synthetic
  print(f'ratio={ratio:.3f}')
  return ratio


def main(argv=None) -> float:
  args = parse_args(argv)
  if args.mode == 'end_to_end':
    return end_to_end(args)
  images_per_sec = time_step(args)
  print(f'images_per_sec={images_per_sec:.2f}')
  return images_per_sec


if __name__ == '__main__':
  main(sys.argv[1:])
