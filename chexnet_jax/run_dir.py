"""A run directory: what it is a run of, and the config it was trained with.

Layout of a workdir:
  config.json      the config of the latest start, its paths made absolute, so
                   evaluate, predict and the notebook work from any directory
  run.lock         held by the run in progress (workdir_lock.py)
  run.json         identity: model, labels, image size, dataset (written once)
  split.json       the dataset's split (image names per split), chestxray14 only
  checkpoints/N/   orbax items 'state' and 'data' (see checkpoints.py)
"""

import json
import os
import shutil
import tempfile

import jax
import ml_collections

from chexnet_jax import imagenet_weights
from input_pipeline import labels as labels_lib

CONFIG_FILE = 'config.json'
IDENTITY_FILE = 'run.json'
SPLIT_FILE = 'split.json'
# Config fields that are file-system paths: made absolute when a run starts.
PATH_FIELDS = ('data_dir', 'init_from')


class RunMismatchError(ValueError):
  """The workdir holds a run of another model or dataset."""


class WorkdirError(ValueError):
  """The workdir cannot be written: not a directory, read-only or full."""


def unwritable_error(workdir, path, error):
  return WorkdirError(
    f'--workdir {workdir} cannot be written ({path}: {error.strerror}); '
    'choose a writable directory with free space.'
  )


def make_workdir(workdir):
  """Creates the workdir (only the directory: the lock comes next)."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise unwritable_error(workdir, workdir, error) from error


def prepare_workdir(workdir):
  """Creates the workdir and proves it is writable, before any long work.

  Its checkpoints/ subdirectory too: orbax meets an unwritable one only at
  the first save, and then waits 5 minutes before failing.
  """
  for path in (workdir, os.path.join(workdir, 'checkpoints')):
    try:
      os.makedirs(path, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=path) as probe:
        probe.write(b'x')  # A byte, flushed: a full disk fails here, not later.
        probe.flush()
        os.fsync(probe.fileno())
    except OSError as error:
      raise unwritable_error(workdir, path, error) from error


def with_absolute_paths(config):
  """A copy of `config` whose paths no longer depend on the current directory."""
  config = config.copy_and_resolve_references()
  for field in PATH_FIELDS:
    if config[field] and config[field].lower() not in imagenet_weights.NOT_PATHS:
      config[field] = os.path.abspath(config[field])
  return config


def write_json_atomic(path, obj):
  """Write to a temporary name, then rename: never a half-written file."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def with_label_set(config, names):
  """A copy of `config` carrying the dataset's label names (config.label_names) and,
  unless set, their count (config.num_classes); evaluate, predict and the notebook
  read them back from config.json."""
  config = config.copy_and_resolve_references()
  config.label_names = ','.join(names)
  if config.num_classes <= 0:
    config.num_classes = len(names)
  return config


# Identity fields newer than some runs, with the value those runs had.
IDENTITY_OF_OLDER_RUNS = {'optimizer_state': 'per_parameter'}
# The config field that decides an identity field, where the name differs.
IDENTITY_FIELDS = {'optimizer_state': 'fused_optimizer'}


def run_identity(config, dataset_info):
  """What a checkpoint is only meaningful with."""
  return {
    'model': config.model,
    'num_classes': labels_lib.num_classes_of(config),
    'labels': list(labels_lib.names_of(config)),
    'image_size': config.image_size,
    'dataset': dataset_info,
    # The checkpoint's Adam state: one array per parameter, or one flat vector.
    'optimizer_state': 'flat' if config.get('fused_optimizer', False) else 'per_parameter',
  }


def check_or_write_identity(workdir, identity):
  """Refuses to resume a run of another model, label set or dataset."""
  path = os.path.join(workdir, IDENTITY_FILE)
  if not os.path.exists(path):
    if identity['num_classes'] != len(identity['labels']):
      raise RunMismatchError(
        f'config.num_classes={identity["num_classes"]} but the dataset has '
        f'{len(identity["labels"])} labels ({", ".join(identity["labels"])}); leave '
        'num_classes at -1 (the dataset decides).'
      )
    if jax.process_index() == 0:
      write_json_atomic(path, identity)
    return
  with open(path) as f:
    saved = json.load(f)
  saved = {**IDENTITY_OF_OLDER_RUNS, **saved}
  different = sorted(k for k in identity if saved.get(k) != identity[k])
  if different:
    details = '; '.join(
      f'{k}: run has {saved.get(k)!r}, config asks for {identity[k]!r}'
      + (f' (config.{IDENTITY_FIELDS[k]})' if k in IDENTITY_FIELDS else '')
      for k in different
    )
    raise RunMismatchError(
      f'{workdir} holds a different run ({details}). Use a new --workdir, '
      f'or change the config back to match {path}.'
    )


def record_start(workdir, config, split_file):
  """Process 0 writes the config and keeps the dataset's split beside the run."""
  if jax.process_index() != 0:
    return
  write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_dict())
  target = os.path.join(workdir, SPLIT_FILE)
  if split_file and not os.path.exists(target):  # A run's split is its result.
    shutil.copyfile(split_file, f'{target}.tmp')
    os.replace(f'{target}.tmp', target)


def load_config(workdir, data_dir=None):
  """The run's config; `data_dir` says where its dataset lives now.

  Runs saved before paths were recorded absolute hold a data_dir relative to
  the directory they were started from: `data_dir` (evaluate's --data_dir)
  fixes those too.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} not found: {workdir} is not a chexnet_jax run directory '
      '(train one with python -m chexnet_jax.main --workdir ...).'
    )
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if data_dir:
    config.data_dir = os.path.abspath(data_dir)
  return config
