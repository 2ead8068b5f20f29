"""One run per workdir: WORKDIR/run.lock, taken before anything else is written.

The lock is a file created with O_CREAT|O_EXCL, which is atomic on local file
systems and on the shared ones clusters use (NFSv3+, Lustre, GPFS, BeeGFS): of
two runs, exactly one creates it. It names its holder (host, pid, Slurm job id)
and its holder refreshes its modification time every `HEARTBEAT_SECONDS` from
a daemon thread, so a lock is known stale when:

- its holder ran on this host and its pid no longer exists (kill -9, OOM), or
  now belongs to another process (the pid was reused: its start time, from
  /proc, differs from the one the lock recorded), or
- it was taken by an earlier incarnation of this very Slurm job (a requeued
  job keeps its id, and Slurm never runs a job twice at once), or
- it has not been refreshed for `stale_seconds` (the holder's node died; relies
  on the clocks of the nodes agreeing to within a minute or so, as NTP keeps them).

A stale lock is taken over with one log line: renamed aside first (a rename
succeeds for one taker only), then created anew. A live one stops the second
run with one sentence naming the holder. A holder whose lock is deleted or
replaced (`rm run.lock`, then a second run) stops at its next heartbeat, in one
sentence, so that two runs never write one workdir for long. Multi-process jobs: process 0 takes
the lock, and every process learns whether it did.
"""

import functools
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging

from chexnet_jax import errors
from chexnet_jax.runtime import files

HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0  # 20 missed heartbeats.
LOCK_LOST_EXIT_CODE = 1


class WorkdirBusyError(errors.UserRuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  """Held from `acquire` to `release`; refreshed in the background meanwhile."""

  def __init__(
    self, workdir, stale_seconds=STALE_SECONDS, heartbeat_seconds=HEARTBEAT_SECONDS, env=os.environ
  ):
    self.path = os.path.join(workdir, files.LOCK_FILE)
    self._stale_seconds, self._heartbeat_seconds = stale_seconds, heartbeat_seconds
    self._token = uuid.uuid4().hex
    self._holder = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'pid_start': _start_ticks(os.getpid()),
      'slurm_job_id': env.get('SLURM_JOB_ID', ''),
      'started': time.time(),
      'token': self._token,
    }
    self._stop = threading.Event()
    self._beating = threading.Lock()
    self._thread = None
    self._on_lost = functools.partial(_stop_the_run, self.path)

  def acquire(self):
    """Takes the lock, taking over a stale one; WorkdirBusyError if held."""
    for _ in range(3):  # Lost a race for a stale lock: look again.
      if self._create():
        self._start_heartbeat()
        return self
      holder, age = self._read()
      if holder is None and age is None:
        continue  # Released meanwhile.
      reason = self._stale_reason(holder, age)
      if reason is None:
        raise WorkdirBusyError(_busy_sentence(self.path, holder, age))
      if self._set_aside():
        logging.warning('Taking over %s from %s: %s.', self.path, describe(holder), reason)
    raise WorkdirBusyError(_busy_sentence(self.path, *self._read()))

  def release(self):
    """Removes the lock if it is still ours; never raises."""
    with self._beating:
      self._stop.set()
      try:
        holder, _ = self._read()
        if holder and holder.get('token') == self._token:
          os.remove(self.path)
      except OSError:
        pass  # The workdir vanished or went read-only: the real error is elsewhere.

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  def _create(self):
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    try:
      with os.fdopen(fd, 'w') as f:
        json.dump(self._holder, f)
        f.flush()
        os.fsync(f.fileno())
    except OSError:
      os.remove(self.path)  # A full disk: leave no empty lock behind.
      raise
    return True

  def _read(self):
    """(holder dict or {} if unreadable, seconds since refreshed), or (None, None)."""
    try:
      age = time.time() - os.stat(self.path).st_mtime
      with open(self.path) as f:
        text = f.read()
    except FileNotFoundError:
      return None, None
    try:
      holder = json.loads(text)
    except ValueError:
      holder = {}  # Torn by a crash while it was being written.
    return (holder if isinstance(holder, dict) else {}), age

  def _stale_reason(self, holder, age):
    me = self._holder
    if holder.get('host') == me['host'] and holder.get('pid'):
      if not _pid_alive(holder['pid']):
        return f'process {holder["pid"]} no longer runs'
      if _pid_reused(holder):
        return f'process {holder["pid"]} no longer runs (its pid now belongs to another process)'
    if holder.get('slurm_job_id') and holder['slurm_job_id'] == me['slurm_job_id']:
      return f'an earlier run of this Slurm job ({holder["slurm_job_id"]}), now requeued'
    if age > self._stale_seconds:
      return f'not refreshed for {age:.0f} s (its node or process died)'
    if not holder and age > 2 * self._heartbeat_seconds:
      return 'an unreadable lock, not refreshed'
    return None

  def _set_aside(self):
    try:
      os.replace(self.path, f'{self.path}.stale-{uuid.uuid4().hex[:8]}')
    except FileNotFoundError:
      return False  # Another taker was faster.
    for old in _stale_copies(self.path)[:-3]:  # Keep a few for inspection.
      try:
        os.remove(old)
      except OSError:
        pass
    return True

  def _start_heartbeat(self):
    self._thread = threading.Thread(target=self._beat, daemon=True, name='workdir-lock-heartbeat')
    self._thread.start()

  def _beat(self):
    while not self._stop.wait(self._heartbeat_seconds):
      with self._beating:  # release() cannot remove the lock mid-check.
        if self._stop.is_set():
          return
        if lost := self._lost():
          self._on_lost(lost)
          return
        try:
          os.utime(self.path)
        except OSError:
          pass  # Storage trouble shows at the next save, in one sentence.

  def _lost(self):
    """Why the lock is no longer this run's (deleted, or another run's now), or None."""
    try:
      holder, _ = self._read()
    except OSError:
      return None  # Unreadable now (storage trouble): not proof of a loss.
    if holder is None:
      return 'deleted'
    if holder.get('token') != self._token:
      return f'replaced by another run ({describe(holder)})'
    return None


def _stop_the_run(path, how):
  """The holder's lock is gone: another run may be writing the workdir now, so
  this one stops at once (from the heartbeat thread, the main one being busy),
  like a kill: its checkpoints are complete or set aside at the next start."""
  sys.stderr.write(
    f'error: {path} was {how} while this run held it; this run stops so that two '
    f'runs never write {os.path.dirname(path)} at once (its checkpoints are kept): '
    'if no other run uses it, run the same command again to resume.\n'
  )
  sys.stderr.flush()
  os._exit(LOCK_LOST_EXIT_CODE)


def _stale_copies(path):
  directory, name = os.path.split(path)
  return sorted(
    os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(name + '.stale-')
  )


def _pid_alive(pid):
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, OverflowError):
    return True  # Someone else's live process (or a pid we cannot judge).
  return True


def _start_ticks(pid):
  """When process `pid` started (clock ticks since boot, /proc/PID/stat field
  22), or None where there is no /proc."""
  try:
    with open(f'/proc/{int(pid)}/stat') as f:
      stat = f.read()
  except (OSError, ValueError, OverflowError):
    return None
  return int(stat.rsplit(')', 1)[1].split()[19])  # Fields after "(comm)" start at 3.


def _pid_reused(holder):
  """True if the lock's pid runs, but is not the process that took the lock."""
  recorded = holder.get('pid_start')
  if recorded is None:  # A lock from before pid_start was recorded, or no /proc.
    return False
  now = _start_ticks(holder['pid'])
  return now is not None and now != recorded


def describe(holder):
  if not holder:
    return 'an unknown holder (unreadable lock)'
  words = f'pid {holder.get("pid")} on {holder.get("host")}'
  if holder.get('slurm_job_id'):
    words += f' (Slurm job {holder["slurm_job_id"]})'
  return words


def _busy_sentence(path, holder, age):
  since = ''
  if holder and holder.get('started'):
    since = time.strftime(', running since %Y-%m-%d %H:%M:%S', time.localtime(holder['started']))
  refreshed = f', lock refreshed {age:.0f} s ago' if age is not None else ''
  return (
    f'{os.path.dirname(path)} is in use by another run ({describe(holder)}'
    f'{since}{refreshed}); wait for it to end, stop it, or choose another '
    f'--workdir (the lock of a run that died is taken over at once on its host or '
    f'Slurm job, elsewhere after {STALE_SECONDS / 60:.0f} minutes).'
  )
