"""One process of tests/unit/test_distributed.py's real multi-process runs.

`python -m tests.support.distributed_worker ADDRESS COUNT PROCESS_ID HEARTBEAT VICTIM`:
joins via the explicit coordinator, puts (process_index + 1) on each of its
CPU devices, sums the global array and prints it. VICTIM >= 0: that process
then kills itself and the survivors block in the collective until the
heartbeat fires.
"""

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from chexnet_jax.runtime import distributed
from configs import default


def main(address, count, pid, heartbeat, victim):
  config = default.get_config()
  config.update(
    coordinator_address=address,
    num_processes=int(count),
    process_id=int(pid),
    heartbeat_timeout_seconds=int(heartbeat),
  )
  distributed.initialize(config)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  distributed.log_topology(mesh)

  def global_sum():
    local = np.full(jax.local_device_count(), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
    return float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))

  print(
    f'process {jax.process_index()}/{jax.process_count()} devices '
    f'{jax.local_device_count()}/{jax.device_count()} sum {global_sum()}',
    flush=True,
  )
  if int(victim) >= 0:
    if jax.process_index() == int(victim):
      os.kill(os.getpid(), signal.SIGKILL)
    while True:  # Survivors block in the collective until the heartbeat fires.
      global_sum()


if __name__ == '__main__':
  main(*sys.argv[1:])
