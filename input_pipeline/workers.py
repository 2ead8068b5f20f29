"""grain worker processes (config.grain_workers > 0): started, stopped, and
their failures told in one sentence.

Workers hand their batches over in shared memory (/dev/shm). When it is full, a
worker dies of SIGBUS (exit code -7) and grain raises a bare "Worker process was
terminated unexpectedly"; `died_error` names /dev/shm, its size, and what to
change. Ctrl-C in a terminal reaches every process of the group: workers ignore
it, so that the trainer alone handles it (save, exit 130). Every iterator is
closed when its pass or run ends, so that no shared-memory segment outlives it.

Evaluation cannot reuse the training workers: a grain worker pool belongs to
one dataset pipeline (its workers each read a fixed slice of it), so each
evaluation pass starts config.grain_workers workers of its own and stops them
at its end (`OnePass`).
"""

from chexnet_jax import errors

import gc
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time

from absl import logging
import grain
from grain import multiprocessing as grain_multiprocessing

SHM = '/dev/shm'
# For grain's threads to end once their iterator is closed: they end within
# milliseconds on an idle machine, seconds on a loaded one (a join returns at once
# when they are done, so the bound costs nothing).
_SETTLE_SECONDS = 30.0
# How often a worker checks that the trainer still lives (seconds).
_PARENT_POLL_SECONDS = 1.0
_WORKER_DIED = re.compile(r'Worker process was terminated unexpectedly with exit code (-?\d+)')
_CAUSES = {
  -signal.SIGBUS: 'SIGBUS, what a full /dev/shm does',
  -signal.SIGKILL: 'SIGKILL: the out-of-memory killer, or a kill',
  -signal.SIGSEGV: 'SIGSEGV: a crash in the worker',
}


class WorkerError(errors.UserRuntimeError):
  """A grain worker process died."""


def _die_with(parent, poll_seconds):
  """Kills this process once `parent` is gone (re-parented: another parent pid)."""
  while os.getppid() == parent:
    time.sleep(poll_seconds)
  os.kill(os.getpid(), signal.SIGKILL)


def _start_worker(worker_index, worker_count):
  """In each worker: Ctrl-C is the trainer's to handle, and the worker dies with
  the trainer, whatever kills it (kill -9, the OOM killer). A SIGKILLed trainer
  runs no cleanup: without this its workers lived on holding their shared
  memory, and with them multiprocessing's resource tracker and the stderr guard
  (both end when the last process holding their pipe does; the tracker then
  unlinks the shared memory it was told of)."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  # A thread, not prctl(PR_SET_PDEATHSIG): that fires when the parent *thread*
  # that started the worker ends, which need not be when the trainer does.
  threading.Thread(
    target=_die_with,
    args=(os.getppid(), _PARENT_POLL_SECONDS),
    name='die-with-trainer',
    daemon=True,
  ).start()


def prefetch(config, ds):
  """`ds` read by config.grain_workers processes (unchanged when it is 0)."""
  if config.grain_workers <= 0:
    return ds
  options = grain.MultiprocessingOptions(
    num_workers=config.grain_workers, per_worker_buffer_size=max(1, config.prefetch_buffer)
  )
  return ds.mp_prefetch(options, worker_init_fn=_start_worker)


def _shm_words():
  try:
    usage = shutil.disk_usage(SHM)
  except OSError:
    return f'this machine has no {SHM}'
  return f'{SHM} holds {usage.total / 2**20:.0f} MiB ({usage.free / 2**20:.0f} MiB free now)'


def died_error(config, error):
  """WorkerError naming /dev/shm and the fix if `error` is grain's report of
  a dead worker, else None."""
  found = _WORKER_DIED.search(str(error))
  if not found:
    return None
  code = int(found.group(1))
  cause = _CAUSES.get(code, 'it failed; its own error is above')
  return WorkerError(
    f'A grain worker process died (exit code {code}, {cause}); workers pass batches '
    f'through shared memory, and {_shm_words()} for config.grain_workers='
    f'{config.grain_workers} x config.prefetch_buffer={config.prefetch_buffer} batches: '
    'lower either, or give the container more (docker run --shm-size=8g), then run '
    'again to resume.'
  )


def close(iterator, keep=frozenset()):
  """Stops an iterator's workers and frees its shared memory.

  grain's close() leaves its reader threads finishing, holding the last
  batches in reference cycles: at exit, multiprocessing then warned of
  "leaked shared_memory objects". So its threads (those named grain*, but the
  `keep` ones, another pipeline's) are joined and the cycles collected.
  """
  stop = getattr(iterator, 'close', None)
  if stop is None:
    return
  stop()
  deadline = time.monotonic() + _SETTLE_SECONDS
  for thread in threading.enumerate():
    if thread.name.startswith('grain') and thread not in keep:
      thread.join(max(0.0, deadline - time.monotonic()))
  gc.collect()
  _finish_pending_frees(max(0.0, deadline - time.monotonic()))


def _finish_pending_frees(timeout):
  """Waits until grain has freed the shared memory of every batch dropped so far.

  grain frees a batch's segment on a thread pool of its own (one thread, first
  in first out). At exit, multiprocessing drops what that pool has not done
  yet, and the resource tracker then warns of "leaked shared_memory objects":
  what a run that closed its input just before exiting did on a loaded machine.
  A no-op queued behind the frees returns when they are done.
  """
  pool = getattr(grain_multiprocessing.SharedMemoryArray, '_del_thread_pool', None)
  if pool is None:  # No batch went through shared memory (or grain changed).
    return
  try:
    pool.apply_async(int).get(timeout)
  except ValueError:  # The pool no longer runs (the interpreter is exiting): nothing to wait for.
    return
  except multiprocessing.TimeoutError:
    logging.warning('grain had not freed its shared memory within %.0f s; going on.', timeout)


class OnePass:
  """An iterable over `ds` whose every pass closes its iterator at its end
  (or when abandoned), workers and shared memory included."""

  _said = False

  def __init__(self, config, ds):
    self._ds, self._workers = ds, config.grain_workers

  def __iter__(self):
    if self._workers > 0 and not OnePass._said:
      OnePass._said = True
      logging.info(
        'Evaluation starts %d grain workers of its own for each pass (a worker pool '
        'belongs to one dataset: the training workers cannot read another split).',
        self._workers,
      )
    running = frozenset(threading.enumerate())  # The training input's, if any.
    iterator = iter(self._ds)
    try:
      yield from iterator
    finally:
      close(iterator, keep=running)
