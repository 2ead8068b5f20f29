"""A run directory: what it is a run of, and the config it was trained with.

Layout of a workdir:
  config.json      the config the run was started with, its paths made
                   absolute, so evaluate, predict and the notebook work from
                   any directory; never rewritten once a checkpoint exists
  config_history.jsonl  one line per resume that changed the config: the
                   step, and each field's old and new value (load_config
                   applies them)
  run.lock         held by the run in progress (workdir_lock.py)
  run.json         identity: model, labels, image size, dataset (written once; a
                   change config.allow_changes consents to is recorded)
  split.json       the dataset's split (image names per split), chestxray14 only
  checkpoints/N/   orbax items 'state' and 'data' (see checkpoints.py)
"""

import contextlib
import json
import os
import pathlib
import tempfile
import time

from absl import logging
import jax
import ml_collections

from chexnet_jax.run import checkpoint_files
from chexnet_jax.runtime import files
from chexnet_jax import errors
from chexnet_jax.model import imagenet_weights
from configs import default as default_config
from input_pipeline import labels as labels_lib

CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
IDENTITY_FILE = 'run.json'
SPLIT_FILE = 'split.json'
# Config fields that are file-system paths: made absolute when a run starts.
PATH_FIELDS = ('data_dir', 'init_from')
# Fields a resumed run may change only when named in config.allow_changes:
# they change what the run's steps mean. The model and the label set never
# change on resume (the checkpoint's shapes follow them).
CHANGE_NEEDS_CONSENT = {
  'batch_size': 'the steps, epochs and learning rate follow the global batch',
  'dtype': 'every step computes in it',
  'image_size': "it is the model's input",
  'dataset': 'it is what the run learns from',
}
# Fields older runs' config.json may hold that are no config field now
# (label_names: the run's label set, read from run.json by label_names()).
RETIRED_FIELDS = ('label_names',)
# What a start asks for, not what the run is: never a change.
_NOT_COMPARED = ('allow_changes',)


class RunMismatchError(errors.UserValueError):
  """The workdir holds a run of another model or dataset."""


class DamagedRunError(errors.UserValueError):
  """A file of the run (config.json, run.json) is torn or edited."""


class WorkdirError(errors.UserValueError):
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
  for path in (workdir, checkpoint_files.checkpoint_dir(workdir)):
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


def with_label_count(config, names):
  """A copy of `config` whose num_classes, unless set, is the label set's size."""
  config = config.copy_and_resolve_references()
  if config.num_classes <= 0:
    config.num_classes = len(names)
  return config


def label_names(workdir):
  """The run's label names, in the order of its outputs: run.json's 'labels'. A run
  older than run.json's labels kept them in config.json's label_names ('': NIH's 14)."""
  identity = read_identity(workdir)
  if identity.get('labels'):
    return tuple(identity['labels'])
  names = read_json(os.path.join(workdir, CONFIG_FILE)).get('label_names', '')
  return tuple(names.split(',')) if names else labels_lib.LABELS


def read_identity(workdir):
  """run.json as a dict ({} for a run that predates it)."""
  path = os.path.join(workdir, IDENTITY_FILE)
  if not os.path.exists(path):
    return {}
  return read_json(path)


def read_json(path):
  """A run file's JSON object; one sentence if it is torn or not an object (the
  run writes them whole, so something else cut or edited it)."""
  with open(path) as f:
    text = f.read()
  try:
    value = json.loads(text)
  except ValueError as error:
    value = error
  if not isinstance(value, dict):
    why = value if isinstance(value, ValueError) else 'not a JSON object'
    raise DamagedRunError(
      f'{path} is damaged ({why}); the run writes it whole, so something else cut or '
      'edited it: put back a copy of it, or start the run afresh in a new --workdir.'
    )
  return value


# run.json's record of weights imported from a published checkpoint (run/imported.py):
# the file, its sha256, and that the run was not trained here.
IMPORTED_KEY = 'imported_from'


def weights_origin(workdir):
  """'' for a run trained here; for an imported one, where its weights came from."""
  origin = read_identity(workdir).get(IMPORTED_KEY)
  if not origin:
    return ''
  return (
    f'imported from {os.path.basename(origin["file"])} (sha256 {origin["sha256"][:12]}, '
    f'{origin["format"]}), not trained here; labels in {origin["labels"]}; training split: '
    "the source's"
  )


def train_images(workdir):
  """How many images the run was trained on (run.json's dataset splits), or None."""
  dataset = read_identity(workdir).get('dataset')
  splits = dataset.get('splits') if isinstance(dataset, dict) else None
  return splits.get('train') if isinstance(splits, dict) else None


# Identity fields newer than some runs, with the value those runs had.
IDENTITY_OF_OLDER_RUNS = {'optimizer_state': 'per_parameter'}
# The config field that decides an identity field, where the name differs.
IDENTITY_FIELDS = {'optimizer_state': 'fused_optimizer'}


def run_identity(config, names, dataset_info):
  """What a checkpoint is only meaningful with; `names`: the dataset's label set."""
  return {
    'model': config.model,
    'num_classes': config.num_classes if config.num_classes > 0 else len(names),
    'labels': list(names),
    'image_size': config.image_size,
    'dataset': dataset_info,
    # The checkpoint's Adam state: one array per parameter, or one flat vector.
    'optimizer_state': 'flat' if config.fused_optimizer else 'per_parameter',
  }


def _differing(saved, identity, allowed=()):
  """The identity fields whose recorded value `identity` changes, sorted: the one
  rule both a resume and an evaluation apply (runs older than a field: its old value)."""
  saved = {**IDENTITY_OF_OLDER_RUNS, **saved}
  return sorted(k for k in identity if saved.get(k) != identity[k] and k not in allowed)


def check_or_write_identity(workdir, identity, allowed=()):
  """Refuses to resume a run of another model, label set or dataset; the
  image size and dataset may change when `allowed` (config.allow_changes) names
  them, and run.json then records the new value (what later steps are of)."""
  path = os.path.join(workdir, IDENTITY_FILE)
  if not os.path.exists(path):
    if identity['num_classes'] != len(identity['labels']):
      raise RunMismatchError(
        f'config.num_classes={identity["num_classes"]} but the dataset has '
        f'{len(identity["labels"])} labels ({", ".join(identity["labels"])}); leave '
        'num_classes at -1 (the dataset decides).'
      )
    if jax.process_index() == 0:
      files.write_json_atomically(path, identity, sort_keys=True)
    return
  saved = read_identity(workdir)
  if saved.get(IMPORTED_KEY):
    raise RunMismatchError(
      f'{workdir} holds weights imported from {saved[IMPORTED_KEY]["file"]}, not a training '
      f'run to resume; fine-tune from it with --config.init_from={workdir} and a new --workdir.'
    )
  different = _differing(saved, identity, allowed)
  if different:
    details = '; '.join(
      f'{k}: run has {saved.get(k, IDENTITY_OF_OLDER_RUNS.get(k))!r}, config asks for '
      f'{identity[k]!r}' + (f' (config.{IDENTITY_FIELDS[k]})' if k in IDENTITY_FIELDS else '')
      for k in different
    )
    consent = [k for k in different if k in CHANGE_NEEDS_CONSENT]
    also = f', or add --config.allow_changes={",".join(consent)}' if consent else ''
    raise RunMismatchError(
      f'{workdir} holds a different run ({details}). Use a new --workdir, '
      f'or change the config back to match {path}{also}.'
    )
  consented = _differing(saved, identity)
  if consented and jax.process_index() == 0:  # Evaluations check against the new value.
    files.write_json_atomically(path, {**saved, **{k: identity[k] for k in consented}})


def check_dataset(workdir, dataset_info, split_file):
  """Refuses, in one sentence, to evaluate a run on a dataset other than the one it
  was trained on: run.json's dataset (compared as a resume compares it) and the
  run's split.json against the dataset's (images of its training split would be
  scored as held-out ones). Runs older than run.json are not checked."""
  saved = read_identity(workdir)
  reasons = []
  if 'dataset' in saved and _differing(saved, {'dataset': dataset_info}):
    recorded = saved['dataset'] or {}
    reasons += [
      f'{key}: run.json has {recorded.get(key)!r}, the dataset {dataset_info.get(key)!r}'
      for key in sorted(set(recorded) | set(dataset_info))
      if recorded.get(key) != dataset_info.get(key)
    ]
  run_split = os.path.join(workdir, SPLIT_FILE)
  if split_file and os.path.isfile(split_file) and os.path.isfile(run_split):
    with open(run_split, 'rb') as mine, open(split_file, 'rb') as theirs:
      if json.loads(mine.read()) != json.loads(theirs.read()):
        reasons.append(f"{run_split} differs from the dataset's {split_file}")
  if reasons:
    raise RunMismatchError(
      f'{workdir} was trained on another dataset or split ({"; ".join(reasons)}): its '
      'images would be scored as held-out ones; pass --data_dir with the data_dir that '
      'holds the dataset this run was trained on.'
    )


def allowed_changes(config):
  """The field names in config.allow_changes."""
  return tuple(n.strip() for n in config.allow_changes.split(',') if n.strip())


def has_checkpoint(workdir):
  """True once a step has been saved: from then on the run's config is kept."""
  return bool(checkpoint_files.finished_steps(checkpoint_files.checkpoint_dir(workdir)))


def _effective_config(workdir):
  """config.json with config_history.jsonl's changes applied, or None."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  config = read_json(path)
  for entry in read_history(workdir):
    for field, (_, new) in entry['changes'].items():
      config[field] = new
  return config


def read_history(workdir):
  """The entries of config_history.jsonl, oldest first ([] without one); a
  line torn by a crash mid-append is skipped."""
  path = os.path.join(workdir, HISTORY_FILE)
  if not os.path.exists(path):
    return []
  entries = []
  with open(path) as f:
    for line in f:
      try:
        entries.append(json.loads(line))
      except ValueError:
        continue
  return entries


def config_changes(workdir, config):
  """{field: (the run's value, this start's)} for each field that differs
  from the run's config (original plus recorded changes); {} for a new run or
  a workdir without a checkpoint yet. Refuses, in one sentence, a change of
  CHANGE_NEEDS_CONSENT's fields that config.allow_changes does not name."""
  saved = _effective_config(workdir) if has_checkpoint(workdir) else None
  if saved is None:
    return {}
  asked = config.to_dict()
  changes = {
    k: (saved[k], asked[k])
    for k in sorted(set(saved) & set(asked))
    if k not in _NOT_COMPARED and saved[k] != asked[k]
  }
  refused = [k for k in changes if k in CHANGE_NEEDS_CONSENT and k not in allowed_changes(config)]
  if refused:
    details = '; '.join(
      f'{k}={changes[k][0]!r} -> {changes[k][1]!r} ({CHANGE_NEEDS_CONSENT[k]})' for k in refused
    )
    raise RunMismatchError(
      f'{workdir} was trained with another setting that changes what its steps mean: '
      f'{details}. Add --config.allow_changes={",".join(refused)} to go on with the '
      'change (it is logged and kept in config_history.jsonl), change the config back, '
      'or use a new --workdir.'
    )
  return changes


def record_changes(workdir, changes, step):
  """One log line per changed field; process 0 appends them to config_history.jsonl."""
  for field, (old, new) in changes.items():
    logging.warning(
      'Resuming from step %d with config.%s changed: %r -> %r.', step, field, old, new
    )
  if not changes or jax.process_index() != 0:
    return
  entry = {'step': step, 'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'changes': changes}
  with open(os.path.join(workdir, HISTORY_FILE), 'a') as f:
    f.write(json.dumps(entry, sort_keys=True) + '\n')  # One line: torn at worst, skipped.
    f.flush()
    os.fsync(f.fileno())


def record_start(workdir, config, split_file):
  """Process 0 writes the config (until a checkpoint exists: then the run's
  original is kept) and keeps the dataset's split beside the run."""
  if jax.process_index() != 0:
    return
  if not has_checkpoint(workdir):
    files.write_json_atomically(
      os.path.join(workdir, CONFIG_FILE), config.to_dict(), sort_keys=True
    )
    with contextlib.suppress(FileNotFoundError):  # A start afresh: no history.
      os.remove(os.path.join(workdir, HISTORY_FILE))
  target = os.path.join(workdir, SPLIT_FILE)
  if split_file:  # A run's split is its result: kept, and new only with a consented dataset.
    with open(split_file, 'rb') as f:
      split = f.read()
    if not os.path.exists(target) or pathlib.Path(target).read_bytes() != split:
      files.write_atomically(target, split)


def upgrade_config(saved, workdir=''):
  """An older run's config (a dict from its config.json) with today's fields.

  The one place that knows config.json may predate a field: each field it lacks
  takes its default from configs/default.py, logged in one line, so that every
  tool reading a run (evaluate, predict, report, the notebook, fine-tuning)
  sees the same complete config and none needs a fallback of its own.
  """
  defaults = default_config.get_config().to_dict()
  missing = [field for field in defaults if field not in saved]
  if missing:
    logging.info(
      '%s predates config field(s) %s; using their defaults from configs/default.py: %s.',
      os.path.join(workdir, CONFIG_FILE),
      ', '.join(missing),
      ', '.join(f'{field}={defaults[field]!r}' for field in missing),
    )
  retired = {field: saved[field] for field in RETIRED_FIELDS if field in saved}
  kept = {field: value for field, value in saved.items() if field not in retired}
  return ml_collections.ConfigDict({**defaults, **kept})


def load_config(workdir, data_dir=None):
  """The run's config (config.json and the changes its resumes recorded),
  upgraded to today's fields; `data_dir` says where its dataset lives now.

  Runs saved before paths were recorded absolute hold a data_dir relative to
  the directory they were started from: `data_dir` (evaluate's --data_dir)
  fixes those too.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.UserFileNotFoundError(
      f'{path} not found: {workdir} is not a chexnet_jax run directory '
      '(train one with python -m chexnet_jax.main --workdir ...).'
    )
  config = with_label_count(
    upgrade_config(_effective_config(workdir), workdir), label_names(workdir)
  )
  if data_dir:
    config.data_dir = os.path.abspath(data_dir)
  return config
