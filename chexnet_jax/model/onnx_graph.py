"""A DenseNet as an ONNX graph, built from its torchvision-layout state dict.

The graph is torchvision's DenseNet forward, written with `onnx.helper` (no tracing,
no converter between JAX and ONNX): Conv, BatchNormalization, Relu, MaxPool, Concat,
AveragePool, GlobalAveragePool, Flatten, Gemm and a final Sigmoid, opset 17 (every
ONNX runtime in use reads it). The network is regular enough that reading its
blocks off the state dict's names (as weights.py does for Keras files) is all the
conversion there is, and the graph does not change with the JAX version.

Input 'image': float32 [N, 3, H, W], normalised as torchvision does (pixel/255, then
ImageNet mean and std per channel: see model/preprocessing.py); a grey X-ray is
copied to the 3 channels. Output 'probabilities': float32 [N, labels], sigmoids.
Imported here, onnx is needed only by the export (setup.cfg extra 'export').
"""

import re

import numpy as np

OPSET = 17
IR_VERSION = 8  # The IR of opset 17: older runtimes (Triton's, MONAI Deploy's) read it.
INPUT, OUTPUT = 'image', 'probabilities'
_LAYER = re.compile(r'^features\.denseblock(\d+)\.denselayer(\d+)\.norm1\.weight$')


def build(state_dict, *, bn_epsilon, metadata):
  """An onnx.ModelProto of the DenseNet in `state_dict`; `metadata`: {str: str}."""
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import helper  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top

  graph = _Graph(state_dict, bn_epsilon, helper, numpy_helper)
  x = graph.conv('features.conv0', INPUT, stride=2, pad=3)
  x = graph.relu(graph.norm('features.norm0', x))
  x = graph.node('MaxPool', [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
  for block, layers in enumerate(_block_sizes(state_dict), start=1):
    for layer in range(1, layers + 1):
      base = f'features.denseblock{block}.denselayer{layer}'
      y = graph.conv(f'{base}.conv1', graph.relu(graph.norm(f'{base}.norm1', x)))
      y = graph.conv(f'{base}.conv2', graph.relu(graph.norm(f'{base}.norm2', y)), pad=1)
      x = graph.node('Concat', [x, y], axis=1)
    if f'features.transition{block}.conv.weight' in state_dict:
      base = f'features.transition{block}'
      x = graph.conv(f'{base}.conv', graph.relu(graph.norm(f'{base}.norm', x)))
      x = graph.node('AveragePool', [x], kernel_shape=[2, 2], strides=[2, 2])
  x = graph.relu(graph.norm('features.norm5', x))
  x = graph.node('Flatten', [graph.node('GlobalAveragePool', [x])], axis=1)
  head = [graph.weight('classifier.weight'), graph.weight('classifier.bias')]
  x = graph.node('Gemm', [x, *head], transB=1)  # torch Linear: weight [out, in].
  graph.node('Sigmoid', [x], output=OUTPUT)
  labels = state_dict['classifier.weight'].shape[0]
  onnx_graph = helper.make_graph(
    graph.nodes,
    'chexnet_densenet',
    [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, ['N', 3, 'H', 'W'])],
    [helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, ['N', labels])],
    graph.initializers,
  )
  model = helper.make_model(
    onnx_graph,
    opset_imports=[helper.make_opsetid('', OPSET)],
    producer_name='chexnet_jax',
    ir_version=IR_VERSION,
  )
  helper.set_model_props(model, metadata)
  onnx.checker.check_model(model)
  return model


def _block_sizes(state_dict):
  layers = {}
  for key in state_dict:
    match = _LAYER.match(key)
    if match:
      block, layer = map(int, match.groups())
      layers[block] = max(layers.get(block, 0), layer)
  return [layers[b] for b in sorted(layers)]


class _Graph:
  """Nodes and initializers, each value named once (v1, v2, ...)."""

  def __init__(self, state_dict, bn_epsilon, helper, numpy_helper):
    self.state_dict, self.bn_epsilon = state_dict, bn_epsilon
    self.helper, self.numpy_helper = helper, numpy_helper
    self.nodes, self.initializers, self._count = [], [], 0

  def weight(self, key):
    self.initializers.append(
      self.numpy_helper.from_array(np.asarray(self.state_dict[key], np.float32), key)
    )
    return key

  def node(self, op, inputs, output=None, **attributes):
    self._count += 1
    output = output or f'v{self._count}'
    self.nodes.append(self.helper.make_node(op, inputs, [output], **attributes))
    return output

  def conv(self, module, x, stride=1, pad=0):
    kernel = self.state_dict[f'{module}.weight']
    size = list(kernel.shape[2:])
    return self.node(
      'Conv',
      [x, self.weight(f'{module}.weight')],
      kernel_shape=size,
      strides=[stride, stride],
      pads=[pad] * 4,
    )

  def norm(self, module, x):
    names = ('weight', 'bias', 'running_mean', 'running_var')
    inputs = [x] + [self.weight(f'{module}.{n}') for n in names]
    return self.node('BatchNormalization', inputs, epsilon=self.bn_epsilon)

  def relu(self, x):
    return self.node('Relu', [x])
