"""Training: state, optimizer, the sharded train step, evaluation and the loop.

One code path for 1 device and N devices, one process and many: the step runs
under `jax.shard_map` over a 1-D mesh (axis 'data'). Inside it each device sees
its shard of the batch, so BatchNorm computes per-device statistics (as Horovod
and PyTorch DDP do) unless `config.bn_sync`, which gives BatchNorm the axis name
and so global-batch statistics. Gradients, loss and BN running statistics are
averaged over the axis, so the state stays replicated and identical.

Nothing here imports grain, TFDS or ml_collections at module level, so the
benchmark runs on a machine that has only jax, flax and optax.
"""
import functools
import math
import os
import shutil
import signal
import time
from typing import Any

from absl import logging
import flax
from flax.training import dynamic_scale as dynamic_scale_lib
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from chexnet_jax import distributed
from chexnet_jax import imagenet_weights
from chexnet_jax import losses
from chexnet_jax import lr_scaling
from chexnet_jax import metric_logging
from chexnet_jax import models
from chexnet_jax import preprocessing

DATA_AXIS = 'data'
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


# 128 + SIGTERM: the conventional code of a process ended by SIGTERM, which
# the sbatch scripts read as "checkpoint saved, requeue me".
PREEMPTED_EXIT_CODE = 143


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: Any           # optax.contrib.reduce_on_plateau state; .scale is used.
  dynamic_scale: Any     # flax DynamicScale for float16, else None.

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


# ----------------------------------------------------------------- sharding --

def make_mesh():
  """A 1-D mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def data_sharded(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def to_global(batch, mesh):
  """Process-local numpy batch -> global jax.Arrays sharded over 'data'."""
  sharding = data_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


# ---------------------------------------------------------------- optimizer --

def scaled_learning_rate(config):
  """config.learning_rate at the global batch (config.lr_scaling's rule)."""
  return lr_scaling.peak_learning_rate(config)


def create_optimizer(config, steps_per_epoch, total_steps):
  schedule = lr_scaling.make_schedule(config, steps_per_epoch, total_steps)
  tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.adam_eps,
                   weight_decay=config.weight_decay)
  return tx, schedule


def create_plateau(config):
  """CheXNet: LR x `plateau_factor` when validation loss stops improving.

  `plateau_patience` has PyTorch's meaning (as in CheXNet): that many bad
  epochs are tolerated and the next one cuts. optax cuts at the patience-th.
  """
  return optax.contrib.reduce_on_plateau(
      factor=config.plateau_factor, patience=config.plateau_patience + 1)


def update_plateau(config, state, val_loss):
  """Feeds one epoch's validation loss to the plateau rule (host side)."""
  if config.lr_schedule != 'plateau':
    return state
  _, plateau = create_plateau(config).update(
      updates={}, state=state.plateau, value=jnp.asarray(val_loss))
  return state.replace(plateau=plateau)


# -------------------------------------------------------------------- state --

def build_model(config, *, for_training=False):
  """The configured model; for the train step BN syncs over 'data' if asked."""
  bn_axis_name = DATA_AXIS if (for_training and config.bn_sync) else None
  return models.create_model(
      config.model, num_classes=config.num_classes,
      dtype=DTYPES[config.dtype], bn_axis_name=bn_axis_name)


def init_variables(config, model, rng):
  size = config.image_size
  dummy = jnp.zeros((1, size, size, 3), DTYPES[config.dtype])
  return model.init(rng, dummy, train=False)


def create_train_state(config, model, mesh, tx):
  """Initialises the replicated state directly on the mesh (no host copy)."""

  def state_from(variables):
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=variables['params'],
        batch_stats=variables['batch_stats'],
        opt_state=tx.init(variables['params']),
        plateau=create_plateau(config).init(variables['params']),
        dynamic_scale=(dynamic_scale_lib.DynamicScale()
                       if config.dtype == 'float16' else None))

  def init():
    return init_variables(config, model, jax.random.key(config.seed))

  on_mesh = replicated(mesh)
  init_from = imagenet_weights.init_path(config)  # 'imagenet': downloaded.
  if init_from is None:
    return jax.jit(lambda: state_from(init()), out_shardings=on_mesh)()
  from chexnet_jax import weights  # Optional: needs h5py / torch.
  # Reading a file cannot be traced: initialise (for the head, which an
  # ImageNet file lacks), load on the host, then place on the mesh.
  variables = weights.load_pretrained(init_from,
                                      jax.device_get(jax.jit(init)()))
  return jax.jit(state_from, out_shardings=on_mesh)(
      jax.device_put(variables, on_mesh))


# --------------------------------------------------------------------- loss --

bce_loss = losses.bce_loss  # The loss lives in chexnet_jax/losses.py.


# --------------------------------------------------------------- train step --

def make_train_step(config, model, mesh, tx, schedule, loss_weights=None):
  """Returns jitted (state, global batch) -> (state, metrics). Donates state.

  `model` comes from `build_model(config, for_training=True)`, so that
  BatchNorm knows whether to synchronise over 'data'.
  """
  dtype = DTYPES[config.dtype]
  loss_weights = (None if loss_weights is None
                  else tuple(jnp.asarray(w) for w in loss_weights))

  def loss_fn(params, batch_stats, images, labels, step):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'])
    loss = bce_loss(logits, labels, loss_weights).mean()
    # Fault injection for the tests: a poisoned loss at one chosen step.
    loss = jnp.where(step == config.debug_nan_at_step, jnp.nan, loss)
    return loss, updates['batch_stats']

  def local_step(state, batch):
    images = preprocessing.normalize(batch['image'], dtype)
    args = (state.batch_stats, images, batch['labels'], state.step)
    if state.dynamic_scale is None:
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params, *args)
      grads = jax.lax.pmean(grads, DATA_AXIS)
      dynamic_scale, grads_finite = None, jnp.bool_(True)
    else:
      dynamic_scale, grads_finite, (loss, batch_stats), grads = (
          state.dynamic_scale.value_and_grad(
              loss_fn, has_aux=True, axis_name=DATA_AXIS)(state.params, *args))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.plateau.scale, updates)
    new_state = state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        batch_stats=jax.lax.pmean(batch_stats, DATA_AXIS),
        dynamic_scale=dynamic_scale)
    # float16: an overflowing step is skipped (the loss scale backs off).
    new_state = _keep_if_finite(grads_finite, new_state, state)
    metrics = {'train_loss': jax.lax.pmean(loss, DATA_AXIS),
               'learning_rate': schedule(state.step) * state.plateau.scale,
               'grads_finite': grads_finite}
    return new_state, metrics

  spec = jax.sharding.PartitionSpec
  step_fn = jax.shard_map(local_step, mesh=mesh, in_specs=(spec(), spec(DATA_AXIS)),
                          out_specs=(spec(), spec()), check_vma=False)
  return jax.jit(step_fn, donate_argnums=0)


def _keep_if_finite(is_finite, new_state, old_state):
  """Keeps every leaf of `new_state` except on a non-finite float16 step."""
  kept = jax.tree.map(lambda new, old: jnp.where(is_finite, new, old),
                      new_state.replace(dynamic_scale=None),
                      old_state.replace(dynamic_scale=None))
  return kept.replace(step=new_state.step,
                      dynamic_scale=new_state.dynamic_scale)


# --------------------------------------------------------------- prediction --

def make_predict_fn(model, dtype=jnp.float32):
  """jitted (variables, uint8 images [B,H,W,1]) -> logits float32 [B, C].

  Shardings follow the inputs: variables replicated, images on 'data'.
  """

  @jax.jit
  def predict(variables, images):
    return model.apply(variables, preprocessing.normalize(images, dtype),
                       train=False).astype(jnp.float32)

  return predict


def score_split(batches, score, mesh):
  """Runs `score(local batch) -> global [B, C]` over padded evaluation batches.

  Returns (scores, labels, indices) of the real examples only, gathered from
  every process and ordered by example index: each example exactly once.
  """
  scores, labels, indices = [], [], []
  for batch in batches:
    rest = to_global({k: batch[k] for k in ('labels', 'mask', 'index')}, mesh)
    gathered = multihost_utils.process_allgather(
        (score(batch), rest['labels'], rest['mask'], rest['index']), tiled=True)
    keep = np.asarray(gathered[2])
    for rows, part in zip((scores, labels, indices), gathered[:2] + gathered[3:]):
      rows.append(np.asarray(part)[keep])
  scores, labels, indices = (np.concatenate(x) for x in (scores, labels, indices))
  order = np.argsort(indices)
  return scores[order], labels[order], indices[order]


def evaluate_split(config, model, variables, mesh, split, predict=None,
                   loss_weights=None):
  """One masked pass over `split`: every example scored exactly once.

  Returns (metrics, probs, labels, indices) with rows ordered by example index.
  Pass `predict` (from make_predict_fn) to reuse its compilation across calls.
  metrics['loss'] is weighted by `loss_weights` like the training loss (the one
  the plateau rule watches); metrics['bce'] is always unweighted.
  """
  from input_pipeline import pipeline  # Lazy: the benchmark needs no grain.
  from chexnet_jax import metrics as metrics_lib

  predict = predict or make_predict_fn(model, DTYPES[config.dtype])
  batches = pipeline.create_eval_iterator(
      config, split, process_index=jax.process_index(),
      process_count=jax.process_count())
  with pipeline.reading(config, split):
    logits, labels, indices = score_split(
        batches, lambda b: predict(variables, to_global(b, mesh)['image']),
        mesh)
  probs = np.asarray(jax.nn.sigmoid(logits))
  auroc = metrics_lib.auroc_per_label(labels, probs)
  result = {'loss': float(np.mean(bce_loss(jnp.asarray(logits), labels,
                                           loss_weights))),
            'bce': float(np.mean(bce_loss(jnp.asarray(logits), labels))),
            'auroc': auroc, 'mean_auroc': float(np.nanmean(list(auroc.values())))}
  return result, probs, labels, indices


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
  from chexnet_jax import checkpoints  # Lazy: orbax, grain, TFDS.
  from chexnet_jax import config_checks
  from input_pipeline import pipeline

  config_checks.validate(config)
  dataset_info = pipeline.get_dataset_info(config)
  config_checks.prepare_workdir(workdir)
  checkpoints.check_or_write_identity(
      workdir, checkpoints.run_identity(config, dataset_info))
  if jax.process_index() == 0:
    checkpoints.write_json_atomic(os.path.join(workdir, 'config.json'),
                                  config.to_dict())
    _keep_split_beside_run(pipeline.split_file(config), workdir)
  run = _Run(config, workdir, dataset_info, pipeline, checkpoints)
  writer = (metric_logging.MetricWriter(workdir) if jax.process_index() == 0
            else metric_logging.NullWriter())
  try:
    return run.loop(writer)
  finally:
    checkpoints.wait_until_finished(run.manager)  # A failed write: one sentence.
    run.manager.close()
    writer.close()


class _Run:
  """The state of one training run: what the loop reads and updates."""

  def __init__(self, config, workdir, dataset_info, pipeline, checkpoints):
    self.config, self.checkpoints, self.pipeline = config, checkpoints, pipeline
    self.mesh = make_mesh()
    distributed.log_topology(self.mesh)
    self.steps_per_epoch = pipeline.train_steps_per_epoch(
        config, dataset_info['splits']['train'], jax.process_count())
    self.total_steps = total_train_steps(config, self.steps_per_epoch)
    tx, schedule = create_optimizer(config, self.steps_per_epoch,
                                    self.total_steps)
    model = build_model(config, for_training=True)
    self.eval_model = build_model(config)
    self.predict = make_predict_fn(self.eval_model, DTYPES[config.dtype])
    self.state = create_train_state(config, model, self.mesh, tx)
    self.loss_weights = losses.label_weights(
        config.pos_weight, dataset_info['train_positive_fraction'])
    self.train_step = make_train_step(config, model, self.mesh, tx, schedule,
                                      self.loss_weights)
    self.data = pipeline.create_train_iterator(
        config, process_index=jax.process_index(),
        process_count=jax.process_count())
    self.manager = checkpoints.create_manager(workdir, config.keep_checkpoints,
                                              config.best_metric)
    self._resume(workdir)

  def _resume(self, workdir):
    restored, step = self.checkpoints.restore_latest(
        self.manager, self.state, self.data)
    if restored is None:
      logging.info('Starting a new run in %s.', workdir)
      return
    self.state = restored
    logging.info('Resuming from checkpoint step %d in %s.', step, workdir)

  def loop(self, writer):
    config, step = self.config, int(jax.device_get(self.state.step))
    eval_every = eval_interval_steps(config, self.steps_per_epoch)
    reading_train = functools.partial(self.pipeline.reading, config, 'train')
    timer, preemption = StepTimer(config.batch_size), Preemption()
    previous = None  # (step, loss) checked one step late: keeps dispatch async.
    while step < self.total_steps:
      wait_start = time.perf_counter()
      with reading_train():
        batch = next(self.data)
      timer.add(time.perf_counter() - wait_start)
      self.state, metrics = self.train_step(self.state,
                                            to_global(batch, self.mesh))
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
        self.checkpoints.save(self.manager, self.state, self.data)
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
    result, *_ = evaluate_split(self.config, self.eval_model,
                                self.state.variables, self.mesh, 'validation',
                                self.predict, self.loss_weights)
    self.state = update_plateau(self.config, self.state, result['loss'])
    scalars = {'val_loss': result['loss'], 'val_mean_auroc': result['mean_auroc']}
    scalars.update({f'val_auroc/{k}': v for k, v in result['auroc'].items()})
    writer.write_scalars(step, scalars)
    logging.info('step %d: validation loss %.4f, mean AUROC %.4f', step,
                 result['loss'], result['mean_auroc'])
    self.checkpoints.save(self.manager, self.state, self.data,
                          metrics={'val_mean_auroc': result['mean_auroc'],
                                   'val_loss': result['loss']})

  def _save_for_preemption(self, step, previous):
    check_finite(*previous, self.manager)
    if step not in self.manager.all_steps():
      self.checkpoints.save(self.manager, self.state, self.data)
    self.checkpoints.wait_until_finished(self.manager)
    logging.warning('Preempted: saved step %d; exiting with code %d so the job '
                    'can be requeued.', step, PREEMPTED_EXIT_CODE)
    raise SystemExit(PREEMPTED_EXIT_CODE)


def _keep_split_beside_run(split_file, workdir):
  """A run's split is part of its result: copy it in (once, atomically)."""
  target = os.path.join(workdir, 'split.json')
  if split_file and not os.path.exists(target):
    shutil.copyfile(split_file, f'{target}.tmp')
    os.replace(f'{target}.tmp', target)
