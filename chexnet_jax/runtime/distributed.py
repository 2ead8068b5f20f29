"""Multi-process start-up: Slurm (srun), explicit coordinator, or one process.

`initialize(config)` must run before any other JAX call. Three cases:

- under `srun` with more than one task: `jax.distributed.initialize()` with no
  addresses; JAX reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS,
  SLURM_PROCID and SLURM_LOCALID, and gives each task the GPU numbered
  SLURM_LOCALID (so: one task per GPU);
- `config.coordinator_address` set: explicit address, process count and id
  (any launcher, or tests on one machine);
- otherwise: a single process, nothing to do.

Most failures of a multi-node job show up as a hang or an opaque gRPC/XLA error
much later. The checks here turn the common ones into an error that names the
setting, its value and the fix, before JAX starts.

A peer that dies mid-run (kill -9, OOM killer, node failure) ends the others
with one sentence each: `exit_if_peer_lost` when a collective raises (gloo),
stderr_guard.py when JAX's coordination service aborts the process from C++.
"""

import inspect
import logging
import os
import re
import socket
import sys
from typing import Callable, List, Mapping, Optional

import jax

from chexnet_jax import errors
from chexnet_jax.runtime import files, stderr_guard

# Values Slurm or CUDA use for "no GPU"; anything else in these variables means
# the job was given GPUs and must see them.
_NO_GPU_VALUES = ('', '-1', 'NoDevFiles', 'none')
_GPU_ENV_VARS = (
  'SLURM_GPUS_ON_NODE',
  'SLURM_STEP_GPUS',
  'SLURM_JOB_GPUS',
  'SLURM_GPUS_PER_NODE',
  'CUDA_VISIBLE_DEVICES',
)
_GPU_COUNT_VARS = ('SLURM_GPUS_ON_NODE', 'SLURM_GPUS_PER_NODE')  # Others: ids.
# Keyword names differ between JAX versions; pass only those this one takes.
_INIT_PARAMS = frozenset(inspect.signature(jax.distributed.initialize).parameters)

PEER_LOST_EXIT_CODE = 1
# What a collective or the coordination service raises on this process when a
# peer is gone (gloo on CPU; gRPC from the coordination service).
_PEER_ERROR = re.compile(
  r'Gloo|Connection reset|Connection refused|Socket closed|Broken pipe|heartbeat|'
  r'unhealthy|coordination service|UNAVAILABLE'
)
# This job, for the sentence: set by initialize.
_job = dict(process_id=None, num_processes=None, workdir=None)
_cleanups: List[Callable[[], None]] = []


class LaunchError(errors.UserRuntimeError):
  """The job was launched in a way that cannot work (Slurm flags, GPUs, a port)."""


def quiet_backend_probe() -> None:
  """JAX logs at INFO that it found no TPU on every machine without one."""
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)


def launch_mode(config, env: Mapping[str, str] = os.environ) -> str:
  """'slurm', 'explicit' or 'single': how this process joins the job."""
  if env.get('SLURM_JOB_ID') and int(env.get('SLURM_NTASKS', '1')) > 1:
    return 'slurm'
  if config.coordinator_address:
    return 'explicit'
  return 'single'


def initialize(config, env: Mapping[str, str] = os.environ, workdir: Optional[str] = None) -> None:
  """Joins the multi-process job described by Slurm or by `config`.

  `workdir` is only named in the sentence printed if a peer is lost; given,
  stderr goes through stderr_guard.py (one process too: it drops XLA's banner).
  """
  mode = launch_mode(config, env)
  if mode == 'single':
    _check_devices(mode, env)
    if workdir is not None:  # A trainer's run: XLA's slow-compile banner goes.
      stderr_guard.start(0, 1, os.path.abspath(workdir), files.LOCK_FILE)
    return
  if mode == 'slurm':
    check_slurm_env(env)
    kwargs = {}
  else:
    kwargs = explicit_args(config)
  _use_gloo_on_cpu()
  if _process_id(mode, config, env) == 0:
    check_port_free(coordinator_port(mode, config, env), mode)
  timeouts = timeout_kwargs(config)
  if workdir is not None:
    stderr_guard.start(
      _process_id(mode, config, env),
      _num_processes(mode, config, env),
      os.path.abspath(workdir),
      files.LOCK_FILE,
    )
  jax.distributed.initialize(**kwargs, **timeouts)
  _job.update(
    process_id=jax.process_index(),
    num_processes=jax.process_count(),
    workdir=os.path.abspath(workdir) if workdir else None,
  )
  _check_devices(mode, env)


# ---------------------------------------------------------------- peer loss --


def at_peer_loss(cleanup: Callable[[], None]) -> None:
  """Runs `cleanup` (e.g. releasing the workdir lock) before a peer-loss exit."""
  _cleanups.append(cleanup)


def exit_if_peer_lost(error: BaseException) -> None:
  """For an error that ended a multi-process run: if it is a collective failing
  because a peer is gone, prints one sentence and exits PEER_LOST_EXIT_CODE.
  Returns for any other error, or a single-process run, to raise it as is.

  os._exit: JAX's exit handler would wait at a shutdown barrier that the dead
  peer never reaches, then abort with a page of C++ and Python stacks.
  """
  if (_job['num_processes'] or 1) < 2 or not _PEER_ERROR.search(str(error)):
    return
  logging.debug('Peer loss, as JAX raised it: %s', error)  # Shown with -v 1.
  sys.stderr.write(
    stderr_guard.sentence(None, _job['process_id'], _job['num_processes'], _job['workdir']) + '\n'
  )
  sys.stderr.flush()
  for cleanup in _cleanups:
    try:
      cleanup()
    except Exception:  # pylint: disable=broad-except
      pass
  stderr_guard.finish()
  os._exit(PEER_LOST_EXIT_CODE)


def explicit_args(config) -> dict:
  """coordinator_address/num_processes/process_id from config. The commands check
  every field first (training/config_checks.py), so these are known to be sound."""
  return dict(
    coordinator_address=config.coordinator_address,
    num_processes=config.num_processes,
    process_id=config.process_id,
  )


def timeout_kwargs(config) -> dict:
  """Heartbeat/shutdown timeouts, for the names this JAX version accepts.

  The heartbeat timeout bounds how long the survivors of a dead peer (kill -9,
  node failure) wait before they exit non-zero instead of hanging in a
  collective until the Slurm time limit.
  """
  seconds = int(config.heartbeat_timeout_seconds)
  wanted = dict(
    heartbeat_timeout_seconds=seconds,
    # A process that exits waits this long for the others at the
    # final barrier; a dead peer must not stretch that to 5 min.
    shutdown_timeout_seconds=seconds,
  )
  return {k: v for k, v in wanted.items() if k in _INIT_PARAMS}


def check_slurm_env(env: Mapping[str, str] = os.environ) -> None:
  """Raises on Slurm launches that JAX's Slurm detection gets wrong."""
  ntasks = env.get('SLURM_NTASKS')
  if not env.get('SLURM_STEP_ID') and not env.get('SLURM_STEP_NODELIST'):
    raise LaunchError(
      f'SLURM_NTASKS={ntasks} but this process is not a task of `srun` (it '
      'runs in the batch script itself, so the other processes never '
      'start). Fix: launch with `srun python -m chexnet_jax.main ...`.'
    )
  if env.get('SLURM_GPUS_PER_TASK'):
    raise LaunchError(
      f'SLURM_GPUS_PER_TASK={env["SLURM_GPUS_PER_TASK"]} (from '
      "--gpus-per-task): then each task sees only its own GPU, but JAX's "
      'Slurm detection opens GPU number SLURM_LOCALID, which does not exist '
      'for tasks 1.. of a node. Fix: request --gpus-per-node=N (or '
      '--gres=gpu:N) with --ntasks-per-node=N, one task per GPU.'
    )
  _check_gpus_per_task(env)


def _check_gpus_per_task(env: Mapping[str, str]) -> None:
  """One task per GPU: more tasks than GPUs fail, fewer leave GPUs idle."""
  gpus = env.get('SLURM_GPUS_ON_NODE', '')
  if not gpus.isdigit() or int(gpus) == 0:
    return
  tasks = tasks_on_this_node(env)
  if tasks is not None and tasks != int(gpus):
    raise LaunchError(
      f'This node has SLURM_GPUS_ON_NODE={gpus} GPUs but runs {tasks} tasks '
      f'(SLURM_STEP_TASKS_PER_NODE={env.get("SLURM_STEP_TASKS_PER_NODE")}). '
      "JAX's Slurm detection gives each task the one GPU numbered "
      'SLURM_LOCALID, so the counts must match. Fix: '
      f'--ntasks-per-node={gpus} with --gpus-per-node={gpus}.'
    )


def tasks_on_this_node(env: Mapping[str, str]) -> Optional[int]:
  """Tasks of this step on this node, from Slurm's '4(x2),3' notation."""
  spec = env.get('SLURM_STEP_TASKS_PER_NODE') or env.get('SLURM_TASKS_PER_NODE')
  node_id = env.get('SLURM_NODEID')
  if not spec or node_id is None:
    return None
  counts = []
  for count, repeat in re.findall(r'(\d+)(?:\(x(\d+)\))?', spec):
    counts += [int(count)] * int(repeat or 1)
  node = int(node_id)
  return counts[node] if node < len(counts) else None


def coordinator_port(mode: str, config, env: Mapping[str, str]) -> int:
  """The port process 0 will listen on, computed the way JAX does."""
  if mode == 'explicit':
    return int(config.coordinator_address.rsplit(':', 1)[1])
  if env.get('JAX_COORDINATOR_PORT'):
    return int(env['JAX_COORDINATOR_PORT'])
  # jax/_src/clusters/slurm_cluster.py: a port in [61440, 65535] from the job id.
  return int(env['SLURM_JOB_ID']) % 2**12 + (65535 - 2**12 + 1)


def check_port_free(port: int, mode: str) -> None:
  """Process 0 binds the coordinator port; taken, JAX fails obscurely later."""
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  # SO_REUSEADDR: ports in TIME_WAIT are usable by gRPC too; only a live
  # listener is a conflict.
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind(('', port))
  except OSError as e:
    raise LaunchError(
      f'Coordinator port {port} on {socket.gethostname()} is '
      f'in use ({e.strerror}). Fix: {_port_fix(mode)}'
    ) from e
  finally:
    sock.close()


def _port_fix(mode: str) -> str:
  if mode == 'explicit':
    return (
      'pick a free port in --config.coordinator_address=host:PORT (same '
      'on every process), or stop the process holding it (`ss -ltnp`).'
    )
  return (
    'another job on this node derives the same port from its job id, or '
    'a stale process holds it (`ss -ltnp`). Set JAX_COORDINATOR_PORT to '
    'a free port in the sbatch script, e.g. '
    '`export JAX_COORDINATOR_PORT=$((20000 + SLURM_JOB_ID % 20000))`.'
  )


def _process_id(mode: str, config, env: Mapping[str, str]) -> int:
  return int(env['SLURM_PROCID']) if mode == 'slurm' else config.process_id


def _num_processes(mode: str, config, env: Mapping[str, str]) -> int:
  return int(env['SLURM_NTASKS']) if mode == 'slurm' else config.num_processes


def _use_gloo_on_cpu() -> None:
  # Cross-process collectives of the CPU backend; without them a CPU-only
  # multi-process job fails at its first all-reduce. GPU collectives use NCCL
  # and ignore this.
  try:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  except AttributeError:  # A JAX that no longer has the option (gloo built in).
    pass


def gpus_expected(env: Mapping[str, str] = os.environ) -> Optional[str]:
  """'VAR=value' of the variable saying this process was given GPUs, or None."""
  if env.get('JAX_PLATFORMS', '').strip().lower() == 'cpu':
    return None  # CPU on purpose (tests, the local cluster).
  for var in _GPU_ENV_VARS:
    value = env.get(var, '').strip()
    # A count of 0 is no GPU; CUDA_VISIBLE_DEVICES=0 is GPU number 0.
    zero_count = value == '0' and var in _GPU_COUNT_VARS
    if value not in _NO_GPU_VALUES and not zero_count:
      return f'{var}={value}'
  return None


def check_devices(
  mode: str, env: Mapping[str, str], platform: str, local_device_count: int
) -> None:
  """Raises if GPUs were allocated but JAX does not see them as expected."""
  reason = gpus_expected(env)
  if reason is None:
    return
  if platform != 'gpu':
    raise LaunchError(
      f'Process {env.get("SLURM_PROCID", 0)} on {socket.gethostname()} was '
      f'given GPUs ({reason}) but JAX sees only {platform} devices: the '
      'CUDA plugin is missing or failed to load. Fix: install the CUDA '
      "extra (`pip install -U 'jax[cuda12]'`; V100 needs CUDA 12), check "
      "`srun python -c 'import jax; print(jax.devices())'`, or set "
      'JAX_PLATFORMS=cpu to run on CPU on purpose.'
    )
  if mode == 'slurm' and local_device_count != 1:
    raise LaunchError(
      f'Process {env.get("SLURM_PROCID")} sees {local_device_count} GPUs; '
      "under srun JAX's Slurm detection expects exactly 1 per task "
      f'({reason}). Fix: one task per GPU: --ntasks-per-node=N with '
      '--gpus-per-node=N, and no --gpus-per-task.'
    )


def _check_devices(mode: str, env: Mapping[str, str]) -> None:
  check_devices(mode, env, jax.devices()[0].platform, jax.local_device_count())


def log_topology(mesh) -> None:
  """One line on process 0: processes, devices, mesh; the first thing to read
  when a multi-node job misbehaves."""
  if jax.process_index() != 0:
    return
  devices = jax.devices()
  logging.info(
    'Topology: %d processes, %d local / %d global %s devices (%s), mesh %s',
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    devices[0].platform,
    devices[0].device_kind,
    dict(mesh.shape),
  )
