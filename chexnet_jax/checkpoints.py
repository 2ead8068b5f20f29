"""Checkpoints: one orbax CheckpointManager for the train state and the input
iterator (WORKDIR/checkpoints/N/, items 'state' and 'data'), and loading a
trained run for evaluation and prediction.

orbax writes each step to a temporary directory and renames it when complete,
so a save killed half-way never appears as a step; a step that is complete on
disk but unreadable (a truncated file) is moved aside to
<step>.unreadable-<time>, with the reason logged, and the previous one used.
"""
import contextlib
import dataclasses
import glob
import json
import os
import re
import time
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from chexnet_jax import run_dir
from chexnet_jax import run_weights
from chexnet_jax import sharding
from chexnet_jax import train_state

# The rule that picks a run's best step is run_weights' (which fine-tuning reads
# a run's best checkpoint with, below train_state): one rule for both.
BEST_METRIC = run_weights.BEST_METRIC
BEST_METRICS = run_weights.BEST_METRICS


def create_manager(workdir, keep, best_metric=BEST_METRIC):
  """Keeps the last `keep` steps and the best by `best_metric` (config.best_metric:
  'val_loss', lowest wins, as CheXNet chose; or 'val_mean_auroc', highest wins).
  config_checks has refused any other name before this runs."""
  _best_metric_fn = lambda metrics: run_weights.best_score(metrics, best_metric)  # pylint: disable=unnecessary-lambda-assignment
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
    raise run_dir.WorkdirError(
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


# ----------------------------------------------------------- loading a run --

@dataclasses.dataclass
class RestoredRun:
  """A trained run's weights, ready to score with."""
  config: Any
  variables: Any       # {'params', 'batch_stats'}, replicated on the mesh.
  step: int
  model: Any
  mesh: Any


def parse_selector(value):
  """--checkpoint: 'best' | 'latest' | a step number, as load_run takes it."""
  if value.isdigit():
    return int(value)
  if value in ('best', 'latest'):
    return value
  raise ValueError(f"--checkpoint={value}: give 'best', 'latest' or a step number.")


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
  """Loads the variables of a trained run for evaluation or prediction.

  `which` is what parse_selector returns; `config` defaults to the run's own.
  """
  config = config or run_dir.load_config(workdir)
  mesh = sharding.make_mesh()
  model = train_state.build_model(config)
  tx, _ = train_state.create_optimizer(config, 1, 1)
  template = train_state.abstract_train_state(config, model, mesh, tx)
  manager = create_manager(workdir, keep=config.keep_checkpoints,
                           best_metric=config.get('best_metric', BEST_METRIC))
  step = _pick_step(manager, which)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(template)))
  manager.close()
  return RestoredRun(config=config, variables=restored['state'].variables,
                     step=step, model=model, mesh=mesh)
