"""chexnet_jax/evaluate.py on the session's tiny trained run (tests/conftest.py:tiny_run)."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sklearn import metrics as sk_metrics

from chexnet_jax.report import eval_outputs
from chexnet_jax.evaluation import scoring
from input_pipeline import labels as labels_lib
from tests.support import console_lines
from tests.support import runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LABELS = labels_lib.LABELS
BOOTSTRAP = 50


def read_predictions_csv(path):
  """(probs [N, 14], labels [N, 14], patients) back from predictions.csv."""
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  names = labels_lib.LABELS
  probs = np.array([[float(r[f'prob_{n}']) for n in names] for r in rows])
  labels = np.array([[float(r[f'label_{n}']) for n in names] for r in rows])
  return probs, labels, [r['patient'] for r in rows]


def run_evaluate_cli(workdir, devices, *extra):
  """python -m chexnet_jax.evaluate in a fresh process with `devices` CPU devices."""
  env = dict(
    os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}'
  )
  command = runs.tool_command('evaluate', '--workdir', workdir, '--bootstrap', BOOTSTRAP, *extra)
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  STDERR[devices] = result.stderr
  return result.stdout


STDERR = {}  # devices -> the last evaluate's stderr.


def _auroc_csv(path):
  with open(path, newline='') as f:
    return {row['pathology']: row for row in csv.DictReader(f)}


@pytest.fixture(scope='module')
def evaluated(tiny_run, tmp_path_factory):
  """The test split evaluated on 1 device, then again on 4 (results kept apart)."""
  kept = {}
  for devices in (1, 4):
    kept[f'stdout_{devices}'] = run_evaluate_cli(tiny_run, devices)
    # Other tests evaluate the same run again: keep this one's files apart.
    kept[devices] = str(tmp_path_factory.mktemp(f'eval_{devices}_devices') / 'test')
    shutil.copytree(os.path.join(tiny_run, 'eval', 'test'), kept[devices])
  return {
    'workdir': tiny_run,
    'one_device': kept[1],
    'four_devices': kept[4],
    'stdout_one': kept['stdout_1'],
  }


def test_writes_the_report_files(evaluated):
  out = evaluated['one_device']
  for name in ('metrics.json', 'auroc.csv', 'predictions.csv', 'roc_curves.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, 'metrics.json')) as f:
    summary = json.load(f)
  assert summary['split'] == 'test' and summary['threshold_source'] == 'validation'
  assert summary['num_examples'] == 128 and summary['bootstrap']['num_resamples'] == BOOTSTRAP
  assert 1 <= len(summary['gallery']) <= 8
  for entry in summary['gallery']:
    assert os.path.getsize(os.path.join(out, entry['file'])) > 0
  # Synthetic examples carry their patch boxes: localisation is scored.
  localization = summary['localization']['all']
  assert localization['num_boxes'] > 100
  assert list(localization['accuracy_iou']) == ['0.1', '0.2', '0.3', '0.4', '0.5', '0.6', '0.7']


def test_the_noise_check_catches_library_lines():
  noisy = (
    'WARNING:absl:Item "data" was found in the checkpoint, but could not be restored.\n'
    'W1201 10:00:00.1 123 xla_bridge.py:1] Platform cuda is experimental\n'
    '/x.py:3: UserWarning: something\n'
    'error: /tmp/a.png: not a readable PNG/JPEG/DICOM image: zero-byte file.\n'
    'scoring test: 100%|##| 128/128\n'
  )
  assert len(console_lines.unexpected_lines(noisy)) == 3


def test_announces_its_phases_and_prints_no_library_noise(evaluated):
  for devices in (1, 4):
    stderr = STDERR[devices]
    assert console_lines.unexpected_lines(stderr) == [], stderr[-3000:]
    phases = [
      'loading the weights of',
      'scoring test',
      '128/128',
      'scoring validation: thresholds',
      f'bootstrap: {BOOTSTRAP} patient resamples',
      'drawing the heatmaps',
    ]
    positions = [stderr.find(phase) for phase in phases]
    assert -1 not in positions and positions == sorted(positions), stderr[-3000:]


def test_prints_a_14_row_auroc_table(evaluated):
  lines = evaluated['stdout_one'].splitlines()
  rows = [line for line in lines if line.split() and line.split()[0] in LABELS]
  assert [row.split()[0] for row in rows] == list(LABELS)
  assert any(line.startswith('Mean') for line in lines)


def test_aurocs_equal_sklearn_on_its_own_predictions_csv(evaluated):
  out = evaluated['one_device']
  probs, labels, patients = read_predictions_csv(os.path.join(out, 'predictions.csv'))
  assert probs.shape == labels.shape == (128, 14) and len(set(patients)) == 128
  table = _auroc_csv(os.path.join(out, 'auroc.csv'))
  with open(os.path.join(out, 'metrics.json')) as f:
    summary = json.load(f)
  expected = []
  for k, name in enumerate(LABELS):
    auroc = sk_metrics.roc_auc_score(labels[:, k], probs[:, k])
    expected.append(auroc)
    assert float(table[name]['auroc']) == pytest.approx(auroc, abs=1e-12)
    assert summary['per_label'][name]['auroc'] == pytest.approx(auroc, abs=1e-12)
    assert float(table[name]['auprc']) == pytest.approx(
      sk_metrics.average_precision_score(labels[:, k], probs[:, k]), abs=1e-12
    )
    low, high = float(table[name]['auroc_ci_low']), float(table[name]['auroc_ci_high'])
    assert low <= auroc <= high
  assert float(table['mean']['auroc']) == pytest.approx(np.mean(expected), abs=1e-12)


def test_same_aurocs_on_1_and_4_devices(evaluated):
  one = _auroc_csv(os.path.join(evaluated['one_device'], 'auroc.csv'))
  four = _auroc_csv(os.path.join(evaluated['four_devices'], 'auroc.csv'))
  for name in (*LABELS, 'mean'):
    assert float(four[name]['auroc']) == pytest.approx(float(one[name]['auroc']), abs=1e-6)
  probs_one, labels_one, _ = read_predictions_csv(
    os.path.join(evaluated['one_device'], 'predictions.csv')
  )
  probs_four, labels_four, _ = read_predictions_csv(
    os.path.join(evaluated['four_devices'], 'predictions.csv')
  )
  np.testing.assert_array_equal(labels_one, labels_four)
  np.testing.assert_allclose(probs_one, probs_four, atol=1e-5)


def test_bad_workdir_is_a_clear_error(tmp_path):
  result = subprocess.run(
    [sys.executable, '-m', 'chexnet_jax.evaluate', '--workdir', str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1 and 'config.json' in result.stderr


# ------------------------------------------------------ in-process functions --


@pytest.fixture(scope='module')
def run(tiny_run):
  from chexnet_jax.run import run_reader

  return run_reader.load_run(tiny_run, 'latest')


def test_own_tta_loop_without_views_equals_evaluate_split(run):
  plain = scoring.score_split(run, 'validation', 'none')
  looped = scoring.score_split_with_tta(run, 'validation', 'none')
  np.testing.assert_array_equal(plain.indices, looped.indices)
  np.testing.assert_array_equal(plain.labels, looped.labels)
  np.testing.assert_allclose(plain.probs, looped.probs, atol=1e-6)


@pytest.mark.parametrize('tta', ['flip', 'tencrop'])
def test_tta_scores_every_example_once(run, tta):
  plain = scoring.score_split(run, 'validation', 'none')
  augmented = scoring.score_split(run, 'validation', tta)
  np.testing.assert_array_equal(augmented.indices, np.arange(128))
  assert augmented.probs.shape == (128, 14)
  assert not np.allclose(augmented.probs, plain.probs)
  assert np.corrcoef(augmented.probs.ravel(), plain.probs.ravel())[0, 1] > 0.9


def test_tta_views():
  images = np.arange(2 * 6 * 6).reshape(2, 6, 6, 1).astype(np.uint8)
  flip = scoring.tta_views(images, 'flip', 6)
  np.testing.assert_array_equal(flip[1][:, :, 0], images[:, :, 5])
  crops = scoring.tta_views(images, 'tencrop', 4)
  assert len(crops) == 10 and all(c.shape == (2, 4, 4, 1) for c in crops)
  np.testing.assert_array_equal(crops[0], images[:, :4, :4])
  np.testing.assert_array_equal(crops[3], images[:, 2:, 2:])
  np.testing.assert_array_equal(crops[4], images[:, 1:5, 1:5])
  np.testing.assert_array_equal(crops[9], images[:, 1:5, 1:5][:, :, ::-1])


def test_format_auroc_table_handles_missing_values():
  row = {
    'auroc': None,
    'auroc_ci': [None, None],
    'auprc': None,
    'sensitivity': None,
    'specificity': None,
    'num_positive': 0,
  }
  report = {
    'per_label': {name: row for name in LABELS},
    'mean_auroc': None,
    'mean_auroc_ci': [None, None],
    'mean_auprc': None,
  }
  assert len(eval_outputs.format_auroc_table(report).splitlines()) == 14 + 4


_free_port = runs.free_port


@pytest.mark.slow
def test_two_processes_score_alike_and_only_process_0_writes(evaluated, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(evaluated['workdir'], workdir, ignore=shutil.ignore_patterns('eval'))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  address = f'localhost:{_free_port()}'
  processes = [
    subprocess.Popen(
      runs.tool_command(
        'evaluate',
        '--workdir',
        workdir,
        '--bootstrap',
        BOOTSTRAP,
        '--coordinator_address',
        address,
        '--num_processes',
        2,
        '--process_id',
        i,
      ),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in processes]
  assert [p.returncode for p in processes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
  assert 'Mean' in outputs[0][0] and 'Mean' not in outputs[1][0]
  one = _auroc_csv(os.path.join(evaluated['one_device'], 'auroc.csv'))
  two = _auroc_csv(os.path.join(workdir, 'eval', 'test', 'auroc.csv'))
  for name in (*LABELS, 'mean'):
    assert float(two[name]['auroc']) == pytest.approx(float(one[name]['auroc']), abs=1e-6)


def test_a_full_disk_while_writing_the_report_is_one_sentence(tiny_run, tmp_path):
  """RLIMIT_FSIZE stands in for a full disk: the report's files fail to write."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns('eval'))
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  command = runs.tool_command('evaluate', '--workdir', workdir, '--bootstrap', 5, '--gallery', 1)
  result = subprocess.run(
    ['bash', '-c', 'trap \'\' XFSZ; ulimit -f 8; exec "$@"', 'bash', *command],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  line = [x for x in result.stderr.splitlines() if x.startswith('error: ')][-1]
  assert (
    line.startswith('error: the report could not be written into ') and 'File too large' in line
  )
  assert not os.path.exists(os.path.join(workdir, 'eval', 'test'))  # Nothing half-written.
