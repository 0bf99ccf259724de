"""Training: the loop (`trainer.py`), and what it is built from: pure steps and their jit
over a mesh (`steps.py`, `sharding.py`), the optimizer and schedule (`optim.py`), model
variables (`variables.py`), checkpoints, reporting and the default config.

`steps`, `sharding` and `optim` import only jax, flax and optax, so the benchmark reuses
them; nothing here is imported until asked for.
"""
