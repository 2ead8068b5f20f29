"""Pretrained DenseNet weights: torchvision .pth, CheXNet reproductions, Keras .h5.

Everything is first turned into a torchvision-style state dict (numpy arrays,
torchvision names and layouts), then copied onto our variables by name; densenet.py
uses torchvision's module names, so that last step is a rename of leaves only.

Supported files:
- torchvision `.pth` state dicts (also the old 'norm.1'/'conv.1' key style of the
  published densenet files, 'module.' prefixes and {'state_dict': ...} wrappers),
  read without PyTorch by chexnet_jax.model.torch_pickle: files holding pickled objects
  other than tensors and plain containers are refused, never unpickled.
- CheXNet reproductions such as arnoweng/CheXNet ('module.densenet121.features...',
  head 'densenet121.classifier.0.weight' with 14 outputs).
- Keras '.h5' (legacy: keras-applications files, `model.save('x.h5')`) and Keras 3
  '.weights.h5' / '.keras', read with h5py (no Keras needed). Keras 3 files name
  layers by class and creation count, so Keras weights are matched by order, the
  architecture being read off the kernel shapes (keras_layers_to_state_dict).

Head: a 1000-way ImageNet head is dropped (ours keeps its fresh initialisation).
Other heads must have our number of outputs. A file that carries label names (a
'label_names' entry beside the state dict of a .pth, or a 'label_names' attribute
on the root of an .h5) is mapped by name onto `label_names` (default: the
canonical CheXNet order); a file without names is assumed to be in the canonical
CheXNet order (Atelectasis ... Hernia), as arnoweng/CheXNet and its descendants are.
"""

import io
import logging
import os
import pickle
import re
import zipfile

from flax import traverse_util
from flax.core import unfreeze
import jax.numpy as jnp
import numpy as np

from chexnet_jax.model import torch_pickle
from input_pipeline import labels as labels_lib

IMAGENET_CLASSES = 1000
# torchvision's remap of the old key style ('denselayer1.norm.1.weight').
_OLD_KEY = re.compile(
  r'^(.*denselayer\d+\.(?:norm|relu|conv))\.'
  r'((?:[12])\.(?:weight|bias|running_mean|running_var))$'
)
_STEM_KEY = 'features.conv0.weight'
_MAX_LISTED = 12


def load_pretrained(path, variables, *, label_names=None):
  """Returns `variables` with the DenseNet weights in `path` copied in.

  `variables`: {'params', 'batch_stats'} of a models.DenseNet. `label_names`:
  the names of our outputs, used only when the file carries its own names.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Weights file {path} (config.init_from) not found.')
  if path.endswith(('.h5', '.hdf5', '.keras')):
    state_dict, file_labels = read_keras_h5(path)
  else:
    state_dict, file_labels = read_torch_file(path)
  return state_dict_to_variables(
    state_dict, variables, source=path, file_label_names=file_labels, label_names=label_names
  )


# ----------------------------------------------------------------------------
# torch files


def read_torch_file(path, *, reader='numpy'):
  """(torchvision-style state dict of numpy arrays, label names or None).

  reader='numpy' (the default; no PyTorch needed): chexnet_jax.model.torch_pickle, a
  restricted unpickler. reader='torch': torch.load(weights_only=True), where torch
  is installed; the tests check that both give identical arrays.
  """
  if reader == 'torch':
    checkpoint = _torch_load(path)
  else:
    checkpoint = torch_pickle.load(path)
  state_dict, label_names = _unwrap_checkpoint(checkpoint, path)
  arrays = {k: _float_array(v) for k, v in state_dict.items() if _is_tensor(v)}
  return normalize_torch_keys(arrays, path), label_names


def read_pickled_model(path):
  """(torchvision-style state dict, None) of a pickled whole model, such as
  jrzech/reproduce-chexnet's checkpoint ({'model': DenseNet, 'epoch': ...}).

  Read by torch_pickle with modules=True: the torch.nn and torchvision module
  classes it names become inert records of their attributes, whose parameters and
  buffers make the state dict; no code of the file runs and PyTorch is not needed.
  """
  checkpoint = torch_pickle.load(path, modules=True)
  model = checkpoint.get('model', checkpoint) if isinstance(checkpoint, dict) else checkpoint
  if not isinstance(model, torch_pickle.ModuleRecord):
    raise ValueError(
      f'{path} holds a {type(model).__name__}, neither a state dict nor a pickled torch.nn model.'
    )
  state_dict = torch_pickle.module_state_dict(model)
  arrays = {k: _float_array(v) for k, v in state_dict.items() if _is_tensor(v)}
  return normalize_torch_keys(arrays, path), None


def _is_tensor(value):
  return isinstance(value, np.ndarray) or hasattr(value, 'detach')


def _float_array(value):
  if hasattr(value, 'detach'):  # A torch tensor (reader='torch').
    return value.detach().float().numpy()
  return np.asarray(value, np.float32)


def _torch_load(path):
  import torch  # pylint: disable=g-import-not-at-top

  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise ValueError(
      f'Refusing to load {path}: it holds pickled Python objects, not just '
      'tensors, and unpickling them could run arbitrary code. Re-save it with '
      'trusted code as a plain state dict: torch.save(model.state_dict(), '
      f'...). (torch: {_unsupported_global(e)})'
    ) from e


def _unsupported_global(error):
  """The line of torch's long weights_only message that names the culprit."""
  lines = str(error).splitlines()
  return next((line.strip() for line in lines if 'GLOBAL' in line), lines[0])


def _unwrap_checkpoint(checkpoint, path):
  if not isinstance(checkpoint, dict):
    raise ValueError(
      f'{path} holds a {type(checkpoint).__name__}, expected a state dict (dict of tensors).'
    )
  label_names = checkpoint.get('label_names')
  for key in ('state_dict', 'model_state_dict', 'model'):
    if isinstance(checkpoint.get(key), dict):
      return checkpoint[key], label_names
  return checkpoint, label_names


def normalize_torch_keys(state_dict, source='state dict'):
  """Strips wrapper prefixes ('module.', 'densenet121.'), remaps old-style keys."""
  stems = [k for k in state_dict if k.endswith(_STEM_KEY)]
  if len(stems) != 1:
    raise ValueError(
      f'{source}: expected exactly one key ending in '
      f'{_STEM_KEY!r}, found {stems or "none"}; is this a '
      f'DenseNet? First keys: {list(state_dict)[:5]}'
    )
  prefix = stems[0][: -len(_STEM_KEY)]
  out = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      raise ValueError(
        f'{source}: key {key!r} lacks the prefix {prefix!r} shared by the DenseNet keys.'
      )
    key = _OLD_KEY.sub(r'\1\2', key[len(prefix) :])
    out[key.replace('classifier.0.', 'classifier.')] = value
  return out


# ----------------------------------------------------------------------------
# Keras files


def read_keras_h5(path):
  """(torchvision-style state dict, label names or None) from a Keras file.

  '.weights.h5' and '.keras' (a zip holding model.weights.h5) are Keras 3
  files; other '.h5'/'.hdf5' files are legacy Keras weights or whole models.
  """
  with _open_h5(path) as f:
    label_names = f.attrs.get('label_names')
    if label_names is not None:
      label_names = [_as_str(n) for n in label_names]
    if path.endswith(('.weights.h5', '.keras')):
      layers = _keras3_layers(f)
    else:
      layers = _legacy_h5_layers(f['model_weights'] if 'model_weights' in f else f)
  return keras_layers_to_state_dict(layers, source=path), label_names


def _open_h5(path):
  # Imported here: only Keras files need h5py, and the benchmark's GPU machine
  # (jax, flax, optax) has none, yet imports this module through train_state.
  import h5py  # pylint: disable=g-import-not-at-top

  if not path.endswith('.keras'):
    return h5py.File(path, 'r')
  with zipfile.ZipFile(path) as archive:
    if 'model.weights.h5' not in archive.namelist():
      raise ValueError(
        f'{path}: no model.weights.h5 inside; not a Keras 3 '
        f'.keras file (it holds {archive.namelist()}).'
      )
    return h5py.File(io.BytesIO(archive.read('model.weights.h5')), 'r')


def _as_str(name):
  return name.decode() if isinstance(name, bytes) else str(name)


def _legacy_h5_layers(group):
  """Layer weight lists in model order (the 'layer_names' attribute)."""
  if 'layer_names' not in group.attrs:
    raise ValueError(
      f'{group.file.filename}: no "layer_names" attribute; not '
      'a Keras weights file (Keras 3 files end in .weights.h5).'
    )
  layers = []
  for layer in map(_as_str, group.attrs['layer_names']):
    names = [_as_str(n) for n in group[layer].attrs['weight_names']]
    if names:  # Activations, pooling etc. are listed too, without weights.
      layers.append([np.asarray(group[layer][n]) for n in names])
  return layers


def _keras3_layers(f):
  """Keras 3 names layers by class and creation count ('conv2d_12'): order by it."""
  found = []

  def visit(name, obj):
    is_group = hasattr(obj, 'keys')  # Datasets have no keys.
    if is_group and 'vars' in obj and len(obj['vars']):
      layer = name.rsplit('/', 1)[-1]
      kind, _, count = re.fullmatch(r'(.*?)(_(\d+))?', layer).group(1, 2, 3)
      variables = obj['vars']
      weights = [np.asarray(variables[str(i)]) for i in range(len(variables))]
      found.append((kind, int(count or 0), weights))

  f.visititems(visit)
  found.sort(key=lambda item: item[:2])
  return [weights for _, _, weights in found]


def keras_layers_to_state_dict(layers, source='Keras model'):
  """torchvision-style state dict from Keras DenseNet layer weights in model order.

  `layers`: for each layer with weights, its weight list as Keras orders it
  (Conv2D: [kernel]; BatchNormalization: [gamma, beta, mean, var]; Dense:
  [kernel, bias]). Only the relative order within each kind matters, e.g.
  `[l.get_weights() for l in model.layers if l.weights]`.
  """
  convs, norms, heads = _split_by_kind(layers, source)
  if len(heads) > 1 or len(norms) != len(convs) + 1:
    raise ValueError(
      f'{source}: {len(convs)} convolutions, {len(norms)} batch '
      f'norms and {len(heads)} dense layers do not form a DenseNet.'
    )
  names = _torchvision_module_names(convs, source)
  state_dict = {}
  # Keras order: conv0, norm0, then (norm, conv) pairs, then the final norm5.
  for module, kernel in zip(names['conv'], convs):
    state_dict[f'{module}.weight'] = np.transpose(kernel, (3, 2, 0, 1))
  for module, (gamma, beta, mean, var) in zip(names['norm'], norms):
    state_dict.update(
      {
        f'{module}.weight': gamma,
        f'{module}.bias': beta,
        f'{module}.running_mean': mean,
        f'{module}.running_var': var,
      }
    )
  if heads:
    kernel, bias = heads[0]
    state_dict['classifier.weight'] = kernel.T
    state_dict['classifier.bias'] = bias
  return state_dict


def _split_by_kind(layers, source):
  convs, norms, heads = [], [], []
  for weights in layers:
    shapes = [np.shape(w) for w in weights]
    if len(weights) == 1 and len(shapes[0]) == 4:
      convs.append(np.asarray(weights[0]))
    elif len(weights) == 4 and all(len(s) == 1 for s in shapes):
      norms.append([np.asarray(w) for w in weights])
    elif len(weights) == 2 and len(shapes[0]) == 2:
      heads.append([np.asarray(w) for w in weights])
    else:
      raise ValueError(
        f'{source}: a layer with weight shapes {shapes} is not '
        'part of a DenseNet (bias-free conv, BN, dense head).'
      )
  return convs, norms, heads


def _torchvision_module_names(convs, source):
  """Module names of each conv and norm, reading the architecture off the kernels.

  After the stem, a 1x1 conv followed by a 3x3 conv is a dense layer's bottleneck;
  a 1x1 conv followed by another 1x1 conv (or nothing) is a transition.
  """
  conv_names, norm_names = ['features.conv0'], ['features.norm0']
  block, layer, i = 1, 0, 1
  while i < len(convs):
    next_is_3x3 = i + 1 < len(convs) and convs[i + 1].shape[0] == 3
    if convs[i].shape[0] == 1 and next_is_3x3:
      layer += 1
      base = f'features.denseblock{block}.denselayer{layer}'
      conv_names += [f'{base}.conv1', f'{base}.conv2']
      norm_names += [f'{base}.norm1', f'{base}.norm2']
      i += 2
    elif convs[i].shape[0] == 1 and layer > 0:
      conv_names.append(f'features.transition{block}.conv')
      norm_names.append(f'features.transition{block}.norm')
      block, layer, i = block + 1, 0, i + 1
    else:
      raise ValueError(
        f'{source}: convolution {i} (kernel {convs[i].shape}) '
        'does not fit the DenseNet layer pattern.'
      )
  return {'conv': conv_names, 'norm': norm_names + ['features.norm5']}


# ----------------------------------------------------------------------------
# state dict -> Flax variables


def state_dict_to_variables(
  state_dict, variables, *, source='state dict', file_label_names=None, label_names=None
):
  """Copies a torchvision-style DenseNet state dict (numpy) onto `variables`."""
  state_dict = dict(state_dict)
  head = {k: state_dict.pop(k) for k in ('classifier.weight', 'classifier.bias') if k in state_dict}
  target = traverse_util.flatten_dict(unfreeze(variables))
  converted = {}
  for key, value in state_dict.items():
    if not key.endswith('num_batches_tracked'):
      converted[_flax_path(key, value)] = (key, value)
  _check_against_model(converted, target, source)
  new = dict(target)
  for path, (_, value) in converted.items():
    if np.ndim(value) == 4:  # torch OIHW -> Flax HWIO.
      value = np.transpose(value, (2, 3, 1, 0))
    new[path] = jnp.asarray(value, target[path].dtype)
  new.update(_head_leaves(head, target, source, file_label_names, label_names))
  return traverse_util.unflatten_dict(new)


def _flax_path(key, value):
  """'features.denseblock1.denselayer1.norm1.weight' -> Flax variable path."""
  *modules, leaf = key.split('.')
  modules = tuple(m for m in modules if m != 'features')
  if leaf == 'running_mean':
    return ('batch_stats',) + modules + ('mean',)
  if leaf == 'running_var':
    return ('batch_stats',) + modules + ('var',)
  if leaf == 'weight' and np.ndim(value) == 4:
    return ('params',) + modules + ('kernel',)
  if leaf == 'weight':
    return ('params',) + modules + ('scale',)
  return ('params',) + modules + (leaf,)


def _check_against_model(converted, target, source):
  """Raises one error listing every missing, unexpected and misshapen key."""
  body = {p for p in target if p[1] != 'classifier'}
  unexpected = [key for p, (key, _) in converted.items() if p not in target]
  missing = ['/'.join(p) for p in sorted(body - set(converted))]
  misshapen = [
    f'{key}: file {np.shape(v)} vs model {_file_shape(key, target[p])}'
    for p, (key, v) in converted.items()
    if p in target and np.shape(v) != _file_shape(key, target[p])
  ]
  problems = [
    (title, keys)
    for title, keys in (
      ('unexpected keys', unexpected),
      ('model variables missing from the file', missing),
      ('shape mismatches', misshapen),
    )
    if keys
  ]
  if problems:
    lines = [f'{title} ({len(keys)}): {keys[:_MAX_LISTED]}' for title, keys in problems]
    raise ValueError(
      f'{source} does not match the model (check config.model, '
      'e.g. densenet121 vs densenet169):\n  ' + '\n  '.join(lines)
    )


def _file_shape(key, leaf):
  """Shape a file entry must have to fit `leaf` (torch stores conv kernels OIHW)."""
  shape = tuple(leaf.shape)
  return shape[::-1][:2] + shape[:2] if len(shape) == 4 else shape


def _head_leaves(head, target, source, file_label_names, label_names):
  """Head leaves to overwrite: none (keep ours) for a missing or ImageNet head."""
  kernel = target[('params', 'classifier', 'kernel')]
  num_features, num_classes = kernel.shape
  if not head:
    return {}
  weight, bias = head['classifier.weight'], head['classifier.bias']
  if weight.shape[0] == IMAGENET_CLASSES != num_classes:
    logging.info('%s: dropping the ImageNet head; ours stays fresh.', source)
    return {}
  if file_label_names is not None:
    rows = _label_rows(file_label_names, label_names, source)
    weight, bias = weight[rows], bias[rows]
  if weight.shape != (num_classes, num_features):
    raise ValueError(
      f'{source}: classifier.weight has shape {weight.shape}, the model needs '
      f'({num_classes}, {num_features}) (config.num_classes={num_classes}); '
      'only 1000-way ImageNet heads are dropped automatically.'
    )
  return {
    ('params', 'classifier', 'kernel'): jnp.asarray(weight.T),
    ('params', 'classifier', 'bias'): jnp.asarray(bias),
  }


def _label_rows(file_label_names, label_names, source):
  """Row of the file's head for each of our labels, in our order."""
  if label_names is None:
    label_names = labels_lib.LABELS
  file_label_names = [str(n) for n in file_label_names]
  absent = [n for n in label_names if n not in file_label_names]
  if absent:
    raise ValueError(f'{source}: its head lacks labels {absent}; it has {file_label_names}.')
  return [file_label_names.index(n) for n in label_names]


# ----------------------------------------------------------------------------
# Flax variables -> state dict (export)


def variables_to_state_dict(variables):
  """torchvision's DenseNet state dict (numpy, torchvision names and layouts) of
  `variables`: the inverse of state_dict_to_variables, num_batches_tracked included
  (as torchvision's own state dicts have it)."""
  state_dict = {}
  for path, value in traverse_util.flatten_dict(unfreeze(variables)).items():
    collection, *modules, leaf = path
    module = '.'.join(modules) if modules[0] == 'classifier' else 'features.' + '.'.join(modules)
    value = np.asarray(value, np.float32)
    if collection == 'batch_stats':
      name = {'mean': 'running_mean', 'var': 'running_var'}[leaf]
      state_dict[f'{module}.num_batches_tracked'] = np.zeros((), np.int64)
    elif leaf == 'kernel' and value.ndim == 4:  # Flax HWIO -> torch OIHW.
      name, value = 'weight', np.transpose(value, (3, 2, 0, 1))
    elif leaf == 'kernel':  # Dense [in, out] -> torch Linear [out, in].
      name, value = 'weight', value.T
    else:
      name = {'scale': 'weight'}.get(leaf, leaf)
    state_dict[f'{module}.{name}'] = np.ascontiguousarray(value)
  return state_dict
