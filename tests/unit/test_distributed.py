"""chexnet_jax.runtime.distributed: launch checks with fake Slurm/CUDA environments, and
real multi-process JAX on CPU (explicit coordinator, gloo collectives)."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from chexnet_jax.runtime import distributed
from chexnet_jax.training import config_checks
from configs import default
from tests.support import runs

REPO = pathlib.Path(__file__).resolve().parents[2]

# A 4-task, 2-node srun step as Slurm describes it to task 2 (node 1, local 0).
SRUN_ENV = {
  'SLURM_JOB_ID': '1234',
  'SLURM_STEP_ID': '0',
  'SLURM_NTASKS': '4',
  'SLURM_PROCID': '2',
  'SLURM_LOCALID': '0',
  'SLURM_NODEID': '1',
  'SLURM_STEP_NODELIST': 'node[1-2]',
  'SLURM_STEP_TASKS_PER_NODE': '2(x2)',
}


def _config(**overrides):
  config = default.get_config()
  config.update(overrides)
  return config


def test_launch_mode():
  assert distributed.launch_mode(_config(), {}) == 'single'
  assert distributed.launch_mode(_config(), {'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}) == 'single'
  assert distributed.launch_mode(_config(), SRUN_ENV) == 'slurm'
  explicit = _config(coordinator_address='h:1', num_processes=2, process_id=0)
  assert distributed.launch_mode(explicit, {}) == 'explicit'


def test_batch_shell_without_srun_is_refused():
  # sbatch --ntasks=4 sets SLURM_NTASKS=4 in the batch shell too, where a bare
  # `python` would wait forever for 3 processes that never start.
  env = {k: v for k, v in SRUN_ENV.items() if k not in ('SLURM_STEP_ID', 'SLURM_STEP_NODELIST')}
  with pytest.raises(RuntimeError, match='srun python -m chexnet_jax.main'):
    distributed.check_slurm_env(env)


def test_gpus_per_task_is_refused():
  env = dict(SRUN_ENV, SLURM_GPUS_PER_TASK='1')
  with pytest.raises(RuntimeError, match='SLURM_GPUS_PER_TASK=1.*--gpus-per-node'):
    distributed.check_slurm_env(env)


@pytest.mark.parametrize('gpus', ['4', '1'])
def test_tasks_must_match_gpus_per_node(gpus):
  env = dict(SRUN_ENV, SLURM_GPUS_ON_NODE=gpus)
  with pytest.raises(
    RuntimeError,
    match=f'SLURM_GPUS_ON_NODE={gpus} GPUs but '
    r'runs 2 tasks.*--ntasks-per-node=',
  ):
    distributed.check_slurm_env(env)
  distributed.check_slurm_env(dict(SRUN_ENV, SLURM_GPUS_ON_NODE='2'))


@pytest.mark.parametrize(
  'spec,node,want', [('4(x4)', '3', 4), ('2(x2),1', '2', 1), ('3,1', '0', 3), ('4', '0', 4)]
)
def test_tasks_on_this_node(spec, node, want):
  env = {'SLURM_STEP_TASKS_PER_NODE': spec, 'SLURM_NODEID': node}
  assert distributed.tasks_on_this_node(env) == want


@pytest.mark.parametrize(
  'env,want',
  [
    ({}, None),
    ({'CUDA_VISIBLE_DEVICES': '0'}, 'CUDA_VISIBLE_DEVICES=0'),
    ({'CUDA_VISIBLE_DEVICES': ''}, None),
    ({'CUDA_VISIBLE_DEVICES': 'NoDevFiles'}, None),
    ({'SLURM_GPUS_ON_NODE': '0'}, None),
    ({'SLURM_GPUS_ON_NODE': '4'}, 'SLURM_GPUS_ON_NODE=4'),
    ({'SLURM_JOB_GPUS': '0'}, 'SLURM_JOB_GPUS=0'),
    ({'SLURM_GPUS_ON_NODE': '4', 'JAX_PLATFORMS': 'cpu'}, None),
  ],
)
def test_gpus_expected(env, want):
  assert distributed.gpus_expected(env) == want


def test_gpu_allocated_but_jax_on_cpu():
  env = dict(SRUN_ENV, SLURM_GPUS_ON_NODE='2', CUDA_VISIBLE_DEVICES='0,1')
  with pytest.raises(
    RuntimeError,
    match=r'given GPUs \(SLURM_GPUS_ON_NODE=2\) '
    'but JAX sees only cpu.*jax\\[cuda12\\]',
  ):
    distributed.check_devices('slurm', env, 'cpu', 1)


def test_wrong_gpu_count_per_task():
  env = dict(SRUN_ENV, SLURM_GPUS_ON_NODE='2')
  with pytest.raises(RuntimeError, match='sees 2 GPUs.*exactly 1 per task'):
    distributed.check_devices('slurm', env, 'gpu', 2)
  distributed.check_devices('slurm', env, 'gpu', 1)
  distributed.check_devices('explicit', env, 'gpu', 2)
  distributed.check_devices('slurm', {}, 'cpu', 2)


def test_coordinator_port_like_jax():
  env = dict(SRUN_ENV, SLURM_JOB_ID='5000')
  assert distributed.coordinator_port('slurm', _config(), env) == (5000 % 4096 + 61440)
  env['JAX_COORDINATOR_PORT'] = '23456'
  assert distributed.coordinator_port('slurm', _config(), env) == 23456
  explicit = _config(coordinator_address='10.0.0.1:1234')
  assert distributed.coordinator_port('explicit', explicit, {}) == 1234


@pytest.mark.parametrize(
  'mode,fix', [('explicit', 'coordinator_address'), ('slurm', 'JAX_COORDINATOR_PORT')]
)
def test_port_in_use(mode, fix):
  with socket.socket() as holder:
    holder.bind(('', 0))
    holder.listen()
    port = holder.getsockname()[1]
    with pytest.raises(RuntimeError, match=f'port {port} .* in use.*{fix}'):
      distributed.check_port_free(port, mode)
  distributed.check_port_free(port, mode)


def test_port_in_use_stops_process_0_before_jax(monkeypatch):
  called = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize', lambda **kw: called.append(kw))
  with socket.socket() as holder:
    holder.bind(('', 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = _config(coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=0)
    with pytest.raises(RuntimeError, match=f'port {port}'):
      distributed.initialize(config, env={})
  assert not called


def test_slurm_initialize_passes_no_addresses(monkeypatch):
  called = []
  monkeypatch.setattr(distributed.jax.distributed, 'initialize', lambda **kw: called.append(kw))
  env = dict(SRUN_ENV, JAX_PLATFORMS='cpu')
  distributed.initialize(_config(heartbeat_timeout_seconds=7), env=env)
  # Addresses, counts and ids come from JAX's own Slurm detection.
  assert called == [{'heartbeat_timeout_seconds': 7, 'shutdown_timeout_seconds': 7}]


@pytest.mark.parametrize(
  'overrides,match',
  [
    (dict(num_processes=-1, process_id=0), r'config.num_processes=-1 must be the number'),
    (dict(num_processes=2, process_id=2), r'config.process_id=2 must be from 0 to'),
    (dict(num_processes=2, process_id=0, coordinator_address='host'), "'host:port'"),
  ],
)
def test_explicit_args_errors(overrides, match):
  config = _config(coordinator_address='host:1')
  config.update(overrides)
  with pytest.raises(ValueError, match=match):
    config_checks.check_fields(config, ('coordinator_address', 'num_processes', 'process_id'))


def test_heartbeat_must_be_positive():
  with pytest.raises(ValueError, match='heartbeat_timeout_seconds=0'):
    config_checks.check_fields(_config(heartbeat_timeout_seconds=0), ('heartbeat_timeout_seconds',))


def test_single_process_is_a_no_op(monkeypatch):
  monkeypatch.setattr(
    distributed.jax.distributed, 'initialize', lambda **kw: pytest.fail('must not initialize')
  )
  distributed.initialize(_config(), env={})


# Real processes, each one tests/support/distributed_worker.py: it joins via the
# explicit coordinator, puts (process_index + 1) on each of its 2 CPU devices,
# and sums the global array.
WORKER = 'tests.support.distributed_worker'


_free_port = runs.free_port


def _launch(num_processes, heartbeat=60, victim=-1):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    PYTHONPATH=str(REPO),
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
  )
  address = f'127.0.0.1:{_free_port()}'
  return [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        WORKER,
        address,
        str(num_processes),
        str(i),
        str(heartbeat),
        str(victim),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(num_processes)
  ]


def _finish(procs, timeout):
  try:
    return [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


@pytest.mark.slow
def test_two_processes_sum_a_global_array():
  procs = _launch(2)
  outputs = _finish(procs, timeout=120)
  for i, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, out
    # 2 processes x 2 devices: 1 + 1 + 2 + 2.
    assert f'process {i}/2 devices 2/4 sum 6.0' in out, out


@pytest.mark.parametrize('victim', [1, 0], ids=['worker', 'coordinator'])
@pytest.mark.slow
def test_dead_peer_stops_survivors_within_heartbeat(victim):
  heartbeat = 4
  procs = _launch(2, heartbeat=heartbeat, victim=victim)
  start = time.monotonic()
  outputs = _finish(procs, timeout=120)
  elapsed = time.monotonic() - start
  survivor = procs[1 - victim]
  assert procs[victim].returncode == -signal.SIGKILL, outputs[victim]
  assert survivor.returncode != 0, outputs[1 - victim]
  # Start-up (~5 s on 2 busy cores) + the heartbeat + slack; the point is that
  # it ends at all instead of hanging in the collective.
  assert elapsed < 30 + 3 * heartbeat, (elapsed, outputs)


@pytest.mark.parametrize(
  'text,process_id,lost',
  [
    # Process 0 hosts the service: a worker's heartbeat timed out.
    (
      'UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n1\n',
      0,
      'process 1',
    ),
    (
      'Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 3 heartbeat timeout.',
      2,
      'process 3',
    ),
    # A worker: the coordinator itself is gone.
    (
      'Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Socket closed',
      1,
      'process 0 (the coordinator)',
    ),
    ('Polled an error from coordination service', 1, None),
  ],
)
def test_lost_process_named_from_jax_text(text, process_id, lost):
  from chexnet_jax.runtime import stderr_guard

  assert stderr_guard.lost_processes(text, process_id) == lost


def _through_guard(tmp_path, lines):
  """(what the guard writes to stderr, its peer_lost file or None) for the trainer's
  stderr `lines`, the guard run as the trainer runs it (a script reading its stdin)."""
  from chexnet_jax.runtime import files, stderr_guard

  guard = subprocess.run(
    [sys.executable, stderr_guard.__file__, '1', '2', str(tmp_path), '0', files.LOCK_FILE],
    input=''.join(line + '\n' for line in lines).encode(),
    capture_output=True,
    timeout=60,
  )
  report = tmp_path / 'peer_lost.process1.log'
  return guard.stderr.decode(), report.read_text() if report.exists() else None


_ABORT_STACK = [
  'F0000 00:00:1 coordination_service_agent.cc:1] Check failed: status.ok()',
  '*** Check failure stack trace: ***',
  '    @     0x7f00 absl::log_internal::LogMessageFatal::~LogMessageFatal()',
  'Fatal Python error: Aborted',
]


def test_guard_keeps_what_follows_the_trainers_sentence_in_a_file(tmp_path):
  """The trainer says the job is lost, then JAX's C++ aborts it: the console ends with the
  sentence (and where JAX's report is), the abort's stack goes to the file."""
  sentence = 'error: lost process 0 (the coordinator) of this 2-process job ...'
  shown, report = _through_guard(tmp_path, ['step 8: loss 0.52', sentence, *_ABORT_STACK])
  assert shown.splitlines() == [
    'step 8: loss 0.52',
    sentence,
    f"JAX's own report: {tmp_path / 'peer_lost.process1.log'}",
  ]
  assert report.splitlines() == _ABORT_STACK


def test_guard_writes_the_sentence_when_jax_reports_first(tmp_path):
  dead = (
    'E0000 00:00:1 agent.cc:1] Polled an error from coordination service: Task 0 heartbeat timeout'
  )
  shown, report = _through_guard(tmp_path, ['step 8: loss 0.52', dead, *_ABORT_STACK])
  lines = shown.splitlines()
  assert lines[0] == 'step 8: loss 0.52' and len(lines) == 3
  assert lines[1].startswith('error: lost process 0 of this 2-process job')
  assert 'so process 1 stopped too' in lines[1] and str(tmp_path) in lines[1]
  assert report.splitlines() == [dead, *_ABORT_STACK]


def test_guard_passes_everything_when_no_peer_is_lost(tmp_path):
  lines = ['step 8: loss 0.52', 'Traceback (most recent call last):', 'ValueError: x']
  shown, report = _through_guard(tmp_path, lines)
  assert shown.splitlines() == lines and report is None
