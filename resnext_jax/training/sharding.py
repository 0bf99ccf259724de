"""The device mesh and the shardings of the data-parallel train step.

The train state is replicated; batches are split along their leading axis over the
mesh's `data` axis, so a jitted step sees the global batch (and BatchNorm computes
global-batch statistics) while each device holds only its slice.
"""

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def create_mesh(mesh_shape: Sequence[int] = (-1,)) -> Mesh:
  """A one-axis `data` mesh over all devices of all processes (-1 = all devices).

  A mesh of N devices takes N / process_count devices from every process, so that each
  process holds part of every batch (the first N devices might all be one host's).
  """
  shape = tuple(mesh_shape)
  if len(shape) != 1:
    raise ValueError(f'config.mesh_shape={shape}: only a 1-D data-parallel mesh is '
                     'supported; use (-1,) for all devices or (N,) for N of them.')
  size = jax.device_count() if shape[0] == -1 else shape[0]
  if size < 1 or size > jax.device_count():
    raise ValueError(f'config.mesh_shape={shape} asks for {size} devices but '
                     f'{jax.device_count()} are available.')
  return Mesh(np.asarray(spread_over_processes(jax.devices(), size, shape)), (DATA_AXIS,))


def spread_over_processes(devices: Sequence[Any], size: int, shape: tuple) -> list[Any]:
  """`size` of `devices`, the same number from every process, in process order."""
  processes = sorted({d.process_index for d in devices})
  if size % len(processes):
    raise ValueError(f'config.mesh_shape={shape}: {size} devices do not split evenly over '
                     f'the {len(processes)} processes; use a multiple of {len(processes)}, '
                     'or (-1,).')
  per_process = size // len(processes)
  return [d for p in processes for d in [d for d in devices if d.process_index == p][:per_process]]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, name: str = 'config.batch_size') -> None:
  """Refuses, up front, a global batch that does not split evenly over the devices."""
  devices = mesh.devices.size
  if batch_size % devices:
    lower = max(devices, batch_size // devices * devices)
    raise ValueError(
        f'{name}={batch_size} does not divide over the {devices} devices of the mesh; '
        f'use a multiple of {devices} (e.g. {lower} or {lower + devices}).')


def round_up_to_devices(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded up to a multiple of the mesh's devices (for evaluation, whose
  last batch is padded anyway)."""
  devices = mesh.devices.size
  return -(-batch_size // devices) * devices


def put_replicated(tree: Any, target: jax.sharding.Sharding) -> Any:
  """Host arrays, identical on every process, as global arrays with sharding `target`."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])
  return jax.tree.map(put, tree)
