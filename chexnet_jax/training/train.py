"""The training loop: train, evaluate every `eval_every_epochs`, checkpoint, resume.

The top of the module graph: main.py calls `train_and_evaluate`; the pieces it
puts together live in leaf modules (sharding, train_state, train_step,
inference, checkpoints, run_dir), which nothing here is imported back into.
"""

import contextlib
import functools
import math
import os
import signal
import statistics
import sys
import threading
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from chexnet_jax.training import phases
from chexnet_jax import errors
from chexnet_jax.run import checkpoint_files
from chexnet_jax.run import checkpoints
from chexnet_jax.training import config_checks
from chexnet_jax.runtime import distributed
from chexnet_jax.evaluation import inference
from chexnet_jax.model import losses
from chexnet_jax.runtime import metric_logging
from chexnet_jax.model import densenet
from chexnet_jax.runtime import progress
from chexnet_jax.run import run_dir
from chexnet_jax.run import run_reader
from chexnet_jax.runtime import sharding
from chexnet_jax.training import train_state
from chexnet_jax.training import train_step
from chexnet_jax.run import workdir_lock
from input_pipeline import pipeline
from input_pipeline import sources
from input_pipeline import workers

# 128 + SIGTERM: the conventional code of a process ended by SIGTERM, which
# the sbatch scripts read as "checkpoint saved, requeue me".
PREEMPTED_EXIT_CODE = 143
# 128 + SIGINT: Ctrl-C, after the same save (not requeued by slurm/).
INTERRUPTED_EXIT_CODE = 130


class NonFiniteLossError(errors.UserRuntimeError):
  """The training loss became NaN or infinite."""


# --------------------------------------------------------------------- loop --


def total_train_steps(config, steps_per_epoch):
  """Durations are written once: `num_train_steps` if > 0, else epochs."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def eval_interval_steps(config, steps_per_epoch):
  return max(1, int(round(config.eval_every_epochs * steps_per_epoch)))


class Preemption:
  """Tells every process, at the same step, that the job is being preempted
  (SIGTERM) or interrupted (SIGINT, Ctrl-C): both save and exit.

  Several processes: JAX's preemption service (it catches SIGTERM and agrees
  on a step across processes); a Ctrl-C is passed on to it as SIGTERM. One
  process: our own handlers. A second Ctrl-C exits at once, without saving.
  """

  def __init__(self):
    self._signalled, self.exit_code = False, PREEMPTED_EXIT_CODE
    self.compiling_from = None  # The start step while the first step compiles.
    self._wakeup = None
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._on_sigterm)
      self._watch_while_compiling()
    self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

  def _watch_while_compiling(self):
    """A thread that sees each signal as it arrives (the wakeup fd, written by the
    C-level handler): Python's handlers run only once the main thread is back in
    Python, minutes later when it is compiling. One process only: a job's
    processes agree on a step to stop at, through JAX's preemption service."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    self._wakeup = (signal.set_wakeup_fd(write_end, warn_on_full_buffer=False), write_end)

    def watch():
      with os.fdopen(read_end, 'rb', buffering=0) as signals:
        while received := signals.read(16):
          if self.compiling_from is not None and {*received} & {signal.SIGINT, signal.SIGTERM}:
            self._exit_while_compiling(signal.SIGINT in received)

    threading.Thread(target=watch, name='signals-while-compiling', daemon=True).start()

  def _exit_while_compiling(self, interrupted):
    """Nothing was trained since the run's start: no save to wait for."""
    code = INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE
    start = self.compiling_from
    since = f'checkpoint step {start}, kept' if start else 'the start'
    sys.stderr.write(
      f'{"Interrupted (Ctrl-C)" if interrupted else "Stopped (SIGTERM)"} while the first '
      f'step compiles: nothing was trained since {since}, so there is nothing to save; '
      f'exiting at once with code {code}. Run the same command to start again.\n'
    )
    sys.stderr.flush()
    os._exit(code)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._signalled = True

  def _on_sigint(self, signum, frame):
    del signum, frame
    if self.exit_code == INTERRUPTED_EXIT_CODE:  # The second Ctrl-C.
      sys.stderr.write(
        'error: interrupted again (Ctrl-C): exiting at once, without saving; '
        'a rerun resumes from the last complete checkpoint.\n'
      )
      sys.stderr.flush()
      os._exit(INTERRUPTED_EXIT_CODE)  # Saves and evaluations are not waited for.
    self.exit_code = INTERRUPTED_EXIT_CODE
    sys.stderr.write(
      'Interrupted (Ctrl-C): saving at the end of this step, then exiting; '
      'Ctrl-C again to exit at once without saving.\n'
    )
    sys.stderr.flush()
    if jax.process_count() > 1:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's service agrees on the step.
    else:
      self._signalled = True

  def restore(self):
    """Gives Ctrl-C back to Python once the loop is over."""
    signal.signal(signal.SIGINT, self._previous_sigint)
    if self._wakeup is not None:
      previous, write_end = self._wakeup
      signal.set_wakeup_fd(previous)
      os.close(write_end)  # The watching thread ends.
      self._wakeup = None

  def reached(self, step):
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled


class StepTimer:
  """Throughput and input-wait over each logging interval."""

  def __init__(self, global_batch):
    self._global_batch = global_batch
    self.reset()

  def reset(self):
    self._start, self._steps, self._data_wait = time.perf_counter(), 0, 0.0

  def add(self, data_wait_seconds):
    self._steps += 1
    self._data_wait += data_wait_seconds

  def summary(self):
    """The interval's averages; {} for one that timed no step (the compile's)."""
    if not self._steps:
      return {}
    elapsed, steps = time.perf_counter() - self._start, self._steps
    return {
      'images_per_second': self._global_batch * steps / elapsed,
      'step_time_ms': 1e3 * elapsed / steps,
      'data_wait_ms': 1e3 * self._data_wait / steps,
    }


class StepWatchdog:
  """Ends the process when a training step takes far longer than the recent
  ones: a collective waiting on a hung peer blocks forever otherwise, keeping
  the whole Slurm job RUNNING until its time limit.

  A daemon thread; `beat(step)` after each step, `paused()` around evaluation,
  saves and the first (compiling) step. It fires when the current step has run
  longer than max(factor x median of the last `window` steps, min_seconds):
  one sentence on stderr, then exit code STEP_TIMEOUT_EXIT_CODE.
  """

  STEP_TIMEOUT_EXIT_CODE = 124

  def __init__(self, factor, min_seconds, window=50, poll_seconds=1.0):
    self._factor, self._min_seconds = factor, min_seconds
    self._window, self._poll = window, poll_seconds
    self._durations, self._lock = [], threading.Lock()
    self._last, self._step, self._armed = None, 0, False
    self._stop = threading.Event()
    if min_seconds > 0:
      threading.Thread(target=self._watch, daemon=True, name='step-watchdog').start()

  def beat(self, step):
    now = time.monotonic()
    with self._lock:
      if self._armed and self._last is not None:
        self._durations = (self._durations + [now - self._last])[-self._window :]
      self._last, self._step, self._armed = now, step, True

  @contextlib.contextmanager
  def paused(self):
    with self._lock:
      self._armed = False
    try:
      yield
    finally:
      with self._lock:
        self._last, self._armed = time.monotonic(), True

  def limit(self):
    """Seconds a step may take now."""
    median = statistics.median(self._durations) if self._durations else 0.0
    return max(self._factor * median, self._min_seconds)

  def stop(self):
    self._stop.set()

  def _watch(self):
    while not self._stop.wait(self._poll):
      with self._lock:
        if not self._armed or self._last is None:
          continue
        waited, limit = time.monotonic() - self._last, self.limit()
        median = statistics.median(self._durations) if self._durations else 0.0
        step = self._step + 1
      if waited > limit:
        sys.stderr.write(
          f'error: training step {step} has taken {waited:.0f} s, more than '
          f'{self._factor:g} x the median step ({median:.2f} s) and at least '
          f'config.step_timeout_min_seconds={self._min_seconds:g}: a process '
          'of the job hangs (a stopped or stuck peer, a hung collective); '
          f'process {jax.process_index()} exits so that the job ends, and a '
          'rerun resumes from the last checkpoint.\n'
        )
        sys.stderr.flush()
        os._exit(self.STEP_TIMEOUT_EXIT_CODE)  # The main thread is blocked.


def check_finite(step, loss, manager, dtype='float32'):
  """Stops the run on a NaN/inf loss, keeping the last good checkpoint; the
  sentence offers only the fixes that apply (float32 to a run in another dtype,
  resuming to a run with a checkpoint)."""
  loss = float(loss)
  if math.isfinite(loss):
    return
  checkpoints.wait_until_finished(manager)  # Checksummed too.
  fixes = 'Lower config.learning_rate' + (', or use float32' if dtype != 'float32' else '')
  last = manager.latest_step()
  kept = (
    f'The last good checkpoint is step {last} in {manager.directory}. {fixes}, and run '
    'again to resume.'
    if last is not None
    else f'No checkpoint was saved yet. {fixes}, and run again: it starts afresh.'
  )
  raise NonFiniteLossError(f'Training loss is {loss} at step {step}; the run stopped. {kept}')


def train_and_evaluate(config, workdir):
  """Trains, evaluates every `eval_every_epochs`, checkpoints, resumes.

  Everything the config alone can be checked for is checked before the workdir
  is touched; the workdir's lock is then taken before anything is written in it.
  """
  config = run_dir.with_absolute_paths(config)  # The run works from anywhere.
  config_checks.validate(config)
  config_checks.warn_if_small_crop(config)
  phases.dataset_phase(config)
  dataset_info = sources.get_dataset_info(config)
  # The label set is the dataset's: the head, run.json and every output follow it.
  label_names = sources.get_label_names(config)
  config = run_dir.with_label_count(config, label_names)
  config_checks.check_splits(config, dataset_info)
  lock = _lock_workdir(workdir)
  try:
    run_dir.prepare_workdir(workdir)
    changes = run_dir.config_changes(workdir, config)  # Refused ones: one sentence.
    run_dir.check_or_write_identity(
      workdir,
      run_dir.run_identity(config, label_names, dataset_info),
      allowed=run_dir.allowed_changes(config),
    )
    run_dir.record_start(workdir, config, sources.split_file(config))
    trainer = _Trainer(config, label_names, workdir, dataset_info)
    run_dir.record_changes(workdir, changes, trainer.start_step)
    if trainer.start_step >= trainer.total_steps:
      _log_nothing_to_train(config, trainer, workdir)
      _close_quietly(trainer, metric_logging.NullWriter())
      return trainer.state
    writer = (
      metric_logging.MetricWriter(workdir, trainer.start_step)
      if jax.process_index() == 0
      else metric_logging.NullWriter()
    )
    try:
      result = trainer.loop(writer)
      checkpoints.wait_until_finished(trainer.manager)  # A failed write: one sentence.
    finally:
      _close_quietly(trainer, writer)  # Cannot replace the real error.
    if trainer.exit_code is not None:  # Preempted or interrupted, and saved.
      raise SystemExit(trainer.exit_code)  # Once the loop's frames (and batches) are gone.
    _log_next_step(config, workdir)
    return result
  finally:
    if lock is not None:
      lock.release()


def _log_next_step(config, workdir):
  """The run's last line: its best step, and the command that evaluates it."""
  if jax.process_index() != 0:
    return
  best = run_reader.best_step(checkpoint_files.checkpoint_dir(workdir), config.best_metric)
  chosen = (
    f'best step {best} (by {config.best_metric})'
    if best is not None
    else 'no step validated yet (evaluate reads --checkpoint latest)'
  )
  logging.info(
    'Training done: %s; next: python -m chexnet_jax.evaluate --workdir %s%s',
    chosen,
    workdir,
    '' if best is not None else ' --checkpoint latest',
  )


def _lock_workdir(workdir):
  """Process 0 takes WORKDIR/run.lock (workdir_lock.py); every process learns
  whether it did, so a refused job stops everywhere in one sentence."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      run_dir.make_workdir(workdir)
      lock = workdir_lock.WorkdirLock(workdir).acquire()
      distributed.at_peer_loss(lock.release)  # A resubmitted job need not wait.
    except OSError as e:
      error = run_dir.unwritable_error(workdir, workdir, e)
    except (run_dir.WorkdirError, workdir_lock.WorkdirBusyError) as e:
      error = e
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if int(failed) and error is None:
      if lock is not None:
        lock.release()
      raise workdir_lock.WorkdirBusyError(
        f'process 0 could not take the lock of {workdir} (its error line says why).'
      )
  if error is not None:
    raise error
  return lock


def _close_quietly(trainer, writer):
  """Cleanup that cannot replace the error that ended the run: a failure to
  close is logged in one line. The input's grain workers stop here, with their
  shared memory."""
  closers = (functools.partial(workers.close, trainer.data), trainer.manager.close, writer.close)
  for close in closers:
    try:
      close()
    except Exception as error:  # pylint: disable=broad-except
      logging.warning(
        'While closing (%s): %s: %s',
        getattr(close, '__qualname__', close),
        type(error).__name__,
        str(error).splitlines()[0][:200],
      )


class _Trainer:
  """One training run: the state the loop reads and updates, and its tools."""

  def __init__(self, config, label_names, workdir, dataset_info):
    self.config, self.label_names = config, label_names
    self.mesh = sharding.make_mesh()
    distributed.log_topology(self.mesh)
    self.steps_per_epoch = pipeline.train_steps_per_epoch(
      config, dataset_info['splits']['train'], jax.process_count()
    )
    self.total_steps = total_train_steps(config, self.steps_per_epoch)
    tx, schedule = train_state.create_optimizer(config, self.steps_per_epoch, self.total_steps)
    self.validation_size = dataset_info['splits']['validation']
    self.validated = False  # The first validation pass compiles.
    model = train_state.build_model(config, for_training=True)
    self.eval_model = train_state.build_model(config)
    self.logits_fn = inference.make_logits_fn(self.eval_model, densenet.DTYPES[config.dtype])
    self.loss_weights = losses.label_weights(
      config.pos_weight, dataset_info['train_positive_fraction']
    )
    self.train_step = train_step.StepWithFallback(
      config,
      lambda config: train_step.make_train_step(
        config, model, self.mesh, tx, schedule, self.loss_weights
      ),
    )
    self.manager = checkpoints.create_manager(workdir, config.keep_checkpoints, config.best_metric)
    self.start_step = self._resume(workdir, model, tx)
    self.exit_code = None  # Set when the loop stopped for a signal, after saving.
    self.data = pipeline.create_train_iterator(
      config,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      start_step=self.start_step,
    )

  def _resume(self, workdir, model, tx):
    """Restores the newest intact checkpoint; returns the global step to go on from.

    The restore needs only the state's shapes, so the initial state (and its
    config.init_from, e.g. an ImageNet download) is made only for a new run: a
    resumed or finished run neither downloads nor compiles an initialiser.
    """
    template = train_state.abstract_train_state(self.config, model, self.mesh, tx)
    restored, step, data = checkpoints.restore_latest(self.manager, template)
    if restored is None:
      logging.info('Starting a new run in %s.', workdir)
      phases.state_phase(self.config)  # The silent minute after 'Topology'.
      self.state = train_state.create_train_state(
        self.config, model, self.mesh, tx, self.label_names
      )
      return 0
    self.state = restored
    if step >= self.total_steps:  # Nothing to train: train() says so.
      return step
    logging.info('Resuming from checkpoint step %d in %s.', step, workdir)
    _log_topology_change(self.config, step, data)
    return step

  def data_position(self, step):
    """What fixes the input stream at `step`, whatever the topology (see save)."""
    return {
      'global_step': step,
      'batch_size': self.config.batch_size,
      'seed': self.config.seed,
      'process_count': jax.process_count(),
      'device_count': jax.device_count(),
    }

  def loop(self, writer):
    config, step = self.config, int(jax.device_get(self.state.step))
    eval_every = eval_interval_steps(config, self.steps_per_epoch)
    reading_train = functools.partial(sources.reading, config, 'train')
    timer, preemption = StepTimer(config.batch_size), Preemption()
    self.clock = progress.RunClock(self.total_steps)
    watchdog = StepWatchdog(config.step_timeout_factor, config.step_timeout_min_seconds)
    previous = None  # (step, loss) checked one step late: keeps dispatch async.
    try:
      while step < self.total_steps:
        wait_start = time.perf_counter()
        with reading_train():
          batch = next(self.data)
        timer.add(time.perf_counter() - wait_start)
        if previous is None:
          phases.compile_phase(config, step)
          preemption.compiling_from = step  # A stop now exits at once: nothing to save.
          with watchdog.paused():  # Compiling: minutes, not a hang.
            self.state, metrics = self.train_step(self.state, sharding.to_global(batch, self.mesh))
            jax.block_until_ready(metrics['train_loss'])
          preemption.compiling_from = None
          timer.reset()  # The compile is not a step time.
          self.clock.first_step_done(step + 1)
        else:
          # A capture that fails in a guarded call recompiles: minutes, not a hang.
          guarded = watchdog.paused() if self.train_step.guarded else contextlib.nullcontext()
          with guarded:
            self.state, metrics = self.train_step(self.state, sharding.to_global(batch, self.mesh))
        step += 1
        if previous:
          check_finite(*previous, self.manager, config.dtype)
        watchdog.beat(step)
        previous = (step, metrics['train_loss'])
        if step % config.log_every_steps == 0 or step == self.total_steps:
          self._log(writer, step, metrics, timer)
        if step % eval_every == 0 or step == self.total_steps:
          check_finite(*previous, self.manager, config.dtype)
          with watchdog.paused():
            self._evaluate_and_save(writer, step)
          timer.reset()  # Throughput is of training steps only.
        elif step % config.checkpoint_every_steps == 0:
          check_finite(*previous, self.manager, config.dtype)
          with watchdog.paused():
            checkpoints.save(self.manager, self.state, self.data_position(step))
        if preemption.reached(step):
          self._save_for_preemption(step, previous, preemption.exit_code)
          break
    finally:
      watchdog.stop()
      preemption.restore()
    return self.state

  def _log(self, writer, step, metrics, timer):
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    scalars.update(timer.summary())
    scalars['epoch'] = step / self.steps_per_epoch
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      line = metric_logging.progress_line(step, self.total_steps, scalars)
      logging.info('%s%s', line, self.clock.suffix(step))
    timer.reset()

  def _evaluate_and_save(self, writer, step):
    eval_batch = pipeline.global_eval_batch(self.config, jax.device_count())
    phases.validation_phase(step, self.validation_size, eval_batch, not self.validated)
    self.validated = True
    result, *_ = inference.evaluate_split(
      self.config,
      self.label_names,
      self.eval_model,
      self.state.variables,
      self.mesh,
      'validation',
      self.logits_fn,
      self.loss_weights,
    )
    self.state = train_state.update_plateau(self.config, self.state, result['loss'])
    scalars = {'val_loss': result['loss'], 'val_mean_auroc': result['mean_auroc']}
    scalars.update({f'val_auroc/{k}': v for k, v in result['auroc'].items()})
    writer.write_scalars(step, scalars)
    logging.info(
      'step %d: validation loss %.4f, mean AUROC %.4f', step, result['loss'], result['mean_auroc']
    )
    checkpoints.save(
      self.manager,
      self.state,
      self.data_position(step),
      metrics={'val_mean_auroc': result['mean_auroc'], 'val_loss': result['loss']},
    )

  def _save_for_preemption(self, step, previous, exit_code):
    check_finite(*previous, self.manager, self.config.dtype)
    if step not in self.manager.all_steps():
      checkpoints.save(self.manager, self.state, self.data_position(step))
    checkpoints.wait_until_finished(self.manager)
    if exit_code == INTERRUPTED_EXIT_CODE:
      logging.warning(
        'Interrupted: saved step %d; exiting with code %d. Run the same command to resume.',
        step,
        exit_code,
      )
    else:
      logging.warning(
        'Preempted: saved step %d; exiting with code %d so the job can be requeued.',
        step,
        exit_code,
      )
    self.exit_code = exit_code


def _log_topology_change(config, step, data):
  """One line when a run resumes on another topology or input setting."""
  if jax.process_index() != 0:
    return
  if data is None:
    logging.warning(
      'Checkpoint step %d holds an older per-process iterator '
      'state; the input stream goes on from global step %d.',
      step,
      step,
    )
    return
  if (data.get('batch_size'), data.get('seed')) != (config.batch_size, config.seed):
    logging.warning(
      'Checkpoint step %d was trained with batch_size %s, seed %s; this run has '
      '%d, %d: the input order from here is that of the new setting, so within '
      'the current epoch some examples may repeat or be skipped.',
      step,
      data.get('batch_size'),
      data.get('seed'),
      config.batch_size,
      config.seed,
    )
  saved = (data.get('process_count'), data.get('device_count'))
  now = (jax.process_count(), jax.device_count())
  if saved == now:
    return
  same = (
    'the same device count: it continues exactly as it would have'
    if saved[1] == now[1]
    else 'another device count: the same examples in the same order, but each '
    "device's share (and its BatchNorm statistics) changes, so the numbers "
    'differ slightly from an uninterrupted run'
  )
  logging.info(
    'Checkpoint step %d was saved on %s devices in total (%s); resuming on %d devices in '
    'total (%s), %s.',
    step,
    saved[1],
    _processes(saved[0]),
    now[1],
    _processes(now[0]),
    same,
  )


def _processes(count):
  return f'{count} process' if count == 1 else f'{count} processes'


def _log_nothing_to_train(config, trainer, workdir):
  """A rerun of a finished run, or one whose end moved below its step: say so."""
  if jax.process_index() != 0:
    return
  end = (
    f'config.num_train_steps={config.num_train_steps}'
    if config.num_train_steps > 0
    else f'config.num_epochs={config.num_epochs:g} x {trainer.steps_per_epoch} steps'
  )
  if trainer.start_step == trainer.total_steps:
    logging.info(
      'The run in %s is already complete at step %d (%s); nothing to train. To train '
      'longer, raise config.num_epochs (or config.num_train_steps).',
      workdir,
      trainer.start_step,
      end,
    )
  else:
    logging.warning(
      'Checkpoint step %d is already past the end of this run, step %d (%s); nothing '
      'to train. Raise config.num_epochs (or num_train_steps) to train further.',
      trainer.start_step,
      trainer.total_steps,
      end,
    )
