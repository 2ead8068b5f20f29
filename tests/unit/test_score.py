"""python -m chexnet_jax.score: any model's predictions CSV against NIH's or a dataset's
labels, and the paired comparison of two models (chexnet_jax/score.py)."""

import csv
import gzip
import json
import os
import stat

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from chexnet_jax.evaluation import metrics
from chexnet_jax import score
from input_pipeline import labels as labels_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, 'demo_data')
DATA_ENTRY = os.path.join(DEMO, 'Data_Entry_2017_v2020.csv.gz')
TEST_LIST = os.path.join(DEMO, 'test_list.txt')
LABELS = labels_lib.LABELS


def _demo_entries():
  with gzip.open(DATA_ENTRY, 'rt') as f:
    return [(r['Image Index'], labels_lib.encode(r['Finding Labels'])) for r in csv.DictReader(f)]


def _write_predictions(path, rows, header):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def _nih_predictions(path, noise, seed, image_prefix='', prefix=''):
  """Probabilities: 0.5 for a positive plus `noise` x uniform, scaled into [0, 1]."""
  rng = np.random.default_rng(seed)
  rows = [
    [image_prefix + name, *np.round((0.5 * y + noise * rng.random(len(LABELS))) / (0.5 + noise), 6)]
    for name, y in _demo_entries()
  ]
  return _write_predictions(
    path, rows, ['image' if prefix else 'Image Index', *[prefix + n for n in LABELS]]
  )


def _run(args, capsys):
  code = score.main([str(a) for a in args])
  out, err = capsys.readouterr()
  return code, out, err


def _score_test_list(pred, out_dir, capsys, *args):
  """score PRED against NIH's labels of the test list, into out_dir."""
  return _run(
    [pred, '--labels', DATA_ENTRY, '--split_list', TEST_LIST, '--output_dir', out_dir, *args],
    capsys,
  )


def test_scores_nih_predictions_of_the_test_list(tmp_path, capsys):
  # Positives lie 0.5 above negatives and the noise is under 0.5: every AUROC is 1.
  pred = _nih_predictions(tmp_path / 'pred.csv', 0.49, 0)
  out_dir = tmp_path / 'scored'
  code, out, err = _score_test_list(pred, out_dir, capsys, '--bootstrap', 20)
  assert code == 0, err
  summary = json.loads((out_dir / 'metrics.json').read_text())
  with open(TEST_LIST) as f:
    assert summary['num_examples'] == len([line for line in f if line.strip()])
  scored = [row for row in summary['per_label'].values() if row['auroc'] is not None]
  assert scored and all(row['auroc'] == pytest.approx(1.0) for row in scored)
  with open(out_dir / 'auroc.csv') as f:
    assert [row[0] for row in csv.reader(f)][1:] == [*LABELS, 'mean']
  page = (out_dir / 'report.html').read_text()
  assert 'Not available: a temperature is fitted on validation' in page
  assert 'not available: a threshold is chosen on validation predictions' in page
  assert 'Not available: heatmaps need the model' in page
  assert (out_dir / 'roc_curves.png').stat().st_size > 0
  assert 'Mean' in out and f'wrote {out_dir}' in out


def test_reads_evaluates_own_columns_and_image_paths(tmp_path, capsys):
  # evaluate's predictions.csv: `image` and prob_<Label>; images under a folder.
  pred = _nih_predictions(tmp_path / 'p.csv', 0.49, 1, image_prefix='images/', prefix='prob_')
  code, _, err = _run(
    [pred, '--labels', DATA_ENTRY, '--output_dir', tmp_path / 'o', '--bootstrap', 5], capsys
  )
  assert code == 0, err
  summary = json.loads((tmp_path / 'o' / 'metrics.json').read_text())
  assert summary['num_examples'] == len(_demo_entries())
  assert summary['mean_auroc'] == pytest.approx(1.0)


def test_paired_comparison_of_two_models(tmp_path, capsys):
  good = _nih_predictions(tmp_path / 'good.csv', 0.49, 0)
  poor = _nih_predictions(tmp_path / 'poor.csv', 5.0, 1)  # Noise swamps the signal.
  code, out, err = _run(
    [
      good,
      '--labels',
      DATA_ENTRY,
      '--compare',
      poor,
      '--output_dir',
      tmp_path / 'c',
      '--bootstrap',
      50,
    ],
    capsys,
  )
  assert code == 0, err
  comparison = json.loads((tmp_path / 'c' / 'metrics.json').read_text())['comparison']
  assert comparison['mean']['difference'] > 0.2
  low, high = comparison['mean']['ci']
  assert 0 < low <= comparison['mean']['difference'] <= high
  assert comparison['mean']['p_value'] < 0.05
  assert 'paired comparison with poor.csv' in out
  assert 'id="comparison"' in (tmp_path / 'c' / 'report.html').read_text()
  with open(tmp_path / 'c' / 'compare.csv') as f:
    assert [row[0] for row in csv.reader(f)][-1] == 'mean'


def test_paired_difference_matches_sklearn_and_is_zero_against_itself():
  rng = np.random.default_rng(0)
  labels = (rng.random((200, 2)) < 0.3).astype(np.float32)
  a = np.clip(labels * 0.3 + rng.random((200, 2)), 0, 1)
  b = rng.random((200, 2))
  patients = [str(i // 2) for i in range(200)]
  result = metrics.paired_auroc_difference(
    labels, a, b, patients, names=('x', 'y'), num_resamples=30
  )
  for k, name in enumerate(('x', 'y')):
    expected = sk_metrics.roc_auc_score(labels[:, k], a[:, k]) - sk_metrics.roc_auc_score(
      labels[:, k], b[:, k]
    )
    assert result[name]['difference'] == pytest.approx(expected)
  same = metrics.paired_auroc_difference(labels, a, a, patients, names=('x', 'y'), num_resamples=5)
  assert same['mean']['difference'] == 0 and same['mean']['ci'] == [0.0, 0.0]


def test_a_datasets_own_csv_with_unknown_labels(tmp_path, capsys):
  labels_csv = tmp_path / 'labels.csv'
  rows, preds = [], []
  for i in range(40):
    effusion = i % 2
    mass = '' if i % 5 == 0 else str(int(i % 3 == 0))  # Blank: unknown, left out.
    rows.append([f'p{i // 2}/view1_frontal.jpg', f'patient{i // 2}', effusion, mass])
    preds.append(
      [
        f'p{i // 2}/view1_frontal.jpg',
        0.2 + 0.6 * effusion,
        0.5 if mass == '' else 0.1 + 0.8 * (mass == '1'),
      ]
    )
  rows = [[r[0].replace('view1', f'view{i % 2 + 1}'), *r[1:]] for i, r in enumerate(rows)]
  preds = [[p[0].replace('view1', f'view{i % 2 + 1}'), *p[1:]] for i, p in enumerate(preds)]
  _write_predictions(labels_csv, rows, ['path', 'patient', 'Effusion', 'Mass'])
  pred = _write_predictions(tmp_path / 'pred.csv', preds, ['path', 'Effusion', 'prob_Mass'])
  code, out, err = _run(
    [pred, '--labels', labels_csv, '--output_dir', tmp_path / 'o', '--bootstrap', 10], capsys
  )
  assert code == 0, err
  summary = json.loads((tmp_path / 'o' / 'metrics.json').read_text())
  assert summary['num_patients'] == 20
  assert summary['per_label']['Effusion']['auroc'] == pytest.approx(1.0)
  assert summary['per_label']['Mass']['auroc'] == pytest.approx(1.0)
  assert summary['per_label']['Mass']['num_unknown'] == 8


@pytest.mark.parametrize(
  'problem, expected',
  [
    ('no_image_column', "no image column; name one of 'Image Index'"),
    ('unknown_image', "image 'nobody.png' is not in the labels file"),
    ('no_probability', 'no probability column for any label'),
    ('bad_probability', "Mass is 'high', not a probability between 0 and 1"),
    ('outside_split', 'none of its 1 images is in the split list'),
  ],
)
def test_bad_input_is_one_sentence(tmp_path, capsys, problem, expected):
  test_image = open(TEST_LIST).readline().strip()
  train_image = next(n for n, _ in _demo_entries() if n not in open(TEST_LIST).read())
  header, row = ['Image Index', 'Mass'], [test_image, '0.5']
  if problem == 'no_image_column':
    header = ['file', 'Mass']
  elif problem == 'unknown_image':
    row = ['nobody.png', '0.5']
  elif problem == 'no_probability':
    header = ['Image Index', 'score']
  elif problem == 'bad_probability':
    row = [test_image, 'high']
  elif problem == 'outside_split':
    row = [train_image, '0.5']
  pred = _write_predictions(tmp_path / 'pred.csv', [row], header)
  only = ['--only', 'Mass'] if problem != 'no_probability' else []
  code, out, err = _score_test_list(pred, tmp_path / 'o', capsys, *only)
  assert code == 1 and expected in err
  assert err.count('\n') == 1 and 'Traceback' not in err
  assert not (tmp_path / 'o').exists()  # Nothing half-written.


def test_a_missing_label_column_stops_it(tmp_path, capsys):
  """No prob_Hernia: one sentence naming it, not a table and a mean over 13 labels."""
  pred = _nih_predictions(tmp_path / 'p.csv', 0.49, 1, prefix='prob_')
  with open(pred) as f:
    rows = [row[:-1] for row in csv.reader(f)]  # Hernia is the last label.
  pred = _write_predictions(tmp_path / 'p13.csv', rows[1:], rows[0])
  args = [pred, '--labels', DATA_ENTRY, '--output_dir', tmp_path / 'o', '--bootstrap', 5]
  code, out, err = _run(args, capsys)
  assert code == 1 and 'no probability column for Hernia' in err and '--only Atelectasis,' in err
  assert err.count('\n') == 1 and not (tmp_path / 'o').exists()
  code, out, err = _run([*args, '--only', ','.join(LABELS[:-1])], capsys)
  assert code == 0, err
  summary = json.loads((tmp_path / 'o' / 'metrics.json').read_text())
  assert sorted(summary['per_label']) == sorted(LABELS[:-1])


def test_comparison_counts_positives_cautions_and_says_the_p_floor(tmp_path, capsys):
  good = _nih_predictions(tmp_path / 'good.csv', 0.49, 0)
  poor = _nih_predictions(tmp_path / 'poor.csv', 5.0, 1)
  args = [good, '--labels', DATA_ENTRY, '--compare', poor, '--output_dir', tmp_path / 'c']
  code, out, err = _run([*args, '--bootstrap', 50], capsys)
  assert code == 0, err
  with open(tmp_path / 'c' / 'compare.csv') as f:
    rows = {row['pathology']: row for row in csv.DictReader(f)}
  truth = np.array([y for _, y in _demo_entries()])
  for k, name in enumerate(LABELS):
    assert rows[name]['num_positive'] == str(int(truth[:, k].sum()))
    few = 0 < truth[:, k].sum() < 10
    assert ('too few' in rows[name]['caution']) == few
  assert rows['mean']['p_value'] == '< 1/51'  # No resample of the mean reached 0.
  assert 'too few' in out and '< 1/51' in out
  mean = json.loads((tmp_path / 'c' / 'metrics.json').read_text())['comparison']['mean']
  assert mean['p_below'] == pytest.approx(1 / 51) and mean['p_value'] == pytest.approx(1 / 51)
  page = (tmp_path / 'c' / 'report.html').read_text()
  assert '&lt; 1/51' in page and 'Positives' in page


def test_score_output_follows_the_umask(tmp_path, capsys):
  pred = _nih_predictions(tmp_path / 'p.csv', 0.49, 1)
  old = os.umask(0o022)
  try:
    code, _, err = _run([pred, '--labels', DATA_ENTRY, '--output_dir', tmp_path / 'o'], capsys)
  finally:
    os.umask(old)
  assert code == 0, err
  assert stat.S_IMODE(os.stat(tmp_path / 'o').st_mode) == 0o755
