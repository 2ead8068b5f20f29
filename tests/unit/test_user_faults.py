"""User faults of evaluate and of a run's files: one sentence, no traceback, exit
status not 0 (a run's torn config.json or run.json; a negative --bootstrap)."""

import os

import pytest

from chexnet_jax import evaluate
from chexnet_jax.run import run_dir


def _torn(workdir, name, text='{"model": "densenet121", "num_cl'):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, name), 'w') as f:
    f.write(text)
  return os.path.join(workdir, name)


@pytest.mark.parametrize('name', [run_dir.CONFIG_FILE, run_dir.IDENTITY_FILE])
def test_evaluate_on_a_torn_run_file_is_one_sentence(tmp_path, capsys, name):
  workdir = str(tmp_path / 'run')
  _torn(workdir, run_dir.CONFIG_FILE, '{}')
  path = _torn(workdir, name)
  assert evaluate.main(['--workdir', workdir]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f'error: {path} is damaged (') and err.count('\n') == 1, err
  assert 'new --workdir' in err


def test_resume_reads_a_torn_config_json_as_one_sentence(tmp_path):
  workdir = str(tmp_path / 'run')
  path = _torn(workdir, run_dir.CONFIG_FILE)
  os.makedirs(os.path.join(workdir, 'checkpoints', '8'))  # A run with a checkpoint.
  from configs import default

  with pytest.raises(run_dir.DamagedRunError, match=f'^{path} is damaged'):
    run_dir.config_changes(workdir, default.get_config())


def test_a_negative_bootstrap_is_refused(capsys):
  with pytest.raises(SystemExit) as stopped:
    evaluate.main(['--workdir', 'anything', '--bootstrap', '-5'])
  assert stopped.value.code == 2
  assert 'argument --bootstrap: -5 is below 1; give 1 or more' in capsys.readouterr().err
