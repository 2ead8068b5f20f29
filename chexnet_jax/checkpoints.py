"""Checkpoints: one orbax CheckpointManager for the train state and the input
iterator, the run's identity beside it, and loading a run for evaluation.

Layout of a workdir:
  config.json      the config of the latest start (human reference)
  run.json         identity: model, labels, image size, dataset (written once)
  checkpoints/N/   orbax items 'state' (TrainState) and 'data' (grain state)

orbax writes each step to a temporary directory and renames it when complete,
so a save killed half-way never appears as a step; a step that is complete on
disk but unreadable (a truncated file) is moved aside to
<step>.unreadable-<time>, with the reason logged, and the previous one used.
"""
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from chexnet_jax import config_checks
from chexnet_jax import train

BEST_METRIC = 'val_mean_auroc'  # Runs whose config predates config.best_metric.
# config.best_metric -> +1 when higher is better, -1 when lower is.
BEST_METRICS = {'val_loss': -1.0, 'val_mean_auroc': 1.0}


class RunMismatchError(ValueError):
  """The workdir holds a run of another model or dataset."""


def _best_metric(metrics, name=BEST_METRIC):
  """A score to maximise: the metric, negated when lower is better."""
  value = metrics.get(name)
  if value is None or not math.isfinite(value):
    return -math.inf
  return BEST_METRICS[name] * value


def create_manager(workdir, keep, best_metric=BEST_METRIC):
  """Keeps the last `keep` steps and the best by `best_metric` (config.best_metric:
  'val_loss', lowest wins, as CheXNet chose; or 'val_mean_auroc', highest wins)."""
  if best_metric not in BEST_METRICS:
    raise config_checks.ConfigError(
        f'config.best_metric={best_metric!r} is not one of '
        f'{tuple(BEST_METRICS)}; set --config.best_metric to one of them.')
  _best_metric_fn = lambda metrics: _best_metric(metrics, best_metric)  # pylint: disable=unnecessary-lambda-assignment
  policy = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric_fn, n=1,
                                    keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, best_fn=_best_metric_fn, best_mode='max',
      enable_async_checkpointing=True, create=True)
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  _set_aside_torn_metrics(directory)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=('state', 'data'))


def _set_aside_torn_metrics(directory):
  """orbax reads every step's metrics when it opens the directory: a torn
  metrics file would stop every tool with a JSONDecodeError."""
  for path in sorted(glob.glob(os.path.join(directory, '*', 'metrics',
                                            'metrics'))):
    step = os.path.basename(os.path.dirname(os.path.dirname(path)))
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError) as error:
      if step.isdigit():
        _set_aside(directory, int(step), error)
  if jax.process_count() > 1:  # None may open the directory before it moved.
    multihost_utils.sync_global_devices('checkpoint metrics checked')


def save(manager, state, data_iterator, metrics=None):
  """Starts an asynchronous save of `state` (and the iterator, if any)."""
  import grain  # Lazy: evaluation-only users of this module need no grain.
  items = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  step = int(jax.device_get(state.step))
  with _write_errors(manager):  # Also reports the previous save's failure.
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                 force=True)
  return step


def wait_until_finished(manager):
  """Waits for the asynchronous save; a failed write is one clear error."""
  with _write_errors(manager):
    manager.wait_until_finished()


@contextlib.contextmanager
def _write_errors(manager):
  """A save that failed for want of space or permission -> WorkdirError.

  orbax raises such failures as ValueError/TimeoutError from its background
  threads, whose cause (errno) is buried in a long message.
  """
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    reason = _os_error(error)
    if reason is None:
      raise
    steps = _complete_steps(manager)
    raise config_checks.WorkdirError(
        f'Writing a checkpoint to {manager.directory} failed ({reason}). The '
        f'last complete checkpoint is step {steps[-1] if steps else "none"}; '
        'free space (or fix the directory), then run again to resume from it.'
    ) from error


def _os_error(error):
  """The OS reason of a failed write, e.g. 'No space left on device', or None."""
  while error is not None:
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    code = re.search(r"os_error_code='(\d+)'", str(error))  # tensorstore's.
    if code:
      return os.strerror(int(code.group(1)))
    error = error.__cause__ or error.__context__
  return None


def _complete_steps(manager):
  """Finalised steps on disk (orbax lists a step as soon as its save starts)."""
  names = os.listdir(manager.directory)
  return sorted(int(n) for n in names if n.isdigit())


def restore_latest(manager, state_template, data_iterator):
  """Restores the newest readable step; returns (state, step) or (None, None).

  The iterator, when given, is restored in place to the saved position. An
  unreadable step is moved aside, so that it is not taken for the latest.
  """
  import grain
  _log_unfinished_saves(manager)
  for step in sorted(manager.all_steps(), reverse=True):
    items = {'state': ocp.args.StandardRestore(state_template)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # pylint: disable=broad-except
      _set_aside(manager.directory, step, error)
      continue
    _reload(manager)
    return restored['state'], step
  _reload(manager)
  return None, None


def _reload(manager):
  """Forgets the steps set aside (after every process has tried them)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpoints restored')
  manager.reload()


def _log_unfinished_saves(manager):
  for name in sorted(os.listdir(manager.directory)):
    if name.endswith('.orbax-checkpoint-tmp'):
      logging.warning('Ignoring %s in %s: a save that never finished (the run '
                      'stopped while writing it).', name, manager.directory)


def _set_aside(directory, step, error):
  """Renames an unreadable step to <step>.unreadable-<time> (for inspection).

  Left in place, it would still be the manager's latest step (for load_run)
  and the resumed run would fail to save that step again ("already exists").
  """
  logging.warning('Checkpoint step %d in %s is unreadable (%s: %s); moving it '
                  'to %d.unreadable-*; trying the previous one.', step,
                  directory, type(error).__name__, error, step)
  if jax.process_index() == 0:  # The others may not see it any more.
    path = os.path.join(directory, str(step))
    os.replace(path, f'{path}.unreadable-{int(time.time())}')


# ----------------------------------------------------------------- identity --

def run_identity(config, dataset_info):
  """What a checkpoint is only meaningful with."""
  from input_pipeline import labels  # Lazy: keeps benchmark imports lean.
  return {'model': config.model, 'num_classes': config.num_classes,
          'labels': list(labels.LABELS[:config.num_classes]),
          'image_size': config.image_size, 'dataset': dataset_info}


def write_json_atomic(path, obj):
  """Write to a temporary name, then rename: never a half-written file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_or_write_identity(workdir, identity):
  """Refuses to resume a run of another model, label set or dataset."""
  path = os.path.join(workdir, 'run.json')
  if not os.path.exists(path):
    if jax.process_index() == 0:
      write_json_atomic(path, identity)
    return
  with open(path) as f:
    saved = json.load(f)
  different = sorted(k for k in identity if saved.get(k) != identity[k])
  if different:
    details = '; '.join(f'{k}: run has {saved.get(k)!r}, config asks for '
                        f'{identity[k]!r}' for k in different)
    raise RunMismatchError(
        f'{workdir} holds a different run ({details}). Use a new --workdir, '
        f'or change the config back to match {path}.')


# ----------------------------------------------------------- loading a run --

@dataclasses.dataclass
class Run:
  config: Any
  variables: Any       # {'params', 'batch_stats'}, replicated on the mesh.
  step: int
  model: Any
  mesh: Any


def load_config(workdir):
  import ml_collections
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} not found: {workdir} is not a chexnet_jax run directory '
        '(train one with python -m chexnet_jax.main --workdir ...).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _pick_step(manager, which):
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {manager.directory}.')
  if which == 'best':
    return manager.best_step()
  if which == 'latest':
    return manager.latest_step()
  if int(which) not in steps:
    raise ValueError(f'--checkpoint={which}: no such step in '
                     f'{manager.directory}; available: {sorted(steps)}.')
  return int(which)


def load_run(workdir, which='best', config=None):
  """Loads the variables of a trained run for evaluation or prediction."""
  config = config or load_config(workdir)
  mesh = train.make_mesh()
  model = train.build_model(config)
  tx, _ = train.create_optimizer(config, 1, 1)
  template = _abstract_state(config, model, mesh, tx)
  manager = create_manager(workdir, keep=config.keep_checkpoints,
                           best_metric=config.get('best_metric', BEST_METRIC))
  step = _pick_step(manager, which)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template)))
  manager.close()
  return Run(config=config, variables=restored['state'].variables, step=step,
             model=model, mesh=mesh)


def _abstract_state(config, model, mesh, tx):
  """Shapes and shardings of the train state, without computing it."""
  no_init = config.copy_and_resolve_references()
  no_init.init_from = ''  # Restoring overwrites the weights anyway.
  shapes = jax.eval_shape(
      lambda: train.create_train_state(no_init, model, mesh, tx))
  sharding = train.replicated(mesh)
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      shapes)
