"""import_weights: a published CheXNet checkpoint as a run every reader takes.

The reference is an independent PyTorch forward (tests/support/torch_densenet.py,
torchvision's layout) of the same random weights, on real NIH images from
demo_data/ that no run here was trained on, prepared as predict prepares them.
"""

import copy as copy_lib
import glob
import json
import os
import re
import stat
import sys
import types

import jax
import numpy as np
import pytest
import torch

from chexnet_jax import export as export_command
from chexnet_jax import import_weights
from chexnet_jax import predict
from chexnet_jax.evaluation import scoring
from chexnet_jax.model import preprocessing
from chexnet_jax.run import export
from chexnet_jax.run import run_dir
from chexnet_jax.run import run_reader
from chexnet_jax.run import run_weights
from input_pipeline import labels as labels_lib
from tests.support import keras_helpers
from tests.support import legacy_pth
from tests.support import torch_densenet

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES = sorted(glob.glob(os.path.join(REPO, 'demo_data', 'images', '*.png')))[-4:]


def old_style(key):
  """'denselayer1.norm1.weight' -> 'denselayer1.norm.1.weight' (torch < 0.4 names)."""
  return re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', key)


@pytest.fixture(scope='module')
def reference():
  return torch_densenet.randomize(torch_densenet.DenseNet(), seed=3)


def write_arnoweng(model, path):
  """arnoweng/CheXNet's model.pth.tar: legacy torch.save of {'state_dict', ...}, DataParallel
  and wrapper prefixes, old 'norm.1' keys, head Sequential(Linear, Sigmoid)."""
  state_dict = {
    f'module.densenet121.{old_style(k)}'.replace('classifier.', 'classifier.0.'): v
    for k, v in torch_densenet.state_dict_numpy(model).items()
    if not k.endswith('num_batches_tracked')  # torch < 0.4 had none.
  }
  legacy_pth.write(path, state_dict, extra={'epoch': 7, 'best_loss': 0.15})
  return path


def model_inputs(config):
  return np.stack(
    [
      predict.load_image(p, config.dataset_image_size, config.image_size, config.eval_preprocess)[0]
      for p in IMAGES
    ]
  )


@pytest.fixture(scope='module')
def imported_run(reference, tmp_path_factory):
  root = tmp_path_factory.mktemp('import')
  checkpoint = write_arnoweng(reference, str(root / 'model.pth.tar'))
  workdir = str(root / 'run')
  assert import_weights.main([checkpoint, '--workdir', workdir]) == 0
  return checkpoint, workdir


def test_arnoweng_checkpoint_predicts_what_pytorch_computes(
  reference, imported_run, tmp_path, capsys
):
  checkpoint, workdir = imported_run
  out = str(tmp_path / 'out')
  assert predict.main([*IMAGES, '--workdir', workdir, '--output_dir', out, '--top_k', '1']) == 0
  printed = capsys.readouterr().out
  assert f'checkpoint step 0 (imported weights) of {workdir}' in printed
  assert 'weights: imported from model.pth.tar' in printed
  with open(os.path.join(out, 'predictions.json')) as f:
    results = json.load(f)['results']
  ours = np.array([[r['probabilities'][n] for n in labels_lib.LABELS] for r in results])
  run = run_reader.load_run(workdir)
  expected = torch_densenet.probabilities(reference, model_inputs(run.config))
  assert expected.std(axis=0).max() > 0.01  # The images are told apart: not a flat output.
  np.testing.assert_allclose(ours, expected, atol=1e-4)
  identity = json.load(open(os.path.join(workdir, 'run.json')))
  assert identity['imported_from']['file'] == os.path.abspath(checkpoint)
  assert identity['imported_from']['trained_here'] is False
  assert identity['labels'] == list(labels_lib.LABELS)
  assert 'not trained here' in run.origin


def test_imported_run_is_a_fine_tuning_start(imported_run, reference):
  _, workdir = imported_run
  variables, step = run_weights.read_best(workdir)
  assert step == 0
  np.testing.assert_array_equal(
    variables['params']['classifier']['bias'], reference.classifier.bias.detach().numpy()
  )


def test_run_dir_follows_the_umask(imported_run):
  _, workdir = imported_run
  mode = stat.S_IMODE(os.stat(workdir).st_mode)
  umask = os.umask(0)
  os.umask(umask)
  assert mode == 0o777 & ~umask


def as_torchvision_pickle(model, monkeypatch):
  """A copy of `model` whose classes pickle as torchvision's (a stand-in torchvision
  package is put in sys.modules only while the test saves) and whose head is jrzech's
  Sequential(Linear, Sigmoid): what jrzech/reproduce-chexnet's torch.save(state) holds."""
  fake = types.ModuleType('torchvision.models.densenet')
  renamed = {}
  for cls in (
    torch_densenet.DenseNet,
    torch_densenet._DenseBlock,  # pylint: disable=protected-access
    torch_densenet._DenseLayer,  # pylint: disable=protected-access
    torch_densenet._Transition,  # pylint: disable=protected-access
  ):
    renamed[cls] = type(cls.__name__, (cls,), {'__module__': fake.__name__})
    setattr(fake, cls.__name__, renamed[cls])
  for name in ('torchvision', 'torchvision.models'):
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
  monkeypatch.setitem(sys.modules, fake.__name__, fake)
  copy = copy_lib.deepcopy(model)
  for module in copy.modules():
    module.__class__ = renamed.get(type(module), type(module))
  copy.classifier = torch.nn.Sequential(copy.classifier, torch.nn.Sigmoid())
  return copy


@pytest.mark.parametrize('legacy', [True, False], ids=['legacy_format', 'zip_format'])
def test_torchvision_state_dict_and_jrzechs_pickled_model(reference, tmp_path, monkeypatch, legacy):
  """A plain torchvision-layout .pth and jrzech's pickled whole model import to the same
  weights; the pickled model's classes are never looked up (no torchvision here), and
  no code of the file runs."""
  plain = tmp_path / 'plain.pth'
  torch.save(reference.state_dict(), plain)
  assert import_weights.main([str(plain), '--workdir', str(tmp_path / 'a')]) == 0
  pickled = tmp_path / 'checkpoint'
  with monkeypatch.context() as patch:
    model = as_torchvision_pickle(reference, patch)
    state = {'model': model, 'best_loss': 0.2, 'epoch': 3, 'rng_state': torch.get_rng_state()}
    torch.save(state, pickled, _use_new_zipfile_serialization=not legacy)
  assert 'torchvision' not in sys.modules
  assert import_weights.main([str(pickled), '--workdir', str(tmp_path / 'b')]) == 0
  a, _ = run_weights.read_best(str(tmp_path / 'a'))
  b, _ = run_weights.read_best(str(tmp_path / 'b'))
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  identity = json.load(open(tmp_path / 'b' / 'run.json'))
  assert identity['imported_from']['format'] == 'pickled torch model'


def test_a_pickled_model_of_another_package_is_refused(tmp_path, capsys):
  """Only torch.nn and torchvision module classes are read as records: any other
  class named by the pickle is refused before anything is called."""
  pickled = tmp_path / 'other.pth'
  torch.save({'model': torch_densenet.DenseNet(blocks=(1, 1, 1, 1))}, pickled)
  assert import_weights.main([str(pickled), '--workdir', str(tmp_path / 'run')]) == 1
  error = capsys.readouterr().err
  assert 'tests.support.torch_densenet' in error and 'arbitrary code' in error
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'damage, said',
  [
    ('imagenet_head', 'no CheXNet head'),
    ('no_names_9_outputs', 'names no labels'),
    ('missing_layer', 'cannot import'),
  ],
)
def test_a_file_that_does_not_fit_is_refused_whole(reference, tmp_path, capsys, damage, said):
  state_dict = torch_densenet.state_dict_numpy(reference)
  if damage == 'imagenet_head':
    state_dict['classifier.weight'] = np.zeros((1000, 1024), np.float32)
    state_dict['classifier.bias'] = np.zeros(1000, np.float32)
  elif damage == 'no_names_9_outputs':
    state_dict['classifier.weight'] = state_dict['classifier.weight'][:9]
    state_dict['classifier.bias'] = state_dict['classifier.bias'][:9]
  else:
    del state_dict['features.denseblock3.denselayer5.norm2.weight']
  path = tmp_path / 'bad.pth'
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  workdir = tmp_path / 'run'
  assert import_weights.main([str(path), '--workdir', str(workdir)]) == 1
  error = capsys.readouterr().err
  assert error.startswith('error: ') and said in error and str(path) in error
  assert len(error.strip().splitlines()) == 1
  assert not os.path.exists(workdir)
  assert os.listdir(tmp_path) == ['bad.pth']  # No staging folder left behind.


def test_report_says_where_the_weights_came_from(imported_run):
  _, workdir = imported_run
  run = run_reader.load_run(workdir)
  report = {'num_examples': 4, 'num_patients': 4, 'bootstrap': {'num_resamples': 10, 'seed': 0}}
  evaluation = scoring.Evaluation.from_run(run, 'test', 'none', report, None, [], 'labels.csv')
  rows = dict(evaluation.identity)
  assert 'model.pth.tar' in rows['weights'] and 'not trained here' in rows['weights']


def test_training_refuses_to_resume_an_imported_run(imported_run):
  _, workdir = imported_run
  identity = json.load(open(os.path.join(workdir, 'run.json')))
  with pytest.raises(run_dir.RunMismatchError, match='init_from='):
    run_dir.check_or_write_identity(workdir, identity)


# --------------------------------------------------------------- export --


@pytest.fixture(scope='module')
def jax_probabilities(imported_run):
  """The imported run's own (JAX) probabilities on the real images, and those images."""
  run = run_reader.load_run(imported_run[1])
  grey = model_inputs(run.config)
  variables = jax.device_get(run.variables)
  logits = run.model.apply(variables, preprocessing.normalize(grey), train=False)
  return np.asarray(jax.nn.sigmoid(logits)), grey


def test_onnx_export_runs_in_onnxruntime_as_the_model(imported_run, jax_probabilities, tmp_path):
  import onnx  # pylint: disable=g-import-not-at-top

  output = str(tmp_path / 'chexnet.onnx')
  assert (
    export_command.main(['--workdir', imported_run[1], '--format', 'onnx', '--output', output]) == 0
  )
  expected, grey = jax_probabilities
  with open(output, 'rb') as f:
    got = export.onnx_probabilities(f.read(), grey)
  np.testing.assert_allclose(got, expected, atol=1e-4)
  metadata = {p.key: p.value for p in onnx.load(output).metadata_props}
  assert json.loads(metadata['label_names']) == list(labels_lib.LABELS)
  assert 'torchvision' in metadata['preprocessing'] and 'not trained here' in metadata['weights']


def test_safetensors_export_loads_into_torchvision_layout(
  imported_run, jax_probabilities, reference, tmp_path
):
  from safetensors import torch as safetensors_torch  # pylint: disable=g-import-not-at-top

  output = str(tmp_path / 'chexnet.safetensors')
  argv = ['--workdir', imported_run[1], '--format', 'safetensors', '--output', output]
  assert export_command.main(argv) == 0
  model = torch_densenet.DenseNet(num_classes=14)
  model.load_state_dict(safetensors_torch.load_file(output), strict=True)
  expected, grey = jax_probabilities
  np.testing.assert_allclose(torch_densenet.probabilities(model.eval(), grey), expected, atol=1e-4)
  assert set(model.state_dict()) == set(reference.state_dict())


def test_export_without_the_extra_is_one_sentence(imported_run, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # As if not installed.
  output = tmp_path / 'x.onnx'
  assert (
    export_command.main(['--workdir', imported_run[1], '--format', 'onnx', '--output', str(output)])
    == 1
  )
  error = capsys.readouterr().err
  assert 'missing: onnxruntime' in error and '[export]' in error
  assert len(error.strip().splitlines()) == 1 and not output.exists()


def test_keras_densenet121_h5(tmp_path):
  """A Keras DenseNet121 with a 14-output head, saved as .weights.h5, imported, gives on
  real images what Keras computes (Keras' BN epsilon is 1.001e-5, ours torchvision's 1e-5)."""
  os.environ.setdefault('KERAS_BACKEND', 'jax')
  from keras.src.applications import densenet as keras_densenet  # pylint: disable=g-import-not-at-top

  model = keras_densenet.DenseNet121(weights=None, classes=14, classifier_activation=None)
  keras_helpers.randomize_keras_weights(model, seed=5)
  path = str(tmp_path / 'keras_chexnet.weights.h5')
  model.save_weights(path)
  workdir = str(tmp_path / 'run')
  assert import_weights.main([path, '--workdir', workdir]) == 0
  run = run_reader.load_run(workdir)
  x = np.asarray(preprocessing.normalize(model_inputs(run.config)))
  expected = 1 / (1 + np.exp(-np.asarray(model(x, training=False))))
  logits = run.model.apply(jax.device_get(run.variables), x, train=False)
  np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(logits)), expected, atol=1e-4)
  assert json.load(open(os.path.join(workdir, 'run.json')))['imported_from']['format'] == 'keras'
