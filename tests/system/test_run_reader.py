"""Reading a run never changes it (chexnet_jax/run/run_reader.py), on copies of the tiny run.

The damage is done for real: a torn newest step, a run not validated yet, an
older config.json, a step the writer deletes in the middle of a read, and two
evaluations of one split publishing at once.
"""

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest

from chexnet_jax.report import eval_outputs
from chexnet_jax import evaluate
from chexnet_jax import predict
from chexnet_jax.run import run_dir
from chexnet_jax.run import checkpoint_files
from chexnet_jax.run import run_reader
from configs import default as default_config
from tests.support import runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE = sorted(glob.glob(os.path.join(REPO, 'demo_data', 'images', '*.png')))[0]
EVALUATE = ['--bootstrap', '10', '--gallery', '1']


def _copy(tiny_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns('eval', 'predict'))
  return workdir


def _steps(workdir):
  return checkpoint_files.finished_steps(checkpoint_files.checkpoint_dir(workdir))


def _hashes(workdir):
  """{relative path: sha256} of every file and directory name under checkpoints/."""
  root = checkpoint_files.checkpoint_dir(workdir)
  found = {}
  for directory, names, files in os.walk(root):
    for name in names:
      found[os.path.relpath(os.path.join(directory, name), root)] = 'directory'
    for name in files:
      with open(os.path.join(directory, name), 'rb') as f:
        found[os.path.relpath(os.path.join(directory, name), root)] = hashlib.sha256(
          f.read()
        ).hexdigest()
  return found


def _tear(workdir, step, part):
  """Truncates the largest file of `part` ('state' or 'metrics') of `step`: a torn write."""
  files = glob.glob(
    os.path.join(checkpoint_files.checkpoint_dir(workdir), str(step), part, '**', '*'),
    recursive=True,
  )
  data = [f for f in files if os.path.isfile(f) and not f.endswith('commit_success.txt')]
  largest = max(data, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def _error_line(stderr):
  """evaluate's one-sentence error, after its phase line (the only other one)."""
  *before, error = stderr.strip().splitlines()
  assert [line.startswith('loading the weights of ') for line in before] == [True], stderr
  return error


@pytest.mark.parametrize('part', ['state', 'metrics'])
def test_evaluate_and_predict_leave_a_torn_run_byte_identical(tiny_run, tmp_path, part, capsys):
  workdir = _copy(tiny_run, tmp_path)
  older, newest = _steps(workdir)[-2:]
  _tear(workdir, newest, part)
  before = _hashes(workdir)
  picks = {'state': 'latest', 'metrics': 'best'}  # What reaches the torn part.
  assert evaluate.main(['--workdir', workdir, '--checkpoint', picks[part], *EVALUATE]) == 1
  error = _error_line(capsys.readouterr().err)
  what = {'state': 'is corrupt (', 'metrics': 'is torn (metrics: JSONDecodeError)'}[part]
  assert error.startswith(f'error: Checkpoint step {newest} in ') and what in error, error
  assert '\n' not in error
  output = str(tmp_path / 'predicted')
  assert predict.main([IMAGE, '--workdir', workdir, '--output_dir', output]) == 1
  assert f'Checkpoint step {newest}' in capsys.readouterr().err
  assert evaluate.main(['--workdir', workdir, '--checkpoint', str(older), *EVALUATE]) == 0
  assert f'checkpoint step {older}' in capsys.readouterr().out
  assert _hashes(workdir) == before  # Nothing renamed, written or deleted.


def test_best_before_any_validation_names_the_fix(tiny_run, tmp_path, capsys):
  workdir = _copy(tiny_run, tmp_path)
  for step in _steps(workdir):  # Keep only the saves made before the first evaluation.
    if os.path.isdir(os.path.join(checkpoint_files.checkpoint_dir(workdir), str(step), 'metrics')):
      shutil.rmtree(os.path.join(checkpoint_files.checkpoint_dir(workdir), str(step)))
  assert _steps(workdir)
  assert evaluate.main(['--workdir', workdir, *EVALUATE]) == 1
  error = _error_line(capsys.readouterr().err)
  assert error.startswith('error: --checkpoint best: no checkpoint in ')
  assert 'none is best by val_loss' in error and '--checkpoint latest' in error
  assert "wait for the run's first evaluation (every 4 epoch(s))" in error
  output = str(tmp_path / 'predicted')
  assert predict.main([IMAGE, '--workdir', workdir, '--output_dir', output]) == 1
  captured = capsys.readouterr()
  assert 'step None' not in captured.out + captured.err
  assert '--checkpoint latest' in captured.err
  code = predict.main(
    [IMAGE, '--workdir', workdir, '--output_dir', output, '--checkpoint', 'latest']
  )
  assert code == 0
  assert f'checkpoint step {_steps(workdir)[-1]} (latest) of {workdir}' in capsys.readouterr().out


def test_no_complete_checkpoint_is_one_sentence(tiny_run, tmp_path):
  workdir = _copy(tiny_run, tmp_path)
  for step in _steps(workdir):  # Only a save that never finished is left.
    directory = checkpoint_files.checkpoint_dir(workdir)
    os.rename(
      os.path.join(directory, str(step)), os.path.join(directory, f'{step}.orbax-checkpoint-tmp-1')
    )
  with pytest.raises(run_reader.CheckpointError, match='No complete checkpoint in .* yet'):
    run_reader.load_run(workdir, 'latest')


OLD_FIELDS = ('eval_preprocess', 'best_metric', 'lr_scaling', 'step_timeout_min_seconds')


def test_an_older_config_json_is_upgraded_from_the_defaults(tiny_run, tmp_path, caplog):
  workdir = _copy(tiny_run, tmp_path)
  path = os.path.join(workdir, run_dir.CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)
  for field in OLD_FIELDS:
    del saved[field]  # Written before these fields existed.
  with open(path, 'w') as f:
    json.dump(saved, f)
  defaults = default_config.get_config()
  with caplog.at_level(logging.INFO):
    config = run_dir.load_config(workdir)
  for field in OLD_FIELDS:
    assert config[field] == defaults[field], field
  assert (
    'predates config field(s) best_metric, eval_preprocess, lr_scaling, step_timeout' in caplog.text
  )
  assert config.model == saved['model'] and config.image_size == saved['image_size']
  run = run_reader.load_run(workdir, 'best')  # Ranked by today's default, val_loss.
  assert run.step == run_reader.best_step(checkpoint_files.checkpoint_dir(workdir), 'val_loss')


def _deleting_after_first_file(monkeypatch, directory, step):
  """The writer deletes `step` (keep_checkpoints) right after the reader linked its first file."""
  link = run_reader._link_or_copy

  def link_then_delete(source, target):
    link(source, target)
    shutil.rmtree(os.path.join(directory, str(step)), ignore_errors=True)

  monkeypatch.setattr(run_reader, '_link_or_copy', link_then_delete)


def test_a_step_deleted_mid_read_is_retried_on_the_next_complete_one(
  tiny_run, tmp_path, monkeypatch
):
  workdir = _copy(tiny_run, tmp_path)
  older, newest = _steps(workdir)[-2:]
  _deleting_after_first_file(monkeypatch, checkpoint_files.checkpoint_dir(workdir), newest)
  variables, step = run_reader.read_weights(workdir, 'latest', 'val_loss')
  assert step == older and set(variables) == {'params', 'batch_stats'}


def test_an_explicit_step_deleted_mid_read_is_one_sentence(tiny_run, tmp_path, monkeypatch):
  workdir = _copy(tiny_run, tmp_path)
  newest = _steps(workdir)[-1]
  _deleting_after_first_file(monkeypatch, checkpoint_files.checkpoint_dir(workdir), newest)
  with pytest.raises(run_reader.CheckpointError, match='was deleted while it was being read'):
    run_reader.read_weights(workdir, newest, 'val_loss')


def test_two_evaluations_of_one_split_publish_whole_folders(tmp_path):
  out_dir = str(tmp_path / 'eval' / 'test')
  first = eval_outputs.published(out_dir)
  second = eval_outputs.published(out_dir)
  staging_first, staging_second = first.__enter__(), second.__enter__()
  for staging, who in ((staging_first, 'first'), (staging_second, 'second')):
    os.makedirs(os.path.join(staging, 'gallery'))
    for name in ('metrics.json', 'auroc.csv', os.path.join('gallery', f'{who}.png')):
      with open(os.path.join(staging, name), 'w') as f:
        f.write(who)
  second.__exit__(None, None, None)
  assert sorted(os.listdir(os.path.join(out_dir, 'gallery'))) == ['second.png']
  first.__exit__(None, None, None)  # The later finish replaces it whole.
  assert sorted(os.listdir(os.path.join(out_dir, 'gallery'))) == ['first.png']
  assert open(os.path.join(out_dir, 'metrics.json')).read() == 'first'
  assert os.listdir(tmp_path / 'eval') == ['test']  # No staging folder left behind.


def test_a_failed_evaluation_leaves_the_previous_folder(tmp_path):
  out_dir = str(tmp_path / 'eval' / 'test')
  os.makedirs(out_dir)
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    f.write('previous')
  with pytest.raises(RuntimeError), eval_outputs.published(out_dir) as staging:
    with open(os.path.join(staging, 'metrics.json'), 'w') as f:
      f.write('half')
    raise RuntimeError('scoring failed')
  assert open(os.path.join(out_dir, 'metrics.json')).read() == 'previous'
  assert os.listdir(tmp_path / 'eval') == ['test']


@pytest.mark.slow
def test_reading_beside_a_writer_that_keeps_one_step(tmp_path):
  """Training saves every 4 steps and keeps 1 (deleting the previous at each save)
  while the weights are read again and again: every read is a whole, verified step."""
  workdir = str(tmp_path / 'run')
  writer = runs.start_trainer(
    workdir,
    'num_train_steps=96',
    'checkpoint_every_steps=4',
    'keep_checkpoints=1',
    stdout=subprocess.DEVNULL,
  )
  read, refused = [], []
  try:
    while writer.poll() is None:
      try:
        read.append(run_reader.read_weights(workdir, 'latest', 'val_loss')[1])
      except run_reader.CheckpointError as error:
        refused.append(str(error))  # Only before the first save, or if it stays racing.
      time.sleep(0.05)
  finally:
    stderr = writer.communicate(timeout=600)[1]
  assert writer.returncode == 0, stderr[-3000:]
  assert len(set(read)) >= 3, (read, refused)
  assert read == sorted(read)  # Never an older step after a newer one.
  assert all('No complete checkpoint' in why for why in refused), refused


@pytest.mark.slow
def test_two_evaluate_commands_on_one_split_at_once(tiny_run, tmp_path):
  """Both finish, and the split's folder is one evaluation's, whole."""
  workdir = _copy(tiny_run, tmp_path)
  command = [sys.executable, '-m', 'chexnet_jax.evaluate', '--workdir', workdir, *EVALUATE]
  command[-1] = '4'  # --gallery 4: more files to mix up.
  both = [
    subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(2)
  ]
  results = [(p.communicate(timeout=600), p.returncode) for p in both]
  assert [code for _, code in results] == [0, 0], [out[1][-2000:] for out, _ in results]
  out_dir = eval_outputs.output_dir(workdir, 'test', 'none')
  with open(os.path.join(out_dir, 'metrics.json')) as f:
    gallery = {entry['file'] for entry in json.load(f)['gallery']}
  drawn = {os.path.join('gallery', name) for name in os.listdir(os.path.join(out_dir, 'gallery'))}
  assert drawn == gallery and gallery
  expected = {'metrics.json', 'auroc.csv', 'predictions.csv', 'report.html', 'gallery'}
  assert expected <= set(os.listdir(out_dir))
  assert sorted(os.listdir(os.path.join(workdir, 'eval'))) == ['calibration.json', 'test']
