"""A trained run's weights, to fine-tune from (`config.init_from=RUN_DIR`).

`read_best` reads the params and batch_stats of a run's best checkpoint straight
from orbax, as host numpy arrays (whatever devices the run was trained on: no
train-state template, no optimizer state), and run.json says its model and label
names. `fine_tune_variables` puts them onto a fresh model's variables: the
backbone whole, the classifier head by label name (a label both runs have takes
the old head's row, a new label keeps the fresh initialisation).

A leaf of the module graph, below train_state (which calls it) and checkpoints
(which imports train_state, so cannot be imported by it): the rule that picks a
run's best checkpoint (BEST_METRICS, best_score) lives here, and checkpoints.py
uses it from here, so both pick the same step. A torn, corrupt or unreadable
step of the source run (checkpoint_files: the checksums and metrics rule that
checkpoints.py applies to a run's own steps) is refused in one sentence naming
the run, the step and what to do; the source run is left as it is.
"""

import json
import math
import os

from absl import logging
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from chexnet_jax import checkpoint_files
from chexnet_jax import run_dir
from input_pipeline import labels as labels_lib

BEST_METRIC = 'val_mean_auroc'  # Runs whose config predates config.best_metric.
# config.best_metric -> +1 when higher is better, -1 when lower is.
BEST_METRICS = {'val_loss': -1.0, 'val_mean_auroc': 1.0}
_HEAD = ('params', 'classifier')


class FineTuneError(ValueError):
  """config.init_from names a run that cannot be fine-tuned from with this config."""


def best_score(metrics, name=BEST_METRIC):
  """A score to maximise: the metric, negated when lower is better."""
  value = metrics.get(name)
  if value is None or not math.isfinite(value):
    return -math.inf
  return BEST_METRICS[name] * value


def is_run(path):
  """Whether `path` is a chexnet_jax run directory (it holds run.json)."""
  return bool(path) and os.path.isfile(os.path.join(path, run_dir.IDENTITY_FILE))


def _steps(directory):
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def check_source(path, model):
  """run.json of the run at `path`, after checking it can start `model`."""
  if not is_run(path):
    raise FineTuneError(
      f'config.init_from={path} is a directory but not a chexnet_jax run (no '
      f'{run_dir.IDENTITY_FILE}); give a run directory, a weights file, '
      "'imagenet' or '' (from scratch)."
    )
  with open(os.path.join(path, run_dir.IDENTITY_FILE)) as f:
    identity = json.load(f)
  if identity.get('model') != model:
    raise FineTuneError(
      f'config.init_from={path} is a {identity.get("model")} run but '
      f'config.model={model!r}; fine-tuning keeps the backbone, so set '
      f'--config.model={identity.get("model")} or start from a {model} run.'
    )
  if not _steps(os.path.join(path, 'checkpoints')):
    raise FineTuneError(
      f'config.init_from={path} is a run without any checkpoint '
      'yet; train it first or start from another run.'
    )
  return identity


def source_labels(path, identity):
  """The run's label names: run.json's, else its config's (NIH's 14 by default)."""
  if identity.get('labels'):
    return tuple(identity['labels'])
  return labels_lib.names_of(run_dir.load_config(path))


def _bad_step(path, step, what):
  """The one sentence for a step of the source run that cannot be read."""
  directory = os.path.join(path, 'checkpoints')
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
  checksums is read unverified, with a warning.
  """
  config = run_dir.load_config(path)
  metric = config.get('best_metric', BEST_METRIC)
  options = ocp.CheckpointManagerOptions(
    create=False, best_fn=lambda metrics: best_score(metrics, metric), best_mode='max'
  )
  directory = os.path.join(os.path.abspath(path), 'checkpoints')
  torn = checkpoint_files.torn_metrics(directory)
  if torn:  # orbax could not even open the directory.
    raise _bad_step(path, torn[0][0], f'torn ({torn[0][1]})')
  with ocp.CheckpointManager(
    directory, options=options, item_handlers={'state': ocp.PyTreeCheckpointHandler()}
  ) as manager:
    step = manager.best_step()
    if step is None:
      step = manager.latest_step()
      logging.warning(
        '%s has no checkpoint with validation metrics; fine-tuning from its latest, step %d.',
        path,
        step,
      )
    problem = checkpoint_files.verify(os.path.join(directory, str(step)))
    if problem == checkpoint_files.UNVERIFIED:
      logging.warning(
        'Checkpoint step %d of %s has no %s (it predates checksums at save); '
        'fine-tuning from it unverified.',
        step,
        path,
        checkpoint_files.CHECKSUM_FILE,
      )
    elif problem:
      raise _bad_step(path, step, f'corrupt ({problem})')
    try:
      restored = _restore_weights(manager, step)
    except Exception as error:  # pylint: disable=broad-except
      raise _bad_step(
        path, step, f'unreadable ({type(error).__name__}: {checkpoint_files.first_line(error)})'
      ) from error
  return restored['state'], step


def _restore_weights(manager, step):
  """Only params and batch_stats of `step`, as host numpy arrays."""
  tree = manager.item_metadata(step)['state']
  wanted = {'params': tree['params'], 'batch_stats': tree['batch_stats']}
  return manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
        item=jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted),
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
        partial_restore=True,
      )
    ),
  )


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
