"""`torch.save` files read with numpy alone: no PyTorch, and no pickled code run.

A `.pth` file is a pickle of containers and tensors. The pickle names the Python
functions that rebuild it; a restricted unpickler resolves only the tensor-rebuild
functions (`torch._utils._rebuild_tensor`, `_rebuild_tensor_v2`,
`_rebuild_parameter`), the typed storages (`torch.FloatStorage`, ...) and
`collections.OrderedDict`, each to a numpy stand-in, and refuses every other name
before anything is called. Tensors come back as numpy arrays.

Both formats torch has written since 2017 are read:
- zip (torch >= 1.6's default): `<name>/data.pkl`, the storages' raw bytes in
  `<name>/data/<key>`, and `<name>/byteorder`;
- legacy (torch 0.2 to 1.5, and `_use_new_zipfile_serialization=False`): four
  pickles in a row (magic number, protocol, system info, the object), the list of
  storage keys, then each storage as an 8-byte element count and its bytes. The
  published torchvision DenseNet files (densenet121-a639ec97.pth, 2017) are legacy.
The older tar format (torch < 0.1.10) is refused, as torch's weights_only is.
"""

import collections
import dataclasses
import pickle
import struct
import tarfile
import zipfile

import numpy as np

from chexnet_jax import errors

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
# torch storage type -> numpy dtype (bfloat16: its raw 16 bits, widened on read).
STORAGE_DTYPES = {
  'DoubleStorage': np.float64,
  'FloatStorage': np.float32,
  'HalfStorage': np.float16,
  'BFloat16Storage': np.uint16,
  'LongStorage': np.int64,
  'IntStorage': np.int32,
  'ShortStorage': np.int16,
  'CharStorage': np.int8,
  'ByteStorage': np.uint8,
  'BoolStorage': np.bool_,
}


class UnreadableTorchFile(errors.UserValueError):
  """The file is not a torch.save file of tensors and plain containers."""


@dataclasses.dataclass(frozen=True)
class StorageType:
  name: str


@dataclasses.dataclass
class _Storage:
  """A storage named by the pickle; its bytes arrive later (legacy) or on demand."""

  key: str
  type_name: str
  offset: int = 0  # In elements, for a legacy view of a larger storage.


@dataclasses.dataclass
class _Tensor:
  """A tensor to build once the storages are read."""

  storage: _Storage
  offset: int
  shape: tuple
  stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _Tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, metadata=None):
  del requires_grad, hooks, metadata  # Autograd state: irrelevant to the values.
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
  del requires_grad, hooks, state
  return data


_ALLOWED = {
  ('collections', 'OrderedDict'): collections.OrderedDict,
  ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
  ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
  ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
  ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
  # Files saved from GPU tensors name torch.cuda's storages (as torch.load, read to the CPU).
  **{
    (module, name): StorageType(name)
    for module in ('torch', 'torch.cuda')
    for name in STORAGE_DTYPES
  },
}


# A whole pickled model (jrzech/reproduce-chexnet's checkpoint) names its module
# classes; with load(..., modules=True) those of these packages become inert
# ModuleRecord classes: an instance only receives its pickled attributes
# (_parameters, _buffers, _modules, ...), no method of the real class exists or runs.
MODULE_PACKAGES = ('torch.nn.modules.', 'torch.nn.parallel.', 'torchvision.models.')
_MODULE_HELPERS = {
  **{(module, 'set'): set for module in ('builtins', '__builtin__')},  # Protocol 2: Python 2's.
  **{(module, 'dict'): dict for module in ('builtins', '__builtin__')},
  ('torch', 'device'): lambda *args: ':'.join(map(str, args)),
  ('collections', 'defaultdict'): lambda *args: {},
}


class ModuleRecord:
  """The pickled attributes of a torch.nn.Module, and the class it was (`kind`)."""

  kind = ''


_RECORD_CLASSES = {}


def _record_class(module, name):
  key = f'{module}.{name}'
  if key not in _RECORD_CLASSES:
    _RECORD_CLASSES[key] = type(name, (ModuleRecord,), {'kind': key})
  return _RECORD_CLASSES[key]


def module_state_dict(record, prefix=''):
  """nn.Module.state_dict() of a ModuleRecord tree: parameters and persistent buffers."""
  state = {}
  skip = set(getattr(record, '_non_persistent_buffers_set', ()) or ())
  for name, value in (getattr(record, '_parameters', None) or {}).items():
    if value is not None:
      state[prefix + name] = value
  for name, value in (getattr(record, '_buffers', None) or {}).items():
    if value is not None and name not in skip:
      state[prefix + name] = value
  for name, child in (getattr(record, '_modules', None) or {}).items():
    if isinstance(child, ModuleRecord):
      state.update(module_state_dict(child, f'{prefix}{name}.'))
  return state


class _Unpickler(pickle.Unpickler):
  """Resolves only _ALLOWED's names; the storages through persistent ids."""

  def __init__(self, file, path, storages, modules=False):
    super().__init__(file, encoding='utf-8')  # As torch.load: Python 2 str -> str.
    self._path, self._storages, self._modules = path, storages, modules

  def find_class(self, module, name):
    allowed = _ALLOWED.get((module, name))
    if allowed is None and self._modules:
      if module.startswith(MODULE_PACKAGES):
        return _record_class(module, name)
      allowed = _MODULE_HELPERS.get((module, name))
    if allowed is None:
      raise UnreadableTorchFile(
        f'Refusing to load {self._path}: its pickle names {module}.{name}, which is not a '
        'tensor, a storage or a plain container, and unpickling it could run arbitrary code; '
        're-save it with trusted code as a plain state dict (torch.save(model.state_dict(), ...)).'
      )
    return allowed

  def persistent_load(self, pid):
    if self._modules and isinstance(pid, tuple) and pid and _ascii(pid[0]) == 'module':
      return pid[1]  # A module class saved with its source: the record class found above.
    if not (isinstance(pid, tuple) and pid and _ascii(pid[0]) == 'storage'):
      raise UnreadableTorchFile(
        f'{self._path}: its pickle refers to {_ascii(pid[0]) if pid else pid!r} objects, '
        'not storages; only state dicts of tensors can be read.'
      )
    type_, key = pid[1], _ascii(pid[2])
    if not isinstance(type_, StorageType):
      raise UnreadableTorchFile(f'{self._path}: storage {key} has no storage type.')
    view = pid[5] if len(pid) > 5 else None  # Legacy: (view key, offset, size).
    storage = self._storages.setdefault(key, _Storage(key, type_.name))
    if view is None:
      return storage
    return _Storage(key, type_.name, offset=int(view[1]))


def _ascii(value):
  return value.decode('ascii') if isinstance(value, bytes) else str(value)


def load(path, modules=False):
  """The object `torch.save` wrote to `path`, every tensor a numpy array.

  modules=True also reads a pickled whole model: its torch.nn / torchvision modules
  come back as ModuleRecords (module_state_dict gives their weights); nothing of the
  file is run either way.
  """
  path = str(path)
  try:
    if zipfile.is_zipfile(path):
      return _load_zip(path, modules)
    if tarfile.is_tarfile(path):
      raise UnreadableTorchFile(
        f'{path} is in the tar format of torch < 0.1.10, which is not read (nor by '
        "torch.load's weights_only); re-save it with a newer torch."
      )
    with open(path, 'rb') as f:
      return _load_legacy(f, path, modules)
  except UnreadableTorchFile:
    raise
  except (
    pickle.UnpicklingError,
    EOFError,
    struct.error,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
  ) as error:
    raise UnreadableTorchFile(
      f'{path} is not a readable torch.save file ({type(error).__name__}: {error}); '
      'download or export it again.'
    ) from None
  except (OSError, zipfile.BadZipFile) as error:
    raise UnreadableTorchFile(f'Cannot read {path} ({error}).') from None


def _load_zip(path, modules=False):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pickles) != 1:
      raise UnreadableTorchFile(
        f'{path} is a zip archive without one data.pkl inside (a TorchScript or other '
        'archive, not a torch.save state dict); save it with torch.save(state_dict, ...).'
      )
    prefix = pickles[0][: -len('data.pkl')]
    storages = {}
    with archive.open(pickles[0]) as f:
      result = _Unpickler(f, path, storages, modules).load()
    big = prefix + 'byteorder' in names and archive.read(prefix + 'byteorder') == b'big'
    order = '>' if big else '<'  # Files without the record are little-endian.
    data = {key: archive.read(f'{prefix}data/{key}') for key in storages}
  return _build(result, {key: _array(data[key], s.type_name, order) for key, s in storages.items()})


def _load_legacy(f, path, modules=False):
  header = _Unpickler(f, path, {})
  if header.load() != _LEGACY_MAGIC:
    raise UnreadableTorchFile(
      f'{path} is not a torch.save file (no torch magic number); check that it is a .pth '
      'state dict.'
    )
  if header.load() != _LEGACY_PROTOCOL:
    raise UnreadableTorchFile(f'{path}: unknown torch serialization protocol.')
  info = header.load()
  order = '<' if info.get('little_endian', True) else '>'
  storages = {}
  result = _Unpickler(f, path, storages, modules).load()
  keys = [_ascii(k) for k in _Unpickler(f, path, {}).load()]
  arrays = {}
  for key in keys:
    (count,) = struct.unpack(order + 'q', f.read(8))
    type_name = storages[key].type_name
    size = count * np.dtype(STORAGE_DTYPES[type_name]).itemsize
    data = f.read(size)
    if len(data) != size:
      raise UnreadableTorchFile(f'{path} is truncated (storage {key} is cut short).')
    arrays[key] = _array(data, type_name, order)
  return _build(result, arrays)


def _array(data, type_name, order):
  dtype = np.dtype(STORAGE_DTYPES[type_name]).newbyteorder(order)
  array = np.frombuffer(data, dtype=dtype)
  if type_name == 'BFloat16Storage':  # The top half of a float32.
    return (array.astype(np.uint32) << 16).view(np.float32)
  return array.astype(array.dtype.newbyteorder('='))


def _build(obj, arrays):
  """`obj` with every _Tensor made an array (containers rebuilt, not mutated)."""
  if isinstance(obj, _Tensor):
    return _tensor_array(obj, arrays)
  if isinstance(obj, dict):
    out = type(obj)((k, _build(v, arrays)) for k, v in obj.items())
    if hasattr(obj, '__dict__'):
      out.__dict__.update(obj.__dict__)  # state_dict()'s _metadata.
    return out
  if isinstance(obj, (list, tuple)):
    return type(obj)(_build(v, arrays) for v in obj)
  if isinstance(obj, ModuleRecord):
    obj.__dict__.update({k: _build(v, arrays) for k, v in vars(obj).items()})
  return obj


def _tensor_array(tensor, arrays):
  storage = arrays[tensor.storage.key]
  itemsize = storage.dtype.itemsize
  offset = tensor.storage.offset + tensor.offset
  return np.ndarray(
    tensor.shape,
    storage.dtype,
    buffer=storage,
    offset=offset * itemsize,
    strides=tuple(s * itemsize for s in tensor.stride),
  ).copy()
