"""Weight loading: torchvision .pth (and its variants), CheXNet checkpoints, Keras .h5.

One small random Keras DenseNet (blocks 1,1,1,1: the full naming scheme, a
fraction of DenseNet121's compile time) is the reference for every file format.
"""

import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import re  # pylint: disable=g-import-not-at-top

import jax
import numpy as np
import pytest
import torch

from input_pipeline import labels as labels_lib
from chexnet_jax.model import densenet
from chexnet_jax.model import weights
from input_pipeline.labels import LABELS
from tests.support.keras_helpers import keras_model_to_state_dict, randomize_keras_weights

pytestmark = pytest.mark.slow

SIZE = 32


@pytest.fixture(scope='module')
def keras_reference():
  """(Keras model, input, its eval logits)."""
  from keras.src.applications import densenet  # pylint: disable=g-import-not-at-top

  model = densenet.DenseNet(
    [1, 1, 1, 1], weights=None, classes=14, classifier_activation=None, input_shape=(SIZE, SIZE, 3)
  )
  randomize_keras_weights(model, seed=0)
  x = np.random.default_rng(1).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  return model, x, np.asarray(model(x, training=False))


@pytest.fixture(scope='module')
def ours():
  """(fresh variables, jitted eval logits) of the same architecture."""
  model = densenet.DenseNet(
    block_sizes=(1, 1, 1, 1), num_classes=14, bn_epsilon=densenet.KERAS_BN_EPSILON
  )
  variables = model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)), train=False)
  return variables, jax.jit(lambda v, x: model.apply(v, x, train=False))


@pytest.fixture(scope='module')
def state_dict(keras_reference):
  return keras_model_to_state_dict(keras_reference[0])


def assert_matches_keras(variables, ours, keras_reference):
  _, x, expected = keras_reference
  np.testing.assert_allclose(
    ours[1](variables, x), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max()
  )


def save_torch(checkpoint, path):
  """torch.save with numpy arrays (also one dict level down) as tensors."""

  def to_torch(value):
    if isinstance(value, dict):
      return {k: to_torch(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
      return torch.from_numpy(np.ascontiguousarray(value))
    return value

  torch.save(to_torch(checkpoint), path)
  return path


def old_style(key):
  """'denselayer1.norm1.weight' -> 'denselayer1.norm.1.weight' (old torchvision)."""
  return re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', key)


def test_state_dict_uses_torchvision_names_and_layouts(state_dict):
  expected = {
    'features.conv0.weight': (64, 3, 7, 7),
    'features.norm0.running_var': (64,),
    'features.denseblock1.denselayer1.norm1.weight': (64,),
    'features.denseblock1.denselayer1.conv1.weight': (128, 64, 1, 1),
    'features.denseblock1.denselayer1.conv2.weight': (32, 128, 3, 3),
    'features.transition1.conv.weight': (48, 96, 1, 1),
    'features.denseblock4.denselayer1.norm2.running_mean': (128,),
    'features.norm5.bias': (68,),
    'classifier.weight': (14, 68),
  }
  assert {k: state_dict[k].shape for k in expected} == expected
  assert len(state_dict) == 12 * 1 + 13 * 4 + 2  # convs, BNs, head.


@pytest.mark.parametrize('variant', ['plain', 'module_prefix', 'old_keys', 'wrapped'])
def test_torchvision_pth(variant, state_dict, ours, keras_reference, tmp_path):
  sd = dict(state_dict)
  if variant == 'module_prefix':
    sd = {f'module.{k}': v for k, v in sd.items()}
  if variant == 'old_keys':
    sd = {old_style(k): v for k, v in sd.items()}
    assert 'features.denseblock1.denselayer1.norm.1.weight' in sd
  checkpoint = {'state_dict': sd, 'epoch': 3} if variant == 'wrapped' else sd
  path = save_torch(checkpoint, tmp_path / 'w.pth')
  assert_matches_keras(weights.load_pretrained(path, ours[0]), ours, keras_reference)


def test_chexnet_checkpoint_maps_the_head(state_dict, ours, keras_reference, tmp_path):
  """arnoweng/CheXNet: DataParallel + wrapper prefix, old keys, Sequential head."""
  sd = {
    f'module.densenet121.{old_style(k)}'.replace('classifier.', 'classifier.0.'): v
    for k, v in state_dict.items()
  }
  path = save_torch({'state_dict': sd, 'epoch': 7}, tmp_path / 'm.pth.tar')
  loaded = weights.load_pretrained(path, ours[0])
  np.testing.assert_array_equal(
    loaded['params']['classifier']['kernel'], state_dict['classifier.weight'].T
  )
  assert_matches_keras(loaded, ours, keras_reference)


def save_with_shuffled_labels(state_dict, path):
  """The head's rows permuted, with the label names saying so."""
  order = np.random.default_rng(0).permutation(14)
  sd = dict(state_dict)
  sd['classifier.weight'] = sd['classifier.weight'][order]
  sd['classifier.bias'] = sd['classifier.bias'][order]
  names = [LABELS[i] for i in order]
  return save_torch({'state_dict': sd, 'label_names': names}, path)


def test_head_mapped_by_label_names(state_dict, ours, keras_reference, tmp_path):
  path = save_with_shuffled_labels(state_dict, tmp_path / 'n.pth')
  loaded = weights.load_pretrained(path, ours[0])  # Ours: canonical LABELS.
  assert_matches_keras(loaded, ours, keras_reference)


def test_labels_absent_from_the_file_are_an_error(state_dict, ours, tmp_path):
  path = save_with_shuffled_labels(state_dict, tmp_path / 'n.pth')
  ours_labels = LABELS[:13] + ('No_Finding',)
  with pytest.raises(ValueError, match='No_Finding'):
    weights.load_pretrained(path, ours[0], label_names=ours_labels)


def test_imagenet_head_is_dropped(state_dict, ours, tmp_path):
  sd = dict(state_dict)
  sd['classifier.weight'] = np.ones((1000, 68), np.float32)
  sd['classifier.bias'] = np.ones((1000,), np.float32)
  loaded = weights.load_pretrained(save_torch(sd, tmp_path / 'i.pth'), ours[0])
  np.testing.assert_array_equal(
    loaded['params']['classifier']['kernel'], ours[0]['params']['classifier']['kernel']
  )
  np.testing.assert_array_equal(
    loaded['params']['norm0']['scale'], state_dict['features.norm0.weight']
  )


@pytest.mark.parametrize('file_name', ['model.weights.h5', 'model.keras'])
def test_keras3_files(file_name, keras_reference, ours, tmp_path):
  path = str(tmp_path / file_name)
  if file_name.endswith('.keras'):
    keras_reference[0].save(path)
  else:
    keras_reference[0].save_weights(path)
  assert_matches_keras(weights.load_pretrained(path, ours[0]), ours, keras_reference)


def test_legacy_keras_h5(keras_reference, ours, tmp_path):
  path = str(tmp_path / 'model.h5')
  keras_reference[0].save(path)  # Legacy HDF5: 'model_weights' + 'layer_names'.
  assert_matches_keras(weights.load_pretrained(path, ours[0]), ours, keras_reference)


def _leave_marker(path):
  with open(path, 'w') as f:
    f.write('unpickled')


class Malicious:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return _leave_marker, (self.marker,)


def test_pickled_code_is_refused(state_dict, ours, tmp_path):
  marker = tmp_path / 'marker'
  path = tmp_path / 'evil.pth'
  torch.save({'state_dict': {}, 'payload': Malicious(str(marker))}, path)
  with pytest.raises(ValueError, match='Refusing to load .*evil.pth'):
    weights.load_pretrained(path, ours[0])
  assert not marker.exists()


def test_wrong_architecture_lists_the_keys(state_dict, tmp_path):
  model = densenet.DenseNet(block_sizes=(1, 1), growth_rate=8, num_init_features=16)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)), train=False)
  )
  path = save_torch(state_dict, tmp_path / 'w.pth')
  with pytest.raises(ValueError) as error:
    weights.load_pretrained(path, variables)
  message = str(error.value)
  assert 'unexpected keys' in message and 'denseblock3' in message
  assert 'features.conv0.weight: file (64, 3, 7, 7) vs model (16, 3, 7, 7)' in message


def test_head_of_another_size_is_an_error(state_dict, tmp_path):
  model = densenet.DenseNet(block_sizes=(1, 1, 1, 1), num_classes=5)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)), train=False)
  )
  path = save_torch(state_dict, tmp_path / 'w.pth')
  with pytest.raises(ValueError, match=r'num_classes=5'):
    weights.load_pretrained(path, variables)


def test_missing_file_names_the_config_key(ours):
  with pytest.raises(FileNotFoundError, match='init_from'):
    weights.load_pretrained('/nonexistent/w.pth', ours[0])


def test_train_state_starts_from_init_from(state_dict, ours, keras_reference, tmp_path):
  """config.init_from reaches the trainer: the replicated state on a 4-device
  mesh holds the file's weights, and the optimizer starts from them."""
  from chexnet_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from chexnet_jax.training import train_state  # pylint: disable=g-import-not-at-top
  from configs import cpu_smoke  # pylint: disable=g-import-not-at-top

  config = cpu_smoke.get_config()
  config.init_from = str(save_torch(state_dict, tmp_path / 'w.pth'))
  config.image_size = SIZE
  model = densenet.DenseNet(
    block_sizes=(1, 1, 1, 1), num_classes=14, bn_epsilon=densenet.KERAS_BN_EPSILON
  )
  mesh = sharding.make_mesh()
  tx, _ = train_state.create_optimizer(config, 1, 1)
  state = train_state.create_train_state(config, model, mesh, tx, labels_lib.LABELS)
  assert state.params['conv0']['kernel'].sharding.is_fully_replicated
  assert len(state.params['conv0']['kernel'].sharding.device_set) == 4
  assert_matches_keras(jax.device_get(state.variables), ours, keras_reference)
