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
  """A one-axis `data` mesh over all devices of all processes (-1 = all devices)."""
  shape = tuple(mesh_shape)
  if len(shape) != 1:
    raise ValueError(f'config.mesh_shape={shape}: only a 1-D data-parallel mesh is '
                     'supported; use (-1,) for all devices or (N,) for N of them.')
  size = jax.device_count() if shape[0] == -1 else shape[0]
  if size < 1 or size > jax.device_count():
    raise ValueError(f'config.mesh_shape={shape} asks for {size} devices but '
                     f'{jax.device_count()} are available.')
  return Mesh(np.asarray(jax.devices()[:size]), (DATA_AXIS,))


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


def put_replicated(tree: Any, target: jax.sharding.Sharding) -> Any:
  """Host arrays, identical on every process, as global arrays with sharding `target`."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])
  return jax.tree.map(put, tree)
