"""A trained run's weights, to fine-tune from (`config.init_from=RUN_DIR`).

`read_best` reads the params and batch_stats of a run's best checkpoint through
run_reader (host numpy arrays, whatever devices the run was trained on: no
train-state template, no optimizer state; the run is never changed), and
run.json says its model and label names. `fine_tune_variables` puts them onto a
fresh model's variables: the backbone whole, the classifier head by label name
(a label both runs have takes the old head's row, a new label keeps the fresh
initialisation).

Below train_state (which calls it). A torn, corrupt or unreadable step of the
source run is refused in one sentence naming the run, the step and what to do;
the source run is left as it is (setting steps aside is its own trainer's job).
"""

import os

from absl import logging
from flax import traverse_util
import numpy as np

from chexnet_jax import errors
from chexnet_jax.run import run_dir
from chexnet_jax.run import checkpoint_files
from chexnet_jax.run import run_reader

_HEAD = ('params', 'classifier')


class FineTuneError(errors.UserValueError):
  """config.init_from names a run that cannot be fine-tuned from with this config."""


def is_run(path):
  """Whether `path` is a chexnet_jax run directory (it holds run.json)."""
  return bool(path) and os.path.isfile(os.path.join(path, run_dir.IDENTITY_FILE))


def check_source(path, model):
  """run.json of the run at `path`, after checking it can start `model`."""
  if not is_run(path):
    raise FineTuneError(
      f'config.init_from={path} is a directory but not a chexnet_jax run (no '
      f'{run_dir.IDENTITY_FILE}); give a run directory, a weights file, '
      "'imagenet' or '' (from scratch)."
    )
  identity = run_dir.read_identity(path)
  if identity.get('model') != model:
    raise FineTuneError(
      f'config.init_from={path} is a {identity.get("model")} run but '
      f'config.model={model!r}; fine-tuning keeps the backbone, so set '
      f'--config.model={identity.get("model")} or start from a {model} run.'
    )
  if not checkpoint_files.finished_steps(checkpoint_files.checkpoint_dir(path)):
    raise FineTuneError(
      f'config.init_from={path} is a run without any checkpoint '
      'yet; train it first or start from another run.'
    )
  return identity


def source_labels(path, identity):
  """The run's label names (run_dir.label_names: run.json's, or an older run's)."""
  del identity
  return run_dir.label_names(path)


def _bad_step(path, step, what):
  """The one sentence for a step of the source run that cannot be read."""
  directory = checkpoint_files.checkpoint_dir(path)
  return FineTuneError(
    f'config.init_from={path}: checkpoint step {step} of that run is {what}; move '
    f'{os.path.join(directory, str(step))} aside (rename it to {step}.corrupt, as '
    "training does) so that the run's best remaining step is used, or fine-tune from "
    'another run.'
  )


def read_best(path):
  """({'params', 'batch_stats'} of the run's best checkpoint as numpy, step).

  Best as the run itself judged it (its config.best_metric); a run that has
  saved no validation metrics yet gives its latest step, with a warning. A step
  with a torn metrics file, files that differ from its checksums, or that orbax
  cannot read raises FineTuneError (one sentence); a step saved without
  checksums is read unverified, with a warning. Read by run_reader: the source
  run is left exactly as it is.
  """
  config = run_dir.load_config(path)
  try:
    try:
      return run_reader.read_weights(path, 'best', config.best_metric)
    except run_reader.CheckpointError as error:
      if error.step is not None:
        raise
      logging.warning(
        '%s has no checkpoint with validation metrics; fine-tuning from its latest.', path
      )
      return run_reader.read_weights(path, 'latest', config.best_metric)
  except run_reader.CheckpointError as error:
    if error.step is None:
      raise FineTuneError(f'config.init_from={path}: {error}') from error
    raise _bad_step(path, error.step, error.what) from error


def fine_tune_variables(path, variables, *, model, label_names):
  """`variables` (a fresh model's, on the host) with the run at `path` put in.

  Everything but the head is the run's best checkpoint's; the head's rows are
  mapped by label name onto `label_names`, and labels the run lacks keep their
  fresh rows. Logs one line saying which labels were carried over.
  """
  identity = check_source(path, model)
  old_labels = source_labels(path, identity)
  source, step = read_best(path)
  old = traverse_util.flatten_dict(source)
  new = traverse_util.flatten_dict(variables)
  _check_same_backbone(old, new, path, identity.get('model'), model)
  out = {k: np.asarray(old[k], new[k].dtype) for k in new if k[:2] != _HEAD}
  kernel = np.array(new[_HEAD + ('kernel',)])
  bias = np.array(new[_HEAD + ('bias',)])
  carried = [n for n in label_names if n in old_labels]
  for name in carried:
    row, column = old_labels.index(name), list(label_names).index(name)
    kernel[:, column] = old[_HEAD + ('kernel',)][:, row]
    bias[column] = old[_HEAD + ('bias',)][row]
  out[_HEAD + ('kernel',)], out[_HEAD + ('bias',)] = kernel, bias
  fresh = [n for n in label_names if n not in old_labels]
  logging.info(
    'Fine-tuning from %s (step %d): labels carried over: %s; starting fresh: %s.',
    path,
    step,
    ', '.join(carried) or 'none',
    ', '.join(fresh) or 'none',
  )
  return traverse_util.unflatten_dict(out)


def _check_same_backbone(old, new, path, old_model, model):
  """Same variables, same shapes, head aside; else one sentence naming both."""
  differ = sorted('/'.join(k) for k in set(old) ^ set(new) if k[:2] != _HEAD)
  differ += sorted(
    '/'.join(k)
    for k in set(old) & set(new)
    if k[:2] != _HEAD and np.shape(old[k]) != np.shape(new[k])
  )
  width = (np.shape(old[_HEAD + ('kernel',)])[0], np.shape(new[_HEAD + ('kernel',)])[0])
  if differ or width[0] != width[1]:
    raise FineTuneError(
      f'config.init_from={path} holds a {old_model} model whose variables do '
      f'not fit config.model={model!r} (first difference: '
      f'{differ[0] if differ else "classifier input width %d vs %d" % width}); '
      'train with the same architecture or start from another run.'
    )
