"""Reads a trained run's weights without changing the run.

The one reader of evaluate, predict, the notebook and fine-tuning. It restores
only params and batch_stats (no optimizer state, no train-state template), as
host numpy arrays, and renames, writes or deletes nothing in the run: setting a
damaged step aside is the training run's own manager's job (checkpoints.py),
for its own steps.

It may run beside the trainer, which saves new steps and deletes old ones
(config.keep_checkpoints). So it reads a snapshot: the chosen step's files are
hard-linked (or, across file systems, copied) into a temporary directory that
the writer cannot delete, the snapshot is checked against the step's checksums,
and the weights are restored from it. A step deleted before its snapshot was
complete is retried on the newest complete step that is still there ('best',
'latest'); an explicit step that vanished is one sentence. With several
processes, process 0 picks the step and all retry together.

A leaf of the module graph, below run_weights and checkpoints.
"""

import contextlib
import dataclasses
import difflib
import json
import math
import os
import shutil
import tempfile
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from chexnet_jax import errors
from chexnet_jax.model import densenet
from chexnet_jax.run import checkpoint_files
from chexnet_jax.run import run_dir
from chexnet_jax.runtime import files
from chexnet_jax.runtime import sharding
from configs import default as default_config

# config.best_metric -> +1 when higher is better, -1 when lower is.
BEST_METRICS = {'val_loss': -1.0, 'val_mean_auroc': 1.0}
# Snapshots tried before giving up on a run whose steps keep vanishing.
SNAPSHOT_ATTEMPTS = 5
METRICS_FILE = os.path.join('metrics', 'metrics')


class CheckpointError(errors.UserValueError):
  """A chosen checkpoint that is missing, damaged or not chosen yet.

  `step` and `what` ('corrupt (...)', 'unreadable (...)', 'torn (...)') are set
  when one step is damaged, so that a caller can say it in its own words.
  """

  def __init__(self, message, step=None, what=None):
    super().__init__(message)
    self.step, self.what = step, what


def best_score(metrics, name):
  """A score to maximise: the metric, negated when lower is better."""
  value = (metrics or {}).get(name)
  if value is None or not math.isfinite(value):
    return -math.inf
  return BEST_METRICS[name] * value


def _damaged(directory, step, what):
  steps = checkpoint_files.finished_steps(directory)
  return CheckpointError(
    f'Checkpoint step {step} in {directory} is {what}; choose another with '
    f'--checkpoint (steps: {steps}).',
    step=step,
    what=what,
  )


def step_metrics(directory, step):
  """The metrics saved with `step` ({} if none); a torn file is CheckpointError."""
  path = os.path.join(directory, str(step), METRICS_FILE)
  try:
    with open(path) as f:
      return json.load(f) or {}
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as error:
    raise _damaged(directory, step, f'torn (metrics: {type(error).__name__})') from error


def best_step(directory, metric):
  """The complete step ranked best by `metric` (a tie: the later), or None when
  no step has a finite value of it yet (no validation has run)."""
  scored = [
    (best_score(step_metrics(directory, s), metric), s)
    for s in checkpoint_files.finished_steps(directory)
  ]
  finite = [(score, step) for score, step in scored if score > -math.inf]
  return max(finite)[1] if finite else None


def pick_step(workdir, which, metric, eval_every_epochs=None):
  """The step `which` ('best', 'latest' or a step number) names in the run now."""
  directory = checkpoint_files.checkpoint_dir(workdir)
  steps = checkpoint_files.finished_steps(directory)
  if not steps:
    raise CheckpointError(
      f'No complete checkpoint in {directory} yet; train the run until it saves '
      'one (config.checkpoint_every_steps), then run this again.'
    )
  if which == 'latest':
    return steps[-1]
  if which == 'best' and run_dir.read_identity(workdir).get(run_dir.IMPORTED_KEY):
    return steps[-1]  # Imported weights: one step, never validated here.
  if which == 'best':
    step = best_step(directory, metric)
    if step is None:
      every = f' (every {eval_every_epochs:g} epoch(s))' if eval_every_epochs else ''
      raise CheckpointError(
        f'--checkpoint best: no checkpoint in {directory} has been validated yet, '
        f'so none is best by {metric}; use --checkpoint latest (step {steps[-1]}), '
        f"or wait for the run's first evaluation{every}."
      )
    return step
  if int(which) not in steps:
    raise CheckpointError(f'--checkpoint={which}: no such step in {directory}; available: {steps}.')
  return int(which)


def _link_or_copy(source, target):
  try:
    os.link(source, target)  # The writer's deletion leaves this name intact.
  except OSError:
    shutil.copy2(source, target)


def _files(path):
  return sorted(
    os.path.relpath(os.path.join(root, name), path)
    for root, _, names in os.walk(path)
    for name in names
  )


# The checksum file as it is being written (a hidden name: runtime/files.write_atomically).
_IN_PROGRESS = files.staging_prefix(checkpoint_files.CHECKSUM_FILE) + '*'


def snapshot(step_dir, target):
  """Links (or copies) `step_dir` to `target`; False if it vanished meanwhile."""
  try:
    shutil.copytree(
      step_dir,
      target,
      copy_function=_link_or_copy,
      ignore=shutil.ignore_patterns(_IN_PROGRESS),
    )
  except (OSError, shutil.Error):
    if os.path.isdir(step_dir):
      raise
    return False
  # Deleted while linking: the directory is gone, or a linked file is.
  with contextlib.suppress(OSError):
    if os.path.isdir(step_dir) and set(_files(target)) <= set(_files(step_dir)):
      return True
  return False


def _restore_weights(root, step):
  """Only params and batch_stats of step `step` under `root`, as host numpy."""
  # `root` is this reader's own snapshot, so orbax's read_only mode (which
  # warns twice) is not needed; 'data' (the input position) is not read, but
  # orbax warns of any item it has no handler for.
  handlers = {'state': ocp.PyTreeCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(
    root, options=ocp.CheckpointManagerOptions(create=False), item_handlers=handlers
  ) as manager:
    tree = manager.item_metadata(step)['state']
    wanted = {'params': tree['params'], 'batch_stats': tree['batch_stats']}
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          item=jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted),
          restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
          partial_restore=True,
        )
      ),
    )
  return restored['state']


def _agreed(step):
  """Every process reads the step process 0 chose (a new one may appear meanwhile)."""
  if jax.process_count() == 1:
    return step
  return int(multihost_utils.broadcast_one_to_all(np.int64(step)))


def _everywhere(taken):
  """Whether every process has its snapshot; if one has not, all take the next step."""
  if jax.process_count() == 1:
    return taken
  return bool(np.all(multihost_utils.process_allgather(np.asarray(taken))))


def _read_snapshot(workdir, root, step):
  """Verifies and restores the snapshot of `step` under `root`."""
  directory = checkpoint_files.checkpoint_dir(workdir)
  problem = checkpoint_files.verify(os.path.join(root, str(step)))
  if problem == checkpoint_files.UNVERIFIED:
    logging.warning(
      'Checkpoint step %d of %s has no %s (it predates checksums at save); reading it unverified.',
      step,
      workdir,
      checkpoint_files.CHECKSUM_FILE,
    )
  elif problem:
    raise _damaged(directory, step, f'corrupt ({problem})')
  try:
    return _restore_weights(root, step)
  except Exception as error:  # pylint: disable=broad-except
    # Whatever orbax raises for files it cannot read is the step's fault.
    what = f'unreadable ({type(error).__name__}: {checkpoint_files.first_line(error)})'
    raise _damaged(directory, step, what) from error


def read_weights(workdir, which, metric, eval_every_epochs=None):
  """({'params', 'batch_stats'} as host numpy, step) of checkpoint `which`.

  `which`: 'best' (by `metric`, the run's config.best_metric), 'latest' or a
  step number. Raises CheckpointError (one sentence) when the step does not
  exist, is not chosen yet, or is damaged; the run is never changed.
  """
  directory = checkpoint_files.checkpoint_dir(workdir)
  for _ in range(SNAPSHOT_ATTEMPTS):
    step = _agreed(pick_step(workdir, which, metric, eval_every_epochs))
    source = os.path.join(directory, str(step))
    with tempfile.TemporaryDirectory(prefix='chexnet_jax-snapshot-') as root:
      if _everywhere(snapshot(source, os.path.join(root, str(step)))):
        try:
          return _read_snapshot(workdir, root, step), step
        except CheckpointError:
          if os.path.isdir(source):
            raise  # Damaged, not deleted: say so.
    if isinstance(which, int):
      break  # No other step to take: say so.
    logging.info(
      'Checkpoint step %d of %s was deleted while reading it; trying again.', step, workdir
    )
  raise CheckpointError(
    f'Checkpoint step {step} in {directory} was deleted while it was being read (the '
    'run keeps only its newest config.keep_checkpoints steps); choose another with '
    f'--checkpoint (steps: {checkpoint_files.finished_steps(directory)}).'
  )


@dataclasses.dataclass
class RestoredRun:
  """A trained run's weights, ready to score with."""

  config: Any
  label_names: tuple  # The run's labels, in the order of the model's outputs.
  variables: Any  # {'params', 'batch_stats'}, replicated on the mesh.
  step: int
  model: Any
  mesh: Any
  origin: str = ''  # run_dir.weights_origin: '' for a run trained here.
  train_images: Optional[int] = None  # run.json's training split size (None: not recorded).


def parse_selector(value):
  """--checkpoint: 'best' | 'latest' | a step number, as load_run takes it."""
  if value.isdigit():
    return int(value)
  if value in ('best', 'latest'):
    return value
  close = difflib.get_close_matches(value, ('best', 'latest'), n=1)
  hint = f" (did you mean '{close[0]}'?)" if close else ''
  raise errors.UserValueError(
    f"{value!r} is not a checkpoint: give 'best', 'latest' or a step number{hint}."
  )


def checkpoint_help():
  """--checkpoint's help, which says what 'best' means (config.best_metric)."""
  return (
    "'best': the step the run ranks best by its config.best_metric (default "
    f"{default_config.get_config().best_metric}; printed when it runs), 'latest', or a step"
  )


def describe_checkpoint(which, step, config, imported=False):
  """'step 48 (best by val_loss)': which step was read, and why; `imported`: the run's
  only step holds weights imported from a published checkpoint (run/imported.py)."""
  if imported:
    return f'step {step} (imported weights)'
  if which == 'best':
    return f'step {step} (best by {config.best_metric})'
  return f'step {step} ({which})' if which == 'latest' else f'step {step}'


def load_run(workdir, which='best', config=None):
  """Loads the variables of a trained run for evaluation or prediction.

  `which` is what parse_selector returns; `config` defaults to the run's own.
  Read-only: the run, even one training now, is left as it is.
  """
  config = config or run_dir.load_config(workdir)
  variables, step = read_weights(workdir, which, config.best_metric, config.eval_every_epochs)
  mesh = sharding.make_mesh()
  return RestoredRun(
    config=config,
    label_names=run_dir.label_names(workdir),
    variables=jax.device_put(variables, sharding.replicated(mesh)),
    step=int(step),
    model=densenet.from_config(config),
    mesh=mesh,
    origin=run_dir.weights_origin(workdir),
    train_images=run_dir.train_images(workdir),
  )
