"""The training loop: train, evaluate every `eval_every_epochs`, checkpoint, resume.

The top of the module graph: main.py calls `train_and_evaluate`; the pieces it
puts together live in leaf modules (sharding, train_state, train_step,
inference, checkpoints, run_dir), which nothing here is imported back into.
"""
import functools
import math
import signal
import time

from absl import logging
import jax
from jax.experimental import multihost_utils

from chexnet_jax import checkpoints
from chexnet_jax import config_checks
from chexnet_jax import distributed
from chexnet_jax import inference
from chexnet_jax import losses
from chexnet_jax import metric_logging
from chexnet_jax import models
from chexnet_jax import run_dir
from chexnet_jax import sharding
from chexnet_jax import train_state
from chexnet_jax import train_step
from input_pipeline import pipeline

# 128 + SIGTERM: the conventional code of a process ended by SIGTERM, which
# the sbatch scripts read as "checkpoint saved, requeue me".
PREEMPTED_EXIT_CODE = 143


class NonFiniteLossError(RuntimeError):
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
  """Tells every process, at the same step, that the job is being preempted.

  Several processes: JAX's preemption service (it catches SIGTERM and agrees
  on a step across processes). One process: our own SIGTERM handler.
  """

  def __init__(self):
    self._signalled = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del signum, frame
    self._signalled = True

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
    elapsed = time.perf_counter() - self._start
    steps = max(self._steps, 1)
    return {'images_per_second': self._global_batch * steps / elapsed,
            'step_time_ms': 1e3 * elapsed / steps,
            'data_wait_ms': 1e3 * self._data_wait / steps}


def check_finite(step, loss, manager):
  """Stops the run on a NaN/inf loss, keeping the last good checkpoint."""
  loss = float(loss)
  if math.isfinite(loss):
    return
  manager.wait_until_finished()
  raise NonFiniteLossError(
      f'Training loss is {loss} at step {step}; the run stopped. The last '
      f'good checkpoint is step {manager.latest_step()} in {manager.directory}.'
      ' Lower config.learning_rate, or use float32, and run again to resume.')


def train_and_evaluate(config, workdir):
  """Trains, evaluates every `eval_every_epochs`, checkpoints, resumes."""
  config = run_dir.with_absolute_paths(config)  # The run works from anywhere.
  config_checks.validate(config)
  dataset_info = pipeline.get_dataset_info(config)
  # The label set is the dataset's: the head, run.json and every output follow it.
  config = run_dir.with_label_set(config, pipeline.get_label_names(config))
  run_dir.prepare_workdir(workdir)
  run_dir.check_or_write_identity(
      workdir, run_dir.run_identity(config, dataset_info))
  run_dir.record_start(workdir, config, pipeline.split_file(config))
  trainer = _Trainer(config, workdir, dataset_info)
  writer = (metric_logging.MetricWriter(workdir) if jax.process_index() == 0
            else metric_logging.NullWriter())
  try:
    return trainer.loop(writer)
  finally:
    checkpoints.wait_until_finished(trainer.manager)  # A failed write: one sentence.
    trainer.manager.close()
    writer.close()


class _Trainer:
  """One training run: the state the loop reads and updates, and its tools."""

  def __init__(self, config, workdir, dataset_info):
    self.config = config
    self.mesh = sharding.make_mesh()
    distributed.log_topology(self.mesh)
    self.steps_per_epoch = pipeline.train_steps_per_epoch(
        config, dataset_info['splits']['train'], jax.process_count())
    self.total_steps = total_train_steps(config, self.steps_per_epoch)
    tx, schedule = train_state.create_optimizer(
        config, self.steps_per_epoch, self.total_steps)
    model = train_state.build_model(config, for_training=True)
    self.eval_model = train_state.build_model(config)
    self.logits_fn = inference.make_logits_fn(
        self.eval_model, models.DTYPES[config.dtype])
    self.state = train_state.create_train_state(config, model, self.mesh, tx)
    self.loss_weights = losses.label_weights(
        config.pos_weight, dataset_info['train_positive_fraction'])
    self.train_step = train_step.make_train_step(
        config, model, self.mesh, tx, schedule, self.loss_weights)
    self.data = pipeline.create_train_iterator(
        config, process_index=jax.process_index(),
        process_count=jax.process_count())
    self.manager = checkpoints.create_manager(workdir, config.keep_checkpoints,
                                              config.best_metric)
    self._resume(workdir)

  def _resume(self, workdir):
    restored, step = checkpoints.restore_latest(
        self.manager, self.state, self.data)
    if restored is None:
      logging.info('Starting a new run in %s.', workdir)
      return
    self.state = restored
    logging.info('Resuming from checkpoint step %d in %s.', step, workdir)

  def loop(self, writer):
    config, step = self.config, int(jax.device_get(self.state.step))
    eval_every = eval_interval_steps(config, self.steps_per_epoch)
    reading_train = functools.partial(pipeline.reading, config, 'train')
    timer, preemption = StepTimer(config.batch_size), Preemption()
    previous = None  # (step, loss) checked one step late: keeps dispatch async.
    while step < self.total_steps:
      wait_start = time.perf_counter()
      with reading_train():
        batch = next(self.data)
      timer.add(time.perf_counter() - wait_start)
      if previous is None:
        _log_compiling(step)
      self.state, metrics = self.train_step(
          self.state, sharding.to_global(batch, self.mesh))
      step += 1
      if previous:
        check_finite(*previous, self.manager)
      previous = (step, metrics['train_loss'])
      if step % config.log_every_steps == 0 or step == self.total_steps:
        self._log(writer, step, metrics, timer)
      if step % eval_every == 0 or step == self.total_steps:
        check_finite(*previous, self.manager)
        self._evaluate_and_save(writer, step)
        timer.reset()  # Throughput is of training steps only.
      elif step % config.checkpoint_every_steps == 0:
        check_finite(*previous, self.manager)
        checkpoints.save(self.manager, self.state, self.data)
      if preemption.reached(step):
        return self._save_for_preemption(step, previous)
    return self.state

  def _log(self, writer, step, metrics, timer):
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    scalars.update(timer.summary())
    scalars['epoch'] = step / self.steps_per_epoch
    writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      logging.info('%s', metric_logging.progress_line(
          step, self.total_steps, scalars))
    timer.reset()

  def _evaluate_and_save(self, writer, step):
    result, *_ = inference.evaluate_split(
        self.config, self.eval_model, self.state.variables, self.mesh,
        'validation', self.logits_fn, self.loss_weights)
    self.state = train_state.update_plateau(self.config, self.state,
                                            result['loss'])
    scalars = {'val_loss': result['loss'], 'val_mean_auroc': result['mean_auroc']}
    scalars.update({f'val_auroc/{k}': v for k, v in result['auroc'].items()})
    writer.write_scalars(step, scalars)
    logging.info('step %d: validation loss %.4f, mean AUROC %.4f', step,
                 result['loss'], result['mean_auroc'])
    checkpoints.save(self.manager, self.state, self.data,
                          metrics={'val_mean_auroc': result['mean_auroc'],
                                   'val_loss': result['loss']})

  def _save_for_preemption(self, step, previous):
    check_finite(*previous, self.manager)
    if step not in self.manager.all_steps():
      checkpoints.save(self.manager, self.state, self.data)
    checkpoints.wait_until_finished(self.manager)
    logging.warning('Preempted: saved step %d; exiting with code %d so the job '
                    'can be requeued.', step, PREEMPTED_EXIT_CODE)
    raise SystemExit(PREEMPTED_EXIT_CODE)


def _log_compiling(step):
  """The first step compiles: say so, or a silent minute looks like a hang."""
  if jax.process_index() == 0:
    logging.info('Compiling the train step (first step, %d); DenseNet121 takes '
                 'a minute or more...', step + 1)

