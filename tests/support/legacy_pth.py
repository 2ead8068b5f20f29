"""Writes a `.pth` file as torch 0.2-0.3 did, without torch: the format of the
published torchvision DenseNet files (densenet121-a639ec97.pth, 2017).

torch 0.3's `torch.save`: four pickles in a row (magic number, protocol 1001,
system info, the object), the object's tensors pickled as
`torch._utils._rebuild_tensor(storage, offset, size, stride)` and its storages as
persistent ids ('storage', torch.FloatStorage, key, location, size, view), then
the pickled list of storage keys, then each storage as an 8-byte little-endian
element count followed by its bytes.
"""

import collections
import pickle
import struct

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_TYPES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.int64): 'LongStorage'}


class Global:
  """A global referenced by name only (module need not be importable here)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle insists that a reduce function be callable.
    raise TypeError(f'{self.module}.{self.name} is only a name here.')


class _Storage:
  def __init__(self, key, array):
    self.key, self.array = key, array


class _Tensor:
  def __init__(self, storage, array):
    self.storage, self.array = storage, array

  def __reduce__(self):
    stride = tuple(s // self.array.itemsize for s in self.array.strides)
    args = (self.storage, 0, tuple(self.array.shape), stride)
    return Global('torch._utils', '_rebuild_tensor'), args


class _Pickler(pickle._Pickler):  # The Python pickler: its dispatch table can be extended.
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_by_name(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())

  dispatch[Global] = _save_by_name

  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      type_name = _STORAGE_TYPES[obj.array.dtype]
      # Saved from the GPU, as the published files were: torch.cuda's storage types.
      storage_type = Global('torch.cuda', type_name)
      return ('storage', storage_type, obj.key, 'cuda:0', obj.array.size, None)
    return None


def _dump(obj, f):
  _Pickler(f, protocol=2).dump(obj)


def write(path, state_dict, extra=None):
  """Writes {name: numpy array} (plus `extra` entries, pickled as they are)."""
  storages, tensors = [], collections.OrderedDict()
  for i, (name, value) in enumerate(state_dict.items()):
    array = np.array(value, order='C')  # (ascontiguousarray makes scalars 1-d.)
    storage = _Storage(str(1000 + i), array.reshape(-1))
    storages.append(storage)
    tensors[name] = _Tensor(storage, array)
  obj = tensors if extra is None else {**extra, 'state_dict': tensors}
  with open(path, 'wb') as f:
    _dump(MAGIC, f)
    _dump(1001, f)
    _dump({'protocol_version': 1001, 'little_endian': True, 'type_sizes': {'int': 4}}, f)
    _dump(obj, f)
    _dump([s.key for s in storages], f)
    for s in storages:
      f.write(struct.pack('<q', s.array.size))
      f.write(s.array.astype(s.array.dtype.newbyteorder('<')).tobytes())
  return path
