"""`python -m chexnet_jax.main` end to end on cpu_smoke: it learns, logs,
checkpoints and resumes; bad configs stop before anything compiles."""

import glob
import json
import os

import pytest

from chexnet_jax.run import run_reader
from tests.support import runs


run_main = runs.run_trainer


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """The full cpu_smoke run (320 steps), shared by this module's tests."""
  workdir = tmp_path_factory.mktemp('smoke')
  result = run_main(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


@pytest.mark.slow
def test_tiny_model_learns_synthetic_labels(smoke_run):
  workdir, _ = smoke_run
  evals = [r for r in read_metrics(workdir) if 'val_mean_auroc' in r]
  assert evals[-1]['step'] == 320
  assert evals[-1]['val_mean_auroc'] >= 0.9
  assert evals[-1]['val_mean_auroc'] > evals[0]['val_mean_auroc']
  assert len([k for k in evals[-1] if k.startswith('val_auroc/')]) == 14


@pytest.mark.slow
def test_run_writes_logs_and_checkpoints(smoke_run):
  workdir, result = smoke_run
  records = read_metrics(workdir)
  train_records = [r for r in records if 'train_loss' in r]
  for key in ('train_loss', 'learning_rate', 'images_per_second', 'step_time_ms', 'data_wait_ms'):
    assert all(r[key] is not None and r[key] > 0 for r in train_records), key
  assert glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps[-1] == 320 and len(steps) <= 4  # Last 3 + best.
  with open(os.path.join(workdir, 'run.json')) as f:
    identity = json.load(f)
  assert identity['model'] == 'tiny' and len(identity['labels']) == 14
  assert 'step 320/320' in result.stderr
  # The last line says which step evaluate will read, and the command.
  best = run_reader.best_step(os.path.join(workdir, 'checkpoints'), 'val_loss')
  last_line = result.stderr.strip().splitlines()[-1]
  assert f'Training done: best step {best} (by val_loss); next: python -m chexnet_jax.evaluate' in (
    last_line
  )


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_it_is_complete(smoke_run, tmp_path):
  workdir, _ = smoke_run
  last = max(r['step'] for r in read_metrics(workdir))
  # An init_from the run was not trained with, here a file no reader accepts (as an
  # ImageNet download offline): the checkpoint replaces the weights, so it is never read.
  unreadable = tmp_path / 'weights.pth'
  unreadable.write_bytes(b'not a torch file')
  result = run_main(workdir, f'--config.num_train_steps={last}', f'--config.init_from={unreadable}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'is already complete at step {last} (' in result.stderr
  assert 'Resuming from checkpoint' not in result.stderr
  assert 'Compiling the train step' not in result.stderr
  assert 'Building the train state' not in result.stderr  # No initialiser compiled.


@pytest.mark.slow
def test_second_run_resumes_from_last_checkpoint(smoke_run):
  workdir, _ = smoke_run
  result = run_main(workdir, '--config.num_train_steps=336')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from checkpoint step 320' in result.stderr
  steps = [r['step'] for r in read_metrics(workdir) if 'train_loss' in r]
  assert steps[-1] == 336 and steps.count(336) == 1


@pytest.mark.slow
def test_resuming_with_another_model_is_refused(smoke_run):
  workdir, _ = smoke_run
  result = run_main(workdir, '--config.model=densenet121')
  assert result.returncode == 1
  assert 'holds a different run' in result.stderr
  assert "model: run has 'tiny', config asks for 'densenet121'" in result.stderr


@pytest.mark.parametrize(
  'override, message',
  [
    (
      '--config.batch_size=30',
      'config.batch_size=30 does not divide over 4 devices; set '
      '--config.batch_size to a multiple of 4 (e.g. 28)',
    ),
    ('--config.model=densenet12', "config.model='densenet12' must be one of"),
    ('--config.dataset=chestxray14', 'No complete chestxray14 dataset at 40px'),
  ],
)
def test_bad_config_stops_with_one_clear_sentence(tmp_path, override, message):
  env_workdir = tmp_path / 'run'
  result = run_main(env_workdir, override, '--config.data_dir=' + str(tmp_path))
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
