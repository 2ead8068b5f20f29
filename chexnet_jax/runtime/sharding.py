"""The device mesh: one axis, 'data', over every device of every process.

The batch is split over 'data'; parameters, optimizer state and BatchNorm
statistics are replicated.
"""

import jax

DATA_AXIS = 'data'


def make_mesh():
  """A 1-D mesh over every device of every process."""
  return jax.make_mesh(
    (jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,)
  )


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def data_sharded(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def to_global(batch, mesh):
  """Process-local numpy batch -> global jax.Arrays sharded over 'data'."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
