"""One run per workdir: the lock refuses a live holder, takes over a dead one."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from chexnet_jax.run import workdir_lock


from chexnet_jax.runtime import files

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dead_pid():
  process = subprocess.Popen(['true'])
  process.wait()
  return process.pid


def _write_lock(workdir, age=0.0, **holder):
  path = os.path.join(workdir, files.LOCK_FILE)
  with open(path, 'w') as f:
    json.dump(
      {
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'slurm_job_id': '',
        'started': time.time() - age,
        'token': 'theirs',
        **holder,
      },
      f,
    )
  os.utime(path, (time.time() - age, time.time() - age))
  return path


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path), env={'SLURM_JOB_ID': '4242'}).acquire()
  with pytest.raises(
    workdir_lock.WorkdirBusyError,
    match=rf'^{tmp_path} is in use by another run \(pid {os.getpid()} '
    rf'on {socket.gethostname()} \(Slurm job 4242\), running since',
  ):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not os.path.exists(tmp_path / files.LOCK_FILE)
  workdir_lock.WorkdirLock(str(tmp_path)).acquire().release()  # Free again.


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  pid = _dead_pid()
  _write_lock(tmp_path, pid=pid)
  lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert f'process {pid} no longer runs' in caplog.text
  with open(lock.path) as f:
    assert json.load(f)['pid'] == os.getpid()
  lock.release()


def test_lock_naming_a_live_reused_pid_is_taken_over_at_once(tmp_path, caplog):
  """The holder died and its pid now belongs to another live process (here: a
  sleeping child, with the start time of the process that took the lock)."""
  other = subprocess.Popen(['sleep', '60'])
  try:
    _write_lock(tmp_path, pid=other.pid, pid_start=workdir_lock._start_ticks(os.getpid()))
    lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    other.kill()
    other.wait()
  assert f'process {other.pid} no longer runs (its pid now belongs to another process)' in (
    caplog.text
  )
  lock.release()


def test_lock_of_a_live_holder_with_its_start_time_is_refused(tmp_path):
  other = subprocess.Popen(['sleep', '60'])
  try:
    _write_lock(tmp_path, pid=other.pid, pid_start=workdir_lock._start_ticks(other.pid))
    with pytest.raises(workdir_lock.WorkdirBusyError, match=rf'pid {other.pid} on '):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  finally:
    other.kill()
    other.wait()


def test_lock_of_this_slurm_job_before_its_requeue_is_taken_over(tmp_path, caplog):
  _write_lock(tmp_path, host='node7', pid=1, slurm_job_id='99')
  workdir_lock.WorkdirLock(str(tmp_path), env={'SLURM_JOB_ID': '99'}).acquire().release()
  assert 'an earlier run of this Slurm job (99)' in caplog.text


def test_lock_of_another_host_is_stale_only_once_not_refreshed(tmp_path, caplog):
  _write_lock(tmp_path, host='node7', pid=1, slurm_job_id='12')
  with pytest.raises(workdir_lock.WorkdirBusyError, match=r'pid 1 on node7 \(Slurm job 12\)'):
    workdir_lock.WorkdirLock(str(tmp_path), stale_seconds=60).acquire()
  _write_lock(tmp_path, age=120, host='node7', pid=1, slurm_job_id='12')
  workdir_lock.WorkdirLock(str(tmp_path), stale_seconds=60).acquire().release()
  assert 'not refreshed for 120 s' in caplog.text
  assert len([n for n in os.listdir(tmp_path) if '.stale-' in n]) == 1  # Kept aside.


def test_the_holder_refreshes_its_lock(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_seconds=0.05).acquire()
  old = time.time() - 1000
  os.utime(lock.path, (old, old))
  time.sleep(0.5)
  assert os.stat(lock.path).st_mtime > old + 900
  lock.release()


def test_release_leaves_another_runs_lock_alone(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  _write_lock(tmp_path, host='node7', pid=1)  # Taken over meanwhile (e.g. by hand).
  lock.release()
  assert os.path.exists(tmp_path / files.LOCK_FILE)


_HOLDER = """
import sys, time
from chexnet_jax.run import workdir_lock
lock = workdir_lock.WorkdirLock(sys.argv[1], heartbeat_seconds=0.1).acquire()
print('held', flush=True)
time.sleep(60)
print('still running', flush=True)
"""


@pytest.mark.parametrize('how', ['deleted', 'taken'])
def test_the_holder_stops_in_one_sentence_once_its_lock_is_gone(tmp_path, how):
  """`rm WORKDIR/run.lock` while a run holds it lets a second run start: the
  first notices at its next heartbeat and stops, so only one run writes."""
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLDER, str(tmp_path)],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline() == 'held\n'
    os.remove(tmp_path / files.LOCK_FILE)
    if how == 'taken':  # The second run took the workdir meanwhile.
      second = workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    out, err = holder.communicate(timeout=30)
  finally:
    holder.kill()
  assert holder.returncode == 1 and 'still running' not in out
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {tmp_path / files.LOCK_FILE} was '), err
  assert 'this run stops' in lines[0] and 'Traceback' not in err
  if how == 'taken':
    assert f'pid {os.getpid()}' in lines[0]
    second.release()
