"""Reliability, continued: stops of a running trainer (a second Ctrl-C, a stop
during the first compile, a second run on one workdir, a hung step), its grain
workers killed, and runs of two processes (resumed on one, a dead peer).

Split from tests/system/test_reliability.py (whose helpers these tests use) so
the two halves run on two pytest-xdist workers at once (--dist loadfile gives a
file to one worker); none of these tests needs that module's reference run.
"""

import glob
import os
import re
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.support import runs
from tests.system.test_reliability import (
  CHECKPOINT_EVERY,
  RUN_ARGS,
  TIMEOUT,
  _assert_bitwise_equal_runs,
  _command,
  _drive,
  _env,
  _finish,
  _last_error_line,
  _main,
  _recorded_steps,
  _resumed_from,
  _start,
  _steps_on_disk,
  _tail,
  _tracebacks,
  _wait_for_step,
)


def test_second_ctrl_c_exits_at_once(tmp_path):
  """The first Ctrl-C asks for a save at the end of the step; a second one,
  while that step hangs, exits at once with one line."""
  workdir = tmp_path / 'run'
  process = _start(workdir, *RUN_ARGS, env=_env(TEST_HANG_AT_STEP=3))
  _wait_for_step(process, workdir, 3)
  process.send_signal(signal.SIGINT)
  time.sleep(1)  # The step hangs: the first Ctrl-C's save waits for its end.
  assert process.poll() is None
  process.send_signal(signal.SIGINT)
  start = time.monotonic()
  code, log = _finish(process)
  assert time.monotonic() - start < 10
  assert code == 130, _tail(log)
  assert _last_error_line(log).startswith('error: interrupted again (Ctrl-C): exiting at once')
  assert 'Traceback' not in log and 'KeyboardInterrupt' not in log, _tail(log)


@pytest.mark.parametrize('signum, code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stop_during_the_first_compile_exits_at_once(tmp_path, signum, code):
  """The first step (the compile: minutes for a DenseNet on a CPU, in C++, where
  Python's signal handlers wait) is stuck here; Ctrl-C or SIGTERM then exits at
  once, as nothing was trained since the start that a save could keep."""
  workdir = tmp_path / 'run'
  process = _start(workdir, *RUN_ARGS, env=_env(TEST_HANG_AT_STEP=1))
  _wait_for_step(process, workdir, 1)
  process.send_signal(signum)
  code_, log = _finish(process)
  assert code_ == code, _tail(log)
  line = [x for x in log.splitlines() if 'while the first step compiles' in x]
  assert line and 'nothing was trained since the start' in line[0], _tail(log)
  assert 'Traceback' not in log and 'KeyboardInterrupt' not in log, _tail(log)
  assert not _steps_on_disk(workdir)


def test_second_run_on_a_workdir_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  first = _start(workdir, '--config.num_train_steps=100000')
  try:
    _wait_for_step(first, workdir, 1, 'first run')
    with open(workdir / 'config.json') as f:
      config_before = f.read()
    code, log = _main(workdir, '--config.learning_rate=0.5')
    assert first.poll() is None  # Still training, untouched.
  finally:
    first.kill()
    first.wait()
  assert code == 1, _tail(log)
  line = _last_error_line(log)
  assert f'error: {workdir} is in use by another run (pid {first.pid} on ' in line, line
  assert 'Traceback' not in log and 'Starting a new run' not in log
  with open(workdir / 'config.json') as f:
    assert f.read() == config_before  # The second run wrote nothing.
  # The first run died (kill -9): its lock is recognised as stale and taken over.
  code, log = _main(workdir, '--config.num_train_steps=1')
  assert code == 0, _tail(log)
  assert f'Taking over {workdir}/run.lock from pid {first.pid} on ' in log, _tail(log)
  assert 'no longer runs' in log
  assert not (workdir / 'run.lock').exists()  # Freed when the run ended.


@pytest.mark.slow
def test_hung_step_ends_the_run_in_one_sentence(tmp_path):
  workdir = tmp_path / 'run'
  start = time.monotonic()
  code, log = _drive(
    workdir, *RUN_ARGS, '--config.step_timeout_min_seconds=3', env=_env(TEST_HANG_AT_STEP=12)
  )
  assert code == 124, _tail(log)
  assert time.monotonic() - start < 120
  line = _last_error_line(log)
  assert (
    line.startswith('error: training step 12 has taken ') and 'a process of the job hangs' in line
  ), line
  assert 'Traceback' not in log


# ------------------------------------------------------------ grain workers --


def _grain_workers(pid):
  """The pids of `pid`'s grain worker processes (multiprocessing's spawned
  children, not its resource tracker), from /proc."""
  children = []
  for path in glob.glob(f'/proc/{pid}/task/*/children'):
    with open(path) as f:
      children += f.read().split()
  workers = []
  for child in children:
    with open(f'/proc/{child}/cmdline', 'rb') as f:
      if b'spawn_main' in f.read():
        workers.append(int(child))
  return workers


@pytest.mark.slow
def test_killed_grain_worker_is_one_sentence_naming_dev_shm(tmp_path):
  """A worker dies of SIGBUS, as one does when /dev/shm is full (killing one is
  the portable way to get there: a small tmpfs needs privileges)."""
  workdir = tmp_path / 'run'
  process = _start(workdir, *RUN_ARGS, '--config.grain_workers=2')
  deadline = time.monotonic() + TIMEOUT
  while _recorded_steps(workdir) < 3 or not _grain_workers(process.pid):
    assert process.poll() is None and time.monotonic() < deadline, 'the run ended'
    time.sleep(0.1)
  os.kill(_grain_workers(process.pid)[0], signal.SIGBUS)
  code, log = _finish(process)
  assert code == 1, _tail(log)
  line = _last_error_line(log)
  assert line.startswith('error: A grain worker process died (exit code -7, SIGBUS'), line
  assert '/dev/shm holds ' in line and 'config.grain_workers=2' in line, line
  assert 'config.prefetch_buffer=2' in line and 'docker run --shm-size=' in line, line
  assert _tracebacks(log) == 0, _tail(log)


def _descendants(pid):
  """{pid: cmdline} of every process below `pid` (workers, multiprocessing's
  resource tracker, the stderr guard), from /proc."""
  found, todo = {}, [pid]
  while todo:
    parent = todo.pop()
    for path in glob.glob(f'/proc/{parent}/task/*/children'):
      with open(path) as f:
        for child in map(int, f.read().split()):
          if child not in found:
            found[child] = _cmdline(child)
            todo.append(child)
  return found


def _cmdline(pid):
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f.read()
  except OSError:
    return None


def _shared_memory_of(pids):
  """The /dev/shm files the processes map or hold open."""
  names = set()
  for pid in pids:
    for path in (f'/proc/{pid}/maps', *glob.glob(f'/proc/{pid}/fd/*')):
      try:
        text = open(path).read() if path.endswith('maps') else os.readlink(path)
      except OSError:
        continue
      names.update(re.findall(r'/dev/shm/(\S+)', text))
  return names


@pytest.mark.slow
def test_kill_9_with_grain_workers_leaves_no_process_or_shared_memory(tmp_path):
  """The out-of-memory killer's way: SIGKILL to the trainer alone. Its workers,
  their resource tracker and the stderr guard end with it, and the tracker frees
  the workers' shared memory."""
  workdir = tmp_path / 'run'
  process = _start(workdir, *RUN_ARGS, '--config.grain_workers=2')
  deadline = time.monotonic() + TIMEOUT
  while _recorded_steps(workdir) < 3 or len(_grain_workers(process.pid)) < 2:
    assert process.poll() is None and time.monotonic() < deadline, 'the run ended'
    time.sleep(0.1)
  below = _descendants(process.pid)
  segments = _shared_memory_of([process.pid, *below])
  assert len(below) >= 4 and segments, (below, segments)  # 2 workers, tracker, guard.
  process.kill()
  _finish(process)
  alive, left = _left_behind(below, segments)
  deadline = time.monotonic() + 30  # They must all be gone within 30 s; most go at once.
  while (alive or left) and time.monotonic() < deadline:
    time.sleep(0.5)
    alive, left = _left_behind(below, segments)
  assert not alive, alive
  assert not left, left


def _left_behind(processes, segments):
  """The processes ({pid: cmdline}) still running and the /dev/shm segments still there."""
  alive = {pid: cmd for pid, cmd in processes.items() if _cmdline(pid) == cmd}
  left = sorted(name for name in segments if os.path.exists(os.path.join('/dev/shm', name)))
  return alive, left


# ------------------------------------------------ resume on another topology --


_free_port = runs.free_port


def _start_two_processes(workdir, *args, driver=False):
  """Process 0 and 1 of one training job on `workdir`, each logging to WORKDIR.<i>.log."""
  os.makedirs(workdir)
  address = f'127.0.0.1:{_free_port()}'
  processes = []
  for i in range(2):
    with open(f'{workdir}.{i}.log', 'w') as log_file:  # The child keeps its own copy.
      flags = (
        f'--config.coordinator_address={address}',
        '--config.num_processes=2',
        f'--config.process_id={i}',
      )
      command = _command(workdir, (*RUN_ARGS, *flags, *args), driver=driver)
      processes.append(
        subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log_file, stderr=log_file)
      )
  return processes


@pytest.mark.slow
def test_run_on_two_processes_resumed_on_one_equals_an_uninterrupted_run(tmp_path):
  """2 processes x 1 device, killed after a checkpoint, resumed on 1 process x
  2 devices: the same global batches, so bit for bit the run never stopped."""
  two_devices = _env(XLA_FLAGS='--xla_force_host_platform_device_count=2')
  reference = tmp_path / 'reference'
  code, log = _drive(reference, *RUN_ARGS, env=two_devices)
  assert code == 0, _tail(log)

  workdir = tmp_path / 'run'
  processes = _start_two_processes(workdir, driver=True)
  try:
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / 'checkpoints' / str(2 * CHECKPOINT_EVERY)).exists():
      assert all(p.poll() is None for p in processes), open(f'{workdir}.0.log').read()[-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.05)
  finally:
    for p in processes:
      p.kill()
      p.wait()
  code, log = _drive(workdir, *RUN_ARGS, env=two_devices)
  assert code == 0, _tail(log)
  resumed = _resumed_from(log)
  assert resumed >= 2 * CHECKPOINT_EVERY, _tail(log)
  assert (
    f'Checkpoint step {resumed} was saved on 2 devices in total (2 processes); resuming '
    'on 2 devices in total (1 process), the same device count' in log
  ), _tail(log)
  _assert_bitwise_equal_runs(workdir, reference)


@pytest.mark.parametrize('victim', [1, 0], ids=['worker', 'coordinator'])
@pytest.mark.slow
def test_dead_peer_ends_the_survivor_in_one_sentence(tmp_path, victim):
  """2 processes; one is killed (-9) after the first checkpoint. The survivor
  exits non-zero within the heartbeat, in a few lines (JAX alone printed about
  60: a gloo traceback, coordination-service errors, a C++ check failure with
  its stack and Python's fault dump), and the checkpoint is there to resume."""
  heartbeat = 5
  workdir = tmp_path / 'run'
  processes = _start_two_processes(workdir, f'--config.heartbeat_timeout_seconds={heartbeat}')
  logs = [f'{workdir}.{i}.log' for i in range(2)]
  survivor = processes[1 - victim]
  try:
    deadline = time.monotonic() + TIMEOUT
    while not (workdir / 'checkpoints' / str(CHECKPOINT_EVERY)).exists():
      assert all(p.poll() is None for p in processes), open(logs[0]).read()[-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.05)
    before = os.path.getsize(logs[1 - victim])
    processes[victim].kill()
    killed = time.monotonic()
    survivor.wait(timeout=3 * heartbeat + 30)
    elapsed = time.monotonic() - killed
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.wait()
  # An abort by JAX's C++ comes first at times: then the sentence is written
  # by the stderr guard (chexnet_jax/runtime/stderr_guard.py) once the survivor is gone.
  for _ in range(100):
    with open(logs[1 - victim]) as f:
      f.seek(before)
      after = f.read()
    if 'resubmit' in after:
      break
    time.sleep(0.1)
  assert survivor.returncode != 0, after
  assert elapsed < 2 * heartbeat + 10, (elapsed, after)
  lines = after.splitlines()
  assert len(lines) <= 10, after
  assert 'Traceback' not in after and 'Fatal Python error' not in after, after
  assert 'error: lost ' in after, after
  assert 'so process %d stopped too' % (1 - victim) in after, after
  assert 'resubmit the same command' in after, after
  assert str(workdir) in after, after
  if victim == 0:
    assert 'process 0 (the coordinator)' in after or 'a peer process' in after, after
  assert str(CHECKPOINT_EVERY) in _steps_on_disk(workdir)
