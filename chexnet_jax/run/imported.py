"""A published CheXNet checkpoint made into a run directory (`import_weights`).

Reads arnoweng/CheXNet's model.pth.tar (old 'norm.1' keys, the
'module.densenet121.' prefix, {'state_dict': ...}), any torchvision-layout DenseNet
state dict with a CheXNet head, a Keras .h5, and a pickled whole model such as
jrzech/reproduce-chexnet's checkpoint (model/weights.py reads all four with numpy: no
PyTorch needed, and nothing pickled in the file is run).

The run it writes is what every reader of a run takes (evaluate, predict, score,
compare, the notebook, fine-tuning with init_from=DIR): config.json (the defaults
with the file's model and label count), run.json (the identity, plus IMPORTED: the
file, its sha256, and that it was not trained here) and one checkpoint step (0) of
params and batch_stats. run_reader reads step 0 as 'best' (an imported run has no
validation metrics), and the trainer refuses to resume it (run_dir).

The run is written in a temporary folder beside the target and renamed into place:
a file that does not fit is refused in one sentence and leaves nothing behind.
"""

import contextlib
import os
import re
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np

from chexnet_jax.model import imagenet_weights
from chexnet_jax import errors
from chexnet_jax.model import densenet
from chexnet_jax.model import torch_pickle
from chexnet_jax.model import weights
from chexnet_jax.run import checkpoints
from chexnet_jax.run import run_dir
from chexnet_jax.runtime import files
from configs import default as default_config
from input_pipeline import labels as labels_lib

IMPORTED = run_dir.IMPORTED_KEY
STEP = 0
# What this project feeds the model; the source's own preprocessing may differ
# (arnoweng/CheXNet: resize to 256 and ten 224 crops; jrzech: resize to 224).
PREPROCESSING = (
  'grey image resized whole to 224x224, copied to 3 channels, ImageNet mean/std '
  '(torchvision normalisation)'
)
_LAYER_KEY = re.compile(r'^features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.weight$')


class ImportError_(errors.UserValueError):  # noqa: N801 (ImportError is a builtin)
  """A file that cannot be made into a run; the message names it."""


@flax.struct.dataclass
class ImportedState:
  """What the checkpoint holds: the step and the weights (no optimizer state)."""

  step: jax.Array
  params: dict
  batch_stats: dict


def import_checkpoint(path, workdir, *, data_dir=''):
  """Writes the run at `workdir` from the checkpoint `path`; returns run.json's IMPORTED."""
  path = os.path.abspath(path)
  workdir = os.path.abspath(workdir)
  _check_target(workdir)
  state_dict, file_labels, kind = read_state_dict(path)
  model_name = architecture(state_dict, path)
  label_names = _labels(state_dict, file_labels, path)
  variables = _variables(state_dict, model_name, label_names, file_labels, path)
  config = _config(model_name, label_names, data_dir)
  origin = {
    'file': path,
    'sha256': imagenet_weights.sha256_of(path),
    'format': kind,
    'trained_here': False,
    'labels': "the file's own order"
    + (' (named in the file)' if file_labels else " (CheXNet's 14, as published)"),
    'preprocessing': PREPROCESSING,
    'note': "not trained by chexnet_jax: the split it was trained on is the source's; "
    'evaluate it only on images it never saw',
  }
  identity = run_dir.run_identity(config, label_names, {'name': config.dataset, 'imported': True})
  identity[IMPORTED] = origin
  _write_run(workdir, config, identity, variables)
  return origin


# ----------------------------------------------------------------- reading --


def read_state_dict(path):
  """(torchvision-layout state dict of numpy arrays, the file's label names or None, format)."""
  if not os.path.isfile(path):
    raise ImportError_(f'{path}: no such file; give a .pth/.pth.tar/.pt or .h5 checkpoint.')
  try:
    if path.endswith(('.h5', '.hdf5', '.keras')):
      state_dict, names = weights.read_keras_h5(path)
      return state_dict, names, 'keras'
    try:
      state_dict, names = weights.read_torch_file(path)
      return state_dict, names, 'torch state dict'
    except torch_pickle.UnreadableTorchFile as error:
      if 'Refusing to load' not in str(error):
        raise
    # A pickled whole model (jrzech's): its modules read as inert records.
    return weights.read_pickled_model(path) + ('pickled torch model',)
  except errors.UserError as error:
    if isinstance(error, ImportError_):
      raise
    raise ImportError_(_sentence(path, error)) from error
  except (ValueError, KeyError, OSError) as error:
    raise ImportError_(_sentence(path, error)) from error


def _sentence(path, error):
  """One sentence from a reader's (possibly multi-line) message."""
  text = ' '.join(line.strip() for line in str(error).splitlines() if line.strip())
  return text if path in text else f'cannot import {path}: {text.rstrip(".")}.'


def architecture(state_dict, source):
  """The densenet.ARCHITECTURES name whose blocks, growth and stem the file has."""
  layers = {}
  for key in state_dict:
    match = _LAYER_KEY.match(key)
    if match:
      block, layer = map(int, match.groups())
      layers[block] = max(layers.get(block, 0), layer)
  blocks = tuple(layers[b] for b in sorted(layers))
  stem = np.shape(state_dict[weights._STEM_KEY])[0]  # pylint: disable=protected-access
  growth = next(
    (np.shape(v)[0] for k, v in state_dict.items() if k.endswith('denselayer1.conv2.weight')), 0
  )
  for name, spec in densenet.ARCHITECTURES.items():
    if spec == (blocks, growth, stem):
      return name
  raise ImportError_(
    f'cannot import {source}: its DenseNet (blocks {blocks}, growth {growth}, stem {stem}) is '
    f'none of {", ".join(sorted(densenet.ARCHITECTURES))}.'
  )


def _labels(state_dict, file_labels, source):
  """The run's labels: the file's own, or CheXNet's 14 for a 14-output head without names."""
  head = state_dict.get('classifier.weight')
  outputs = None if head is None else np.shape(head)[0]
  if outputs is None or outputs == weights.IMAGENET_CLASSES:
    raise ImportError_(
      f'cannot import {source}: it has no CheXNet head ('
      + ('none' if outputs is None else 'an ImageNet 1000-way one')
      + '); train from it with --config.init_from instead.'
    )
  if file_labels is not None:
    if len(file_labels) != outputs:
      raise ImportError_(
        f'cannot import {source}: its head has {outputs} outputs but it names '
        f'{len(file_labels)} labels.'
      )
    return tuple(str(n) for n in file_labels)
  if outputs != labels_lib.NUM_CLASSES:
    raise ImportError_(
      f'cannot import {source}: its head has {outputs} outputs and the file names no labels '
      f"(only a {labels_lib.NUM_CLASSES}-output head is taken to be CheXNet's order)."
    )
  return labels_lib.LABELS


def _variables(state_dict, model_name, label_names, file_labels, source):
  """The file's weights as our variables (host float32 numpy); shapes checked whole."""
  model = densenet.create_model(model_name, num_classes=len(label_names))
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  )
  try:
    variables = weights.state_dict_to_variables(
      state_dict, shapes, source=source, file_label_names=file_labels, label_names=label_names
    )
  except ValueError as error:
    problems = '; '.join(line.strip() for line in str(error).splitlines()[1:]) or str(error)
    raise ImportError_(
      f'cannot import {source}: its weights do not fit a {model_name} ({problems}).'
    ) from error
  leaves = jax.tree.leaves(variables)
  if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves):
    raise ImportError_(f"cannot import {source}: it lacks some of the model's weights.")
  bad = [k for k, v in state_dict.items() if not np.all(np.isfinite(v))]
  if bad:
    raise ImportError_(f'cannot import {source}: {bad[0]} holds NaN or infinite values.')
  return jax.tree.map(lambda x: np.asarray(x, np.float32), variables)


# ----------------------------------------------------------------- writing --


def _check_target(workdir):
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise ImportError_(
      f'--workdir {workdir} already exists and is not empty; give a new directory for the run.'
    )


def _config(model_name, label_names, data_dir):
  config = default_config.get_config()
  config.model = model_name
  config.num_classes = len(label_names)
  config.image_size = 224
  config.dataset_image_size = 224
  config.eval_preprocess = 'resize'
  config.dataset = 'chestxray14'
  config.data_dir = os.path.abspath(data_dir) if data_dir else ''
  config.init_from = ''  # The weights are in the checkpoint.
  return config


def _write_run(workdir, config, identity, variables):
  """The whole run in a temporary folder beside `workdir`, renamed into place."""
  parent = os.path.dirname(workdir)
  os.makedirs(parent, exist_ok=True)
  staging = files.staging_dir(parent, prefix=f'.{os.path.basename(workdir)}.import-')
  try:
    files.write_json_atomically(os.path.join(staging, run_dir.CONFIG_FILE), config.to_dict())
    files.write_json_atomically(os.path.join(staging, run_dir.IDENTITY_FILE), identity)
    state = ImportedState(
      step=np.asarray(STEP, np.int32),
      params=variables['params'],
      batch_stats=variables['batch_stats'],
    )
    manager = checkpoints.create_manager(staging, keep=1, best_metric=config.best_metric)
    with contextlib.closing(manager):
      checkpoints.save(manager, state, metrics={})  # None: orbax warns of its best policy.
      checkpoints.wait_until_finished(manager)
    if os.path.isdir(workdir):
      os.rmdir(workdir)  # Empty (checked): the rename needs it gone.
    os.rename(staging, workdir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
