"""A run's weights as a file other runtimes load: ONNX or safetensors (`export`).

onnx: model/onnx_graph.py's graph (input float32 [N, 3, H, W] normalised as
torchvision does, output sigmoid probabilities [N, labels]); the label names and
the preprocessing are in the model's metadata_props. safetensors: the
torchvision-layout state dict (weights.variables_to_state_dict) that
`torchvision.models.densenet121(num_classes=N).load_state_dict` takes, the same
metadata in its header.

Each export is checked before it is written: the file's own reader (onnxruntime;
safetensors read back and put on our model) must give the JAX model's float32
probabilities on a probe batch within TOLERANCE, or the export is refused in one
sentence and nothing is written. The file is written whole (write_atomically).
"""

import importlib
import json

import jax
import numpy as np

from chexnet_jax import errors
from chexnet_jax.model import densenet
from chexnet_jax.model import onnx_graph
from chexnet_jax.model import preprocessing
from chexnet_jax.model import weights
from chexnet_jax.run import run_reader
from chexnet_jax.runtime import files

FORMATS = ('onnx', 'safetensors')
# The packages each format needs: setup.cfg's extra 'export'.
NEEDS = {'onnx': ('onnx', 'onnxruntime'), 'safetensors': ('safetensors',)}
TOLERANCE = 1e-4  # Largest probability difference from the JAX model on the probe.
PROBE_IMAGES = 2
PREPROCESSING = (
  'float32 [N, 3, H, W] (H = W = {size}): the grey X-ray resized whole to {size} px, '
  'copied to 3 channels, x/255, minus ImageNet mean (0.485, 0.456, 0.406), divided by '
  'ImageNet std (0.229, 0.224, 0.225), as torchvision.transforms.Normalize'
)


class ExportError(errors.UserRuntimeError):
  """An export that cannot be made or does not reproduce the model."""


def check_extra(fmt):
  """Refuses, in one sentence, a format whose packages are not installed."""
  missing = []
  for name in NEEDS[fmt]:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  if missing:
    raise ExportError(
      f'--format {fmt} needs {" and ".join(NEEDS[fmt])} (missing: {", ".join(missing)}); '
      "install them with pip install -e '.[export]'."
    )


def export_run(workdir, which, fmt, output):
  """Writes run `workdir`'s checkpoint `which` to `output` in `fmt`; returns a summary."""
  check_extra(fmt)
  run = run_reader.load_run(workdir, which)
  variables = jax.tree.map(np.asarray, jax.device_get(run.variables))
  state_dict = weights.variables_to_state_dict(variables)
  metadata = _metadata(run, workdir)
  probe = _probe(run.config.image_size)
  expected = _jax_probabilities(run, variables, probe)
  if fmt == 'onnx':
    data = onnx_graph.build(
      state_dict, bn_epsilon=run.model.bn_epsilon, metadata=metadata
    ).SerializeToString()
    got = onnx_probabilities(data, probe)
  else:
    from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

    data = safetensors_numpy.save(state_dict, metadata=metadata)
    got = _safetensors_probabilities(data, run, variables, probe)
  difference = float(np.max(np.abs(got - expected)))
  if not difference <= TOLERANCE:
    raise ExportError(
      f'the {fmt} export of {workdir} gives probabilities up to {difference:.2g} away from '
      f'the model on a probe batch (allowed: {TOLERANCE:g}); nothing was written to {output}.'
    )
  files.write_atomically(output, data)
  return {'step': run.step, 'labels': run.label_names, 'difference': difference}


def _metadata(run, workdir):
  return {
    'label_names': json.dumps(list(run.label_names)),
    'preprocessing': PREPROCESSING.format(size=run.config.image_size),
    'output': 'sigmoid probabilities [N, labels], one per label in label_names order',
    'model': run.config.model,
    'source_run': str(workdir),
    'checkpoint_step': str(run.step),
    'weights': run.origin or 'trained by chexnet_jax',
  }


def _probe(size):
  """Fixed grey uint8 images [PROBE_IMAGES, size, size, 1]: smooth shapes and noise."""
  rng = np.random.default_rng(0)
  ramp = np.linspace(0, 255, size)
  images = [np.add.outer(ramp, ramp[::-1]) / 2, rng.integers(0, 256, (size, size))]
  return np.stack(images[:PROBE_IMAGES]).astype(np.uint8)[..., None]


def normalized_nchw(grey_uint8):
  """uint8 [N, H, W, 1] -> the exported model's input, float32 [N, 3, H, W]."""
  x = np.asarray(preprocessing.normalize(grey_uint8))
  return np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), np.float32)


def _jax_probabilities(run, variables, grey):
  """The float32 model's probabilities (an export is float32 whatever config.dtype)."""
  model = densenet.create_model(run.config.model, num_classes=len(run.label_names))
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    variables, preprocessing.normalize(grey)
  )
  return np.asarray(jax.nn.sigmoid(logits))


def onnx_probabilities(data, grey):
  """onnxruntime's output of the serialised model `data` on uint8 grey images."""
  import onnxruntime  # pylint: disable=g-import-not-at-top

  session = onnxruntime.InferenceSession(data, providers=['CPUExecutionProvider'])
  return session.run([onnx_graph.OUTPUT], {onnx_graph.INPUT: normalized_nchw(grey)})[0]


def _safetensors_probabilities(data, run, variables, grey):
  """The file read back and put on our model by the reader of .pth files."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top

  read = safetensors_numpy.load(data)
  read = {k: v for k, v in read.items() if not k.endswith('num_batches_tracked')}
  restored = weights.state_dict_to_variables(read, variables, source='the safetensors export')
  return _jax_probabilities(run, restored, grey)
