"""One framework's step in a process of its own, run one step at a time on request.

    python benchmarks/step_worker.py ours|torch [that benchmark's flags]

`compare_cpu.py` starts one worker per framework and alternates their steps. Each worker
is set up as its users run that framework: ours with the C allocator configured as
train.py configures it (resnext_jax/host_memory.py; unless `--no-reuse_freed_memory`),
torchvision's with glibc's and PyTorch's defaults. Protocol on stdin/stdout: after
building and warming up the step the worker prints `ready`; then for each line `step`
it runs one step and prints `step_s=<seconds>`; it exits at end of input. Other lines
it prints (the benchmarks' own) come before `ready`.
"""

import sys
import time

READY = 'ready'
STEP = 'step'


def build(framework: str, argv: list[str]):
  """The framework's `run_step`, built and warmed up with its own benchmark's flags."""
  if framework == 'ours':
    if '--no-reuse_freed_memory' not in argv:
      from resnext_jax import host_memory  # pylint: disable=g-import-not-at-top
      host_memory.reuse_freed_memory()  # before JAX starts threads
    from resnext_jax import benchmark  # pylint: disable=g-import-not-at-top
    args = benchmark.parse_args(argv)
    run_step, flops, compile_s = benchmark.build_step(args)
    print(f'compile_s={compile_s:.1f} model_gflop_per_step={flops / 1e9:.1f}')
  elif framework == 'torch':
    import torch_reference  # pylint: disable=g-import-not-at-top
    args = torch_reference.parse_args(argv)
    run_step = torch_reference.build_step(args)
  else:
    raise SystemExit(f"step_worker: the framework is 'ours' or 'torch', not {framework!r}")
  for _ in range(args.warmup):
    run_step()
  return run_step


def main(argv: list[str]) -> None:
  run_step = build(argv[0], argv[1:])
  print(READY, flush=True)
  for line in sys.stdin:
    if line.strip() != STEP:
      raise SystemExit(f'step_worker: expected {STEP!r}, got {line.strip()!r}')
    start = time.perf_counter()
    run_step()
    print(f'step_s={time.perf_counter() - start:.6f}', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
