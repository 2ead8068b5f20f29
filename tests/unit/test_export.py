"""The export's conversions on the tiny model (fast): variables -> torchvision state dict
-> ONNX graph, run by onnxruntime against the JAX model. The DenseNet121 exports of a run,
against PyTorch, are in tests/system/test_import_weights.py."""

import jax
import numpy as np
import pytest

from chexnet_jax.model import densenet
from chexnet_jax.model import onnx_graph
from chexnet_jax.model import preprocessing
from chexnet_jax.model import weights
from chexnet_jax.run import export


@pytest.fixture(scope='module')
def tiny():
  """A tiny DenseNet (2 blocks, one transition) with random weights and BN statistics."""
  model = densenet.create_model('tiny', num_classes=5)
  variables = jax.device_get(
    model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
  )
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda x: np.asarray(x) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32), variables
  )
  variables['batch_stats'] = jax.tree.map(np.abs, variables['batch_stats'])  # var > 0.
  return model, variables


def test_state_dict_round_trips_and_has_torchvision_names(tiny):
  model, variables = tiny
  state_dict = weights.variables_to_state_dict(variables)
  assert state_dict['features.conv0.weight'].shape == (32, 3, 7, 7)  # OIHW.
  assert state_dict['classifier.weight'].shape[0] == 5  # [out, in].
  assert state_dict['features.transition1.norm.num_batches_tracked'].dtype == np.int64
  read = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  back = weights.state_dict_to_variables(read, variables)
  assert all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables))
  )


def test_onnx_graph_in_onnxruntime_equals_the_model(tiny):
  model, variables = tiny
  state_dict = weights.variables_to_state_dict(variables)
  onnx_model = onnx_graph.build(
    state_dict, bn_epsilon=model.bn_epsilon, metadata={'label_names': '["a"]'}
  )
  grey = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 1)).astype(np.uint8)
  logits = model.apply(variables, preprocessing.normalize(grey), train=False)
  expected = np.asarray(jax.nn.sigmoid(logits))
  got = export.onnx_probabilities(onnx_model.SerializeToString(), grey)
  assert got.shape == (3, 5) and expected.std() > 0.01
  np.testing.assert_allclose(got, expected, atol=1e-5)
