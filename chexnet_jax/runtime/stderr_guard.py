"""Turns the report of a lost peer into one sentence on stderr.

When a process of a multi-process job dies (kill -9, OOM killer, node failure),
JAX's coordination service aborts every survivor from a C++ thread: error lines,
a LOG(FATAL) with its stack, then Python's fault dump of every thread, about 60
lines a process, none of which Python code can catch. So a multi-process run
writes its stderr through this small separate process, which outlives the
trainer: it passes every line through until JAX's first line saying that the
coordination service found a task dead or unreachable; from there it keeps the
rest in WORKDIR/peer_lost.process<I>.log and, once the trainer has ended, prints
one sentence naming the lost process and how to resume.

Every run's stderr also loses XLA's slow-compile banner here (`SlowCompileBanner`):
XLA logs it from C++ at ERROR level, with no setting to turn it off, whenever
a compile takes over two minutes (DenseNet121's train step on a CPU), twice per
compile, asking the user to file a bug; the trainer says before it compiles that
this takes minutes.

Standalone on purpose (no JAX import): started as a script by `start`.
"""

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import sys
from typing import Optional

SENTENCE_START = 'error: lost '
# JAX's C++ lines that only appear once the job is already dead: after them the
# process aborts (the agent's poll, the service's propagation, the fatal itself).
_DEAD_JOB = re.compile(
  r'\] (Polled an error from coordination service|Use error polling to propagate|'
  r'Terminating process because the JAX distributed service|'
  r'Failed to retrieve preemption notice from coordination service)'
)


_started = []  # (guard process, the original fd 2), once started.


class SlowCompileBanner:
  """Recognises the lines of XLA's slow_operation_alarm banner:

    E... slow_operation_alarm.cc:73]           (or :140] The operation took 2m12s)
    ********************************
    [Compiling module jit_step] Very slow compile? If you want to file a bug, ...
    ********************************

  plus the blank line after 'The operation took'. `is_banner(line)` is fed every
  line in order; anything outside a banner is never matched.
  """

  _START = re.compile(r'slow_operation_alarm\.cc:\d+\]')
  _RULE = '*' * 32

  def __init__(self):
    self._inside, self._rules = False, 0

  def is_banner(self, line: str) -> bool:
    text = line.strip()
    if self._START.search(line):
      self._inside, self._rules = True, 0
      return True
    if not self._inside:
      return False
    if text == self._RULE:
      self._rules += 1
      self._inside = self._rules < 2
      return True
    if not text or 'Very slow compile?' in text:
      return True
    self._inside = False  # Something else: the banner was cut short.
    return False


def lost_processes(detail: str, process_id: int) -> Optional[str]:
  """'process 1', 'processes 1, 3' or 'process 0 (the coordinator)' from JAX's
  coordination-service text; None when it does not say."""
  tasks = re.findall(r'[Tt]ask (\d+) heartbeat timeout', detail)
  listed = re.search(r'stopped sending heartbeats\):\s*([\d,\s]+)', detail)
  if listed:
    tasks += re.findall(r'\d+', listed.group(1))
  tasks = sorted(set(tasks), key=int)
  if tasks:
    return f'process{"es" if len(tasks) > 1 else ""} {", ".join(tasks)}'
  if process_id != 0 and re.search(r'Socket closed|Connection refused|failed to connect', detail):
    return 'process 0 (the coordinator)'  # The service itself is unreachable.
  return None


def sentence(lost: Optional[str], process_id: int, num_processes: int, workdir: str) -> str:
  """One sentence: who was lost, that checkpoints are kept, how to resume."""
  return (
    f'{SENTENCE_START}{lost or "a peer process"} of this {num_processes}-process job '
    f'(killed, crashed or its node failed), so process {process_id} stopped too; the '
    f'checkpoints in {workdir} are kept: resubmit the same command to resume from the '
    'newest complete one.'
  )


def start(process_id: int, num_processes: int, workdir: str, lock_file: str) -> None:
  """Routes this process's stderr (fd 2) through the guard from now on; `lock_file`
  (the workdir's lock, by name) is released by the guard if the job dies from C++."""
  guard = subprocess.Popen(
    [
      sys.executable,
      os.path.abspath(__file__),
      str(process_id),
      str(num_processes),
      workdir,
      str(os.getpid()),
      lock_file,  # Passed: the guard runs as a script, without the package.
    ],
    stdin=subprocess.PIPE,
    close_fds=True,
  )
  sys.stderr.flush()
  original = os.dup(2)
  os.dup2(guard.stdin.fileno(), 2)
  guard.stdin.close()  # fd 2 is now the only write end.
  _started.append((guard, original))
  atexit.register(finish)  # Runs before JAX's own exit handler (registered first).


def finish() -> None:
  """Gives fd 2 back and waits for the guard to pass on the last lines, so that
  whoever reads the log once the trainer has exited sees all of it."""
  while _started:
    guard, original = _started.pop()
    sys.stderr.flush()
    os.dup2(original, 2)  # Closes the pipe: the guard reads its end.
    os.close(original)
    try:
      guard.wait(timeout=10)
    except subprocess.TimeoutExpired:
      pass  # A child of the trainer still holds the pipe; the guard ends with it.


def _release_lock(workdir: str, trainer_pid: int, lock_file: str) -> None:
  """The aborted trainer's WORKDIR/run.lock (workdir_lock.py), so that a job
  resubmitted on another node need not wait for it to go stale."""
  path = os.path.join(workdir, lock_file)
  try:
    with open(path) as f:
      holder = json.load(f)
    if holder.get('pid') == trainer_pid and holder.get('host') == socket.gethostname():
      os.remove(path)
  except (OSError, ValueError, AttributeError):
    pass


def _run(process_id: int, num_processes: int, workdir: str, trainer_pid: int, lock_file) -> None:
  # It ends when the trainer does (end of its stderr), never on a signal meant
  # for the trainer: srun's SIGTERM (preemption) or a terminal's Ctrl-C.
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  out = os.fdopen(2, 'wb', buffering=0)  # The trainer's original stderr.
  held, reported, banner = [], False, SlowCompileBanner()
  for line in sys.stdin.buffer:
    if banner.is_banner(line.decode(errors='replace')):
      continue
    # Once the trainer has said the job is lost, or JAX's C++ has, the rest is the dying
    # process's noise (a C++ abort's stack, Python's fault dump): kept in a file.
    if not held and not reported and not _DEAD_JOB.search(line.decode(errors='replace')):
      reported = line.startswith(SENTENCE_START.encode())
      out.write(line)
      continue
    held.append(line)
  if not held:
    return
  _release_lock(workdir, trainer_pid, lock_file)
  text = b''.join(held).decode(errors='replace')
  details = os.path.join(workdir, f'peer_lost.process{process_id}.log')
  try:
    with open(details, 'w') as f:
      f.write(text)
  except OSError:
    details = None
  mine = [line for line in text.splitlines() if line.startswith(SENTENCE_START)]
  if not reported:
    lost = lost_processes(text, process_id)
    line = mine[0] if mine else sentence(lost, process_id, num_processes, workdir)
    out.write((line + '\n').encode())
  if details:
    out.write(f"JAX's own report: {details}\n".encode())


if __name__ == '__main__':
  _run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5])
