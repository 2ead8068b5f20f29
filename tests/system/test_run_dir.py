"""A run directory is a place: evaluate, predict and the notebook work on it from
any directory, and find its dataset where it was, or where --data_dir says it is now."""

import glob
import json
import os
import shutil

import pytest

from chexnet_jax import evaluate
from chexnet_jax import predict
from chexnet_jax.run import run_dir
from chexnet_jax.runtime import files
from configs import cpu_smoke
from input_pipeline import build
from tests.support import runs
from tests.system import test_notebook

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_DATA = os.path.join(REPO, 'demo_data')
SIZE = 64


@pytest.fixture(scope='module')
def run_made_elsewhere(tmp_path_factory):
  """A tiny run on the bundled NIH sample, trained from another directory with a
  relative data_dir; its dataset then moves. Returns (workdir, new data_dir)."""
  start = tmp_path_factory.mktemp('started_here')
  build.build(DEMO_DATA, str(start / 'data'), SIZE, allow_subset=True, num_workers=1)
  env = dict(
    os.environ, PYTHONPATH=os.pathsep.join([REPO, *filter(None, [os.environ.get('PYTHONPATH')])])
  )
  result = runs.run_trainer(
    'run',  # Relative, as a user types it, like data_dir.
    'dataset=chestxray14',
    'data_dir=data',
    f'dataset_image_size={SIZE}',
    'image_size=56',
    'num_train_steps=2',
    'batch_size=16',
    'eval_batch_size=32',
    config=os.path.join(REPO, 'configs', 'cpu_smoke.py'),
    cwd=start,
    env=env,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  with open(start / 'run' / run_dir.CONFIG_FILE) as f:
    assert json.load(f)['data_dir'] == str(start / 'data')  # Absolute.
  moved = tmp_path_factory.mktemp('moved') / 'data'
  shutil.move(str(start / 'data'), moved)
  return str(start / 'run'), str(moved)


def test_evaluate_from_another_directory_with_data_dir(
  run_made_elsewhere, tmp_path, monkeypatch, capsys
):
  workdir, data_dir = run_made_elsewhere
  monkeypatch.chdir(tmp_path)
  args = ['--workdir', workdir, '--bootstrap', '10', '--gallery', '1']
  assert evaluate.main(args) == 1  # The dataset moved: the error says what to do.
  assert '--data_dir' in capsys.readouterr().err
  assert evaluate.main(args + ['--data_dir', data_dir]) == 0
  assert os.path.isfile(os.path.join(workdir, 'eval', 'test', 'metrics.json'))


def test_predict_from_another_directory(run_made_elsewhere, tmp_path, monkeypatch):
  workdir, _ = run_made_elsewhere
  monkeypatch.chdir(tmp_path)
  image = sorted(glob.glob(os.path.join(DEMO_DATA, 'images', '*.png')))[0]
  assert predict.main([image, '--workdir', workdir, '--top_k', '1']) == 0
  with open(os.path.join(workdir, 'predict', 'predictions.json')) as f:
    assert len(json.load(f)['results']) == 1


def test_notebook_from_another_directory(run_made_elsewhere, tmp_path, monkeypatch):
  workdir, data_dir = run_made_elsewhere
  # Relative paths, as typed in the directory Jupyter was launched from ($PWD);
  # the kernel itself starts elsewhere (tmp_path).
  monkeypatch.setenv('PWD', os.path.dirname(workdir))
  monkeypatch.setenv('CHEXNET_WORKDIR', os.path.basename(workdir))
  monkeypatch.setenv('CHEXNET_DATA_DIR', os.path.relpath(data_dir, os.path.dirname(workdir)))
  monkeypatch.setenv('CHEXNET_BOOTSTRAP', '10')
  monkeypatch.setenv('CHEXNET_GALLERY', '1')
  notebook, errors = test_notebook.run_notebook(str(tmp_path))
  assert not errors


def _resumable(tmp_path, config):
  """A workdir with config.json and one (empty) checkpoint step."""
  (tmp_path / 'checkpoints' / '8').mkdir(parents=True)
  files.write_json_atomically(str(tmp_path / run_dir.CONFIG_FILE), config.to_dict())
  return str(tmp_path)


def test_config_changes_are_refused_recorded_and_applied(tmp_path):
  config = cpu_smoke.get_config()
  workdir = _resumable(tmp_path, config)
  config.dtype = 'bfloat16'
  with pytest.raises(run_dir.RunMismatchError, match=r"dtype='float32' -> 'bfloat16'"):
    run_dir.config_changes(workdir, config)
  config.allow_changes = 'dtype'
  config.seed = 3
  changes = run_dir.config_changes(workdir, config)
  assert changes == {'dtype': ('float32', 'bfloat16'), 'seed': (0, 3)}  # allow_changes: not one.
  run_dir.record_changes(workdir, changes, 8)
  with open(tmp_path / run_dir.HISTORY_FILE, 'a') as f:
    f.write('{"changes": {"seed": [3, ')  # Torn by a crash mid-append: skipped.
  loaded = run_dir.load_config(workdir)
  assert (loaded.dtype, loaded.seed) == ('bfloat16', 3)
  with open(tmp_path / run_dir.CONFIG_FILE) as f:
    assert json.load(f)['dtype'] == 'float32'  # The original, kept.
  assert run_dir.config_changes(workdir, config) == {}  # Now the run's own.
