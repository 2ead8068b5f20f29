"""chexnet_jax.model.torch_pickle: torch.save files read with numpy alone.

Where torch is installed, every format it writes (zip, legacy) and the 2017
format of torchvision's DenseNet files must read to the very arrays torch.load
gives; a pickle naming anything but tensors, storages and plain containers is
refused before anything runs; any unreadable file is one sentence.
"""

import collections
import io
import pickle
import tarfile
import zipfile

import numpy as np
import pytest

from chexnet_jax.model import torch_pickle
from chexnet_jax.model import weights
from tests.support import legacy_pth


def _leave_marker(path):
  with open(path, 'w') as f:
    f.write('ran')


class Malicious:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return _leave_marker, (self.marker,)


def _densenet_like(rng):
  """A few torchvision-named entries, enough for read_torch_file's key checks."""
  return collections.OrderedDict(
    [
      ('features.conv0.weight', rng.normal(size=(8, 3, 3, 3)).astype(np.float32)),
      ('features.norm0.weight', rng.normal(size=8).astype(np.float32)),
      ('features.norm0.running_var', rng.random(8).astype(np.float32) + 0.5),
      ('features.norm0.num_batches_tracked', np.array(12, np.int64)),
      ('classifier.weight', rng.normal(size=(1000, 8)).astype(np.float32)),
    ]
  )


def _assert_same(ours, theirs):
  assert list(ours) == list(theirs)
  for key in theirs:
    assert ours[key].dtype == theirs[key].dtype, key
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_every_torch_format_reads_as_torch_load_does(tmp_path):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  base = torch.from_numpy(rng.normal(size=(4, 6)).astype(np.float32))
  tensors = collections.OrderedDict(
    transposed=base.t(),  # Strides that are not the shape's.
    row_view=base[2],  # An offset into a shared storage.
    half=torch.from_numpy(rng.normal(size=5).astype(np.float16)),
    bfloat16=torch.from_numpy(rng.normal(size=5).astype(np.float32)).to(torch.bfloat16),
    count=torch.tensor(7),
    mask=torch.tensor([True, False]),
  )
  for zipped in (True, False):
    path = tmp_path / f'zip{zipped}.pth'
    torch.save(
      {'sd': tensors, 'label_names': ['a', 'b']}, path, _use_new_zipfile_serialization=zipped
    )
    ours = torch_pickle.load(path)
    theirs = torch.load(path, weights_only=True)
    assert ours['label_names'] == ['a', 'b']
    _assert_same(
      ours['sd'],
      {
        k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        for k, v in theirs['sd'].items()
      },
    )


def test_both_readers_give_identical_state_dicts(tmp_path):
  """read_torch_file: the numpy reader and torch.load(weights_only=True) agree on
  a torch.save file and on a file in the published DenseNet files' 2017 format."""
  torch = pytest.importorskip('torch')
  state_dict = _densenet_like(np.random.default_rng(1))
  zipped = tmp_path / 'zip.pth'
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, zipped)
  legacy = legacy_pth.write(tmp_path / 'legacy.pth', state_dict)
  for path in (zipped, legacy):
    ours, ours_labels = weights.read_torch_file(path)
    theirs, theirs_labels = weights.read_torch_file(path, reader='torch')
    _assert_same(ours, theirs)
    assert ours_labels is theirs_labels is None
    np.testing.assert_array_equal(
      ours['features.conv0.weight'], state_dict['features.conv0.weight']
    )


def test_the_2017_format_reads_without_torch(tmp_path):
  state_dict = _densenet_like(np.random.default_rng(2))
  path = legacy_pth.write(tmp_path / 'w.pth', state_dict, extra={'label_names': ['x']})
  loaded = torch_pickle.load(path)
  assert loaded['label_names'] == ['x']
  _assert_same(loaded['state_dict'], state_dict)


def test_a_forbidden_global_is_refused_before_it_runs(tmp_path):
  marker = tmp_path / 'marker'
  legacy = legacy_pth.write(
    tmp_path / 'evil_legacy.pth',
    _densenet_like(np.random.default_rng(3)),
    extra={'payload': Malicious(str(marker))},
  )
  zipped = tmp_path / 'evil_zip.pth'
  with zipfile.ZipFile(zipped, 'w') as archive:  # torch.save's layout, torch-free.
    archive.writestr('evil_zip/data.pkl', pickle.dumps({'payload': Malicious(str(marker))}))
  for path in (legacy, zipped):
    with pytest.raises(torch_pickle.UnreadableTorchFile) as error:
      torch_pickle.load(path)
    message = str(error.value)
    assert message.startswith(f'Refusing to load {path}: its pickle names ')
    assert 'test_torch_pickle._leave_marker' in message and '\n' not in message
    assert not marker.exists()


@pytest.mark.parametrize(
  'make, expected',
  [
    (lambda p: p.write_bytes(b'\x00' * 64), 'is not a readable torch.save file'),
    (lambda p: p.write_bytes(pickle.dumps(12345)), 'no torch magic number'),
    (lambda p: _zip_without_pickle(p), 'without one data.pkl'),
    (lambda p: _tar(p), 'tar format'),
  ],
)
def test_unreadable_files_are_one_sentence(tmp_path, make, expected):
  path = tmp_path / 'w.pth'
  make(path)
  with pytest.raises(torch_pickle.UnreadableTorchFile, match=expected) as error:
    torch_pickle.load(path)
  assert str(path) in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('cut', [100, 32000 + 4, 33500])  # The last storage: 8 + 32000 bytes.
def test_a_truncated_file_is_one_sentence(tmp_path, cut):
  """Cut in a storage's bytes, in a storage's length header, or in the pickles."""
  path = legacy_pth.write(tmp_path / 'w.pth', _densenet_like(np.random.default_rng(4)))
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - cut])
  with pytest.raises(torch_pickle.UnreadableTorchFile) as error:
    torch_pickle.load(path)
  assert str(path) in str(error.value) and '\n' not in str(error.value)


def _zip_without_pickle(path):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('model/code/forward.py', 'def forward(self): ...')


def _tar(path):
  with tarfile.open(path, 'w') as archive:
    info = tarfile.TarInfo('pickle')
    info.size = 3
    archive.addfile(info, io.BytesIO(b'abc'))
