"""The evaluation page (chexnet_jax/report/page.py), its figures and calibration, checked in a
real headless Chromium (tests/support/chromium.py) on the session's tiny trained run."""

import csv
import json
import os
import stat
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from chexnet_jax.evaluation import calibration
from chexnet_jax.report import eval_outputs
from chexnet_jax.report import figures
from chexnet_jax.evaluation import metrics
from chexnet_jax.report import page as report_page
from chexnet_jax.evaluation import scoring
from input_pipeline import labels as labels_lib
from tests.support import evaluations
from tests.support import chromium
from tests.support import runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LABELS = labels_lib.LABELS
SAMPLE = os.path.join(REPO, 'demo_data', 'images', '00000100_000.png')


# ----------------------------------------------------------------- calibration --


def test_ece_is_zero_when_every_bin_matches_and_known_otherwise():
  # Four predictions of 0.25 with one positive, four of 0.75 with three: calibrated.
  labels = np.array([1, 0, 0, 0, 1, 1, 1, 0])
  probs = np.array([0.25, 0.25, 0.25, 0.25, 0.75, 0.75, 0.75, 0.75])
  assert calibration.expected_calibration_error(labels, probs) == pytest.approx(0.0)
  # All predicted 0.9, half positive: |0.5 - 0.9| = 0.4.
  assert calibration.expected_calibration_error(
    np.array([1, 0, 1, 0]), np.full(4, 0.9)
  ) == pytest.approx(0.4)
  bins = calibration.reliability_bins(np.array([1, 0]), np.array([1.0, 0.0]))
  assert bins['count'][0] == 1 and bins['count'][-1] == 1  # 0 and 1 land in the end bins.


def test_fitted_temperature_undoes_a_known_overconfidence():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 2, size=(20000, 3))
  labels = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(float)
  overconfident = 1 / (1 + np.exp(-2 * logits))  # Logits doubled: T should be ~2.
  temperature = calibration.fit_temperature(labels, overconfident)
  assert temperature == pytest.approx(2.0, rel=0.05)
  fixed = calibration.apply_temperature(overconfident, temperature)
  assert (
    calibration.expected_calibration_error(labels.ravel(), fixed.ravel())
    < calibration.expected_calibration_error(labels.ravel(), overconfident.ravel()) / 3
  )
  np.testing.assert_allclose(
    calibration.apply_temperature(overconfident, 1.0), overconfident, atol=1e-6
  )
  # Monotone: rankings, hence AUROCs, unchanged.
  column = overconfident[:, 0]
  assert (
    np.argsort(column, kind='stable')
    == np.argsort(calibration.apply_temperature(column, 3.0), kind='stable')
  ).all()


def test_read_temperature_names_the_file_and_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'calibration\.json.*chexnet_jax\.evaluate'):
    calibration.read_temperature(str(tmp_path), 48)
  calibration.write_temperature(str(tmp_path), 1.5, step=32, tta='none')
  with pytest.raises(ValueError, match='step 32, not of step 48'):
    calibration.read_temperature(str(tmp_path), 48)
  assert calibration.read_temperature(str(tmp_path), 32) == 1.5


# --------------------------------------------------------------------- figures --


def test_heatmap_has_one_fixed_scale_a_colour_bar_and_a_legend_of_both_boxes():
  cam = np.linspace(-3, 3, 32 * 32).reshape(32, 32)
  figure = figures.heatmap_figure(
    np.zeros((32, 32, 1), np.uint8),
    cam,
    0.5,
    finding='Mass',
    probability=0.62,
    image_name='x.png',
    true_box=(2, 2, 8, 8),
    model_box=(10, 10, 12, 12),
  )
  main, bar = figure.axes
  heat = main.get_images()[1]
  assert heat.get_clim() == (0, 1)  # Not the map's own range.
  np.testing.assert_allclose(heat.get_array(), 1 / (1 + np.exp(-(cam + 0.5))), atol=1e-6)
  assert bar.get_ylim() == (0, 1) and 'probability' in bar.get_ylabel()
  legend = [t.get_text() for t in main.get_legend().get_texts()]
  assert legend == ["NIH's box (annotation)", "model's region (map >= 50% of its range)"]
  styles = [p.get_linestyle() for p in main.patches]
  assert styles[0] != styles[1]
  assert 'Mass' in main.get_title() and '0.620' in main.get_title()


def test_cam_plus_bias_is_the_logit_so_the_heatmap_is_on_the_probability_scale(tiny_run):
  from chexnet_jax.evaluation import cam
  from chexnet_jax.run import run_reader

  run = run_reader.load_run(tiny_run, 'latest')
  variables = cam.local_copy(run.variables)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  probs, maps = cam.make_cam_fn(run.model)(variables, images)
  bias = cam.head_bias(variables['params'], len(LABELS))
  logits = np.log(np.asarray(probs) / (1 - np.asarray(probs)))
  np.testing.assert_allclose(np.asarray(maps).mean(axis=(2, 3)) + bias, logits, atol=1e-4)


def test_curve_bands_hold_the_curve():
  rng = np.random.default_rng(1)
  labels = (rng.random((300, 2)) < 0.3).astype(float)
  probs = np.clip(labels * 0.3 + rng.random((300, 2)) * 0.7, 0, 1)
  bands = figures.curve_bands(labels, probs, np.arange(300) // 2, ['a', 'b'], num_resamples=50)
  for name in ('a', 'b'):
    for key in ('roc', 'pr'):
      mid, low, high = bands[name][key]
      assert (low <= high + 1e-12).all() and (
        (low <= mid + 1e-9) & (mid <= high + 1e-9)
      ).mean() > 0.9
    assert bands[name]['roc'][0][0] >= 0 and bands[name]['roc'][0][-1] == pytest.approx(1)


# ------------------------------------------------- the page, without a model --


def _fake_evaluation(labels, probs, thresholds, names=None, train_images=None):
  """A report without a model; `names`: a dataset's own labels (NIH's 14 if None)."""
  records = [{'patient_id': str(i), 'image_name': f'{i}.png'} for i in range(len(labels))]
  names = names or LABELS
  evaluation = evaluations.without_a_model(
    labels, probs, records, thresholds, names, resamples=20, step=7, train_images=train_images
  )
  scoring.calibrate(evaluation, evaluation.predictions)
  return evaluation


def test_empty_cells_say_why():
  rng = np.random.default_rng(0)
  labels = (rng.random((60, 14)) < 0.3).astype(float)
  labels[:, LABELS.index('Hernia')] = 0  # No positive Hernia in the split.
  probs = rng.random((60, 14))
  thresholds = metrics.youden_thresholds(labels, probs)
  thresholds['Mass'] = float('nan')  # As if validation had one class.
  evaluation = _fake_evaluation(labels, probs, thresholds)
  rows = {row['label']: row for row in report_page.per_label_rows(evaluation)}
  assert 'no positive Hernia image' in rows['Hernia']['reasons']['auroc']
  assert rows['Hernia']['reasons']['sensitivity']
  assert 'Youden' in rows['Mass']['reasons']['sensitivity']
  assert rows['Atelectasis']['reasons'] == {}
  table = report_page.per_label_table_html(list(rows.values()))
  assert table.count('<tr data-label=') == 14
  assert 'no positive Hernia image' in table


def _with_unknowns(seed=0, n=400, num_labels=3, unknown=0.2):
  """labels [n, L] in {1, 0, -1} (a fifth unknown), informative probs, patients."""
  rng = np.random.default_rng(seed)
  truth = (rng.random((n, num_labels)) < 0.3).astype(float)
  probs = np.clip(truth * 0.35 + rng.random((n, num_labels)) * 0.65, 0, 1)
  labels = np.where(rng.random((n, num_labels)) < unknown, -1.0, truth)
  return labels, probs, np.arange(n) // 2


def test_calibration_leaves_unknown_entries_out():
  labels, probs, _ = _with_unknowns()
  known = labels >= 0
  # The temperature: fitted as if the unknown entries were not there.
  assert calibration.fit_temperature(labels, probs) == pytest.approx(
    calibration.fit_temperature(labels[known], probs[known]), rel=1e-9
  )
  assert calibration.binary_cross_entropy(labels, probs) == pytest.approx(
    calibration.binary_cross_entropy(labels[known], probs[known]), rel=1e-12
  )
  for k in range(labels.shape[1]):
    rows = known[:, k]
    assert calibration.expected_calibration_error(labels[:, k], probs[:, k]) == pytest.approx(
      calibration.expected_calibration_error(labels[rows, k], probs[rows, k]), rel=1e-12
    )
    ours = calibration.reliability_bins(labels[:, k], probs[:, k])
    theirs = calibration.reliability_bins(labels[rows, k], probs[rows, k])
    for key in ours:
      np.testing.assert_array_equal(ours[key], theirs[key])
  names = ('a', 'b', 'c')
  result = calibration.calibration_report(labels, probs, labels, probs, names)
  for k, name in enumerate(names):
    rows = known[:, k]
    scaled = calibration.apply_temperature(probs[rows, k], result['temperature'])
    assert result['per_label'][name]['ece_calibrated'] == pytest.approx(
      calibration.expected_calibration_error(labels[rows, k], scaled), rel=1e-9
    )
  # An unknown entry's probability changes nothing.
  moved = np.where(known, probs, 1 - probs)
  assert calibration.calibration_report(labels, moved, labels, moved, names) == result
  with pytest.raises(ValueError, match='no known label'):
    calibration.fit_temperature(np.full((4, 2), -1.0), np.full((4, 2), 0.5))


def test_curves_leave_unknown_entries_out():
  labels, probs, patients = _with_unknowns(seed=3)
  known = labels >= 0
  names = ('a', 'b', 'c')
  bands = figures.curve_bands(labels, probs, patients, names, num_resamples=30)
  for k, name in enumerate(names):
    rows = known[:, k]
    alone = figures.curve_bands(
      labels[rows, k : k + 1], probs[rows, k : k + 1], patients[rows], [name], num_resamples=30
    )
    for key in ('roc', 'pr'):  # The curve itself: that of the data without those rows.
      np.testing.assert_array_equal(bands[name][key][0], alone[name][key][0])
  # The bands (same resamples of patients): blind to what an unknown entry holds.
  moved = np.where(known, probs, 1 - probs)
  again = figures.curve_bands(labels, moved, patients, names, num_resamples=30)
  for name in names:
    for key in ('roc', 'pr'):
      for ours, theirs in zip(bands[name][key], again[name][key]):
        np.testing.assert_array_equal(ours, theirs)
  # A label whose every entry is unknown has no curve, and no exception.
  labels[:, 2] = -1
  assert set(figures.curve_bands(labels, probs, patients, names, num_resamples=5)) == {'a', 'b'}


def test_report_of_a_dataset_with_unknown_labels():
  names = ('Effusion', 'Edema', 'Pleural Other')
  labels, probs, _ = _with_unknowns(seed=5, n=120)
  labels[:, 2] = -1  # Every 'Pleural Other' unknown.
  thresholds = metrics.youden_thresholds(labels, probs, names)
  thresholds['Pleural Other'] = 0.5  # As if validation had both classes.
  evaluation = _fake_evaluation(labels, probs, thresholds, names)
  rows = report_page.per_label_rows(evaluation)
  assert [row['label'] for row in rows] == list(names)
  known = int((labels[:, 0] >= 0).sum())
  positives = int((labels[:, 0] > 0).sum())
  assert rows[0]['prevalence'] == (
    f'{positives / known:.1%} ({positives} of {known} known; {len(labels) - known} unknown)'
  )
  assert rows[0]['reasons'] == {}
  assert set(rows[2]['reasons']) >= {'auroc', 'prevalence', 'sensitivity', 'ece'}
  assert 'unknown' in rows[2]['reasons']['auroc']
  table = report_page.per_label_table_html(rows)
  assert table.count('<tr data-label=') == 3 and 'Hernia' not in table
  assert evaluation.report['per_label']['Effusion']['num_unknown'] == len(labels) - known
  # Prevalence line of the PR panel: among the known entries.
  figure = report_page.curve_figures(evaluation)
  panels = [a for a in figure['pr'].axes if a.axison]
  assert [a.get_title().split('\n')[0] for a in panels] == list(names)
  prevalence_line = panels[0].lines[-1].get_ydata()
  assert prevalence_line[0] == pytest.approx(positives / known)
  assert 'all 3 labels' in report_page.calibration_html(evaluation.report['calibration'])


def test_gallery_note_names_the_box_only_where_one_is_drawn(tmp_path):
  shutil.copy(SAMPLE, tmp_path / 'a.png')
  entry = {'image': 'a.png', 'label': 'Effusion', 'probability': 0.9, 'file': 'a.png'}
  with_box = report_page.gallery_html(
    str(tmp_path), [dict(entry, box=False), dict(entry, box=True)]
  )
  assert "Solid cyan: the dataset's box (NIH's annotations)." in with_box
  assert '(an image with a box first)' in with_box
  for gallery in ([dict(entry, box=False)], [entry]):  # No box drawn; entry of an older run.
    without = report_page.gallery_html(str(tmp_path), gallery)
    assert 'cyan' not in without and 'NIH' not in without and 'box first' not in without
    assert "Dashed white: the model's region" in without


# ----------------------------------------------- the page, in a real browser --


@pytest.fixture(scope='module')
def evaluated_run(tiny_run, tmp_path_factory):
  """A copy of the tiny run, evaluated on the test split by the command line."""
  workdir = str(tmp_path_factory.mktemp('report') / 'run')
  shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns('eval', 'predict'))
  result = subprocess.run(
    runs.tool_command('evaluate', '--workdir', workdir, '--bootstrap', 30, '--gallery', 4),
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_report_page_in_chromium(evaluated_run):
  why = chromium.missing()
  if why:
    pytest.fail(why)
  path = os.path.join(evaluated_run, 'eval', 'test', 'report.html')
  page = chromium.inspect(path)
  assert page['console'] == []
  assert page['rows'] == list(LABELS)
  # ROC, PR, reliability, and the 4 heatmaps: every one decoded and drawn.
  assert len(page['images']) == 3 + 4
  for image in page['images']:
    assert image['complete'] and image['width'] > 0 and image['scheme'] == 'data', image
  assert page['resources'] == []  # Nothing fetched.
  for words in ('checkpoint step', 'Temperature', 'IoBB', 'synthetic', 'patients'):
    assert words in page['text'], words
  with open(path, encoding='utf-8') as f:
    text = f.read()
  assert os.path.dirname(evaluated_run) not in text  # No path of this machine.
  assert not re.search(r'(src|href)="(?!data:)', text)
  with open(os.path.join(evaluated_run, 'eval', 'test', 'metrics.json')) as f:
    summary = json.load(f)
  assert 0.05 <= summary['calibration']['temperature'] <= 20
  # Synthetic examples carry boxes, preferred in the gallery: the note names them.
  assert any(entry['box'] for entry in summary['gallery'])
  assert "Solid cyan: the dataset's box (NIH's annotations)." in page['text']


def test_chromium_check_catches_a_broken_page(tmp_path):
  """The browser check can fail: a broken image and a console error are both seen."""
  why = chromium.missing()
  if why:
    pytest.fail(why)
  page = tmp_path / 'broken.html'
  page.write_text(
    '<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA" alt="x">'
    '<script>console.error("boom")</script></body></html>'
  )
  result = chromium.inspect(str(page))
  assert any('boom' in message for message in result['console'])
  assert result['images'][0]['width'] == 0 and result['rows'] == []


def test_predict_calibrated_applies_evaluates_temperature(evaluated_run, tmp_path):
  with open(os.path.join(evaluated_run, 'eval', 'calibration.json')) as f:
    saved = json.load(f)
  outputs = {}
  for flag in ('', '--calibrated'):
    out = tmp_path / (flag.strip('-') or 'plain')
    command = [
      sys.executable,
      '-m',
      'chexnet_jax.predict',
      SAMPLE,
      '--workdir',
      evaluated_run,
      '--checkpoint',
      str(saved['step']),
      '--top_k',
      '1',
      '--output_dir',
      str(out),
      *([flag] if flag else []),
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(out / 'predictions.json') as f:
      outputs[flag] = json.load(f)
  assert outputs['--calibrated']['temperature'] == pytest.approx(saved['temperature'])
  plain = np.array(list(outputs['']['results'][0]['probabilities'].values()))
  calibrated = np.array(list(outputs['--calibrated']['results'][0]['probabilities'].values()))
  np.testing.assert_allclose(
    calibrated, calibration.apply_temperature(plain, saved['temperature']), atol=1e-5
  )
  assert os.path.getsize(outputs['--calibrated']['results'][0]['top_findings'][0]['heatmap']) > 0


def test_predict_calibrated_without_evaluate_is_a_clear_error(tiny_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir, ignore=shutil.ignore_patterns('eval', 'predict'))
  result = subprocess.run(
    [sys.executable, '-m', 'chexnet_jax.predict', SAMPLE, '--workdir', workdir, '--calibrated'],
    cwd=REPO,
    capture_output=True,
    text=True,
  )
  assert result.returncode == 1 and 'calibration.json' in result.stderr
  assert 'chexnet_jax.evaluate' in result.stderr


def test_a_column_declared_once_shows_in_the_csv_the_console_and_the_page(monkeypatch, tmp_path):
  from chexnet_jax.report import eval_outputs
  from chexnet_jax.evaluation import label_columns

  rng = np.random.default_rng(1)
  labels = (rng.random((40, 14)) < 0.3).astype(float)
  probs = rng.random((40, 14))
  evaluation = _fake_evaluation(labels, probs, metrics.youden_thresholds(labels, probs))
  negatives = label_columns.Column(
    'num_negative',
    'Negatives',
    lambda row: str(row['num_known'] - row['num_positive']),
    csv=(('num_negative', lambda row: row.get('num_known', 0) - row.get('num_positive', 0)),),
    console=(('Neg', 6, lambda row: str(row.get('num_known', 0) - row.get('num_positive', 0))),),
  )
  monkeypatch.setattr(label_columns, 'COLUMNS', (*label_columns.COLUMNS, negatives))
  monkeypatch.setattr(label_columns, 'HTML_COLUMNS', (*label_columns.HTML_COLUMNS, negatives))
  expected = int((labels[:, 0] == 0).sum())
  eval_outputs.write_auroc_csv(tmp_path / 'auroc.csv', evaluation.report)
  with open(tmp_path / 'auroc.csv', newline='') as f:
    table = {row['pathology']: row for row in csv.DictReader(f)}
  assert int(table[LABELS[0]]['num_negative']) == expected
  console = eval_outputs.format_auroc_table(evaluation.report).splitlines()
  assert console[0].split()[-1] == 'Neg' and console[2].split()[-1] == str(expected)
  page = report_page.per_label_table_html(report_page.per_label_rows(evaluation))
  assert '<th>Negatives</th>' in page and f'<td>{expected}</td>' in page


@pytest.mark.parametrize('mask, mode', [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_published_folders_follow_the_umask(tmp_path, mask, mode):
  """eval/<split>, score's output and predict's heatmaps/ are all published this way."""
  old = os.umask(mask)
  try:
    with eval_outputs.published(str(tmp_path / 'out')) as staging:
      open(os.path.join(staging, 'a.txt'), 'w').close()
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'out').st_mode) == mode


_NO_PNGS = {'roc': b'', 'pr': b'', 'reliability': b''}


@pytest.mark.parametrize('train_images, shown', [(232, True), (None, False), (78_468, False)])
def test_a_model_trained_on_few_images_has_a_banner(tmp_path, train_images, shown):
  """A demo-sized training set: the page says the numbers are not a result."""
  rng = np.random.default_rng(0)
  labels = (rng.random((40, 14)) < 0.3).astype(float)
  probs = rng.random((40, 14))
  thresholds = metrics.youden_thresholds(labels, probs)
  evaluation = _fake_evaluation(labels, probs, thresholds, train_images=train_images)
  page = report_page.render(evaluation, str(tmp_path), (), None, _NO_PNGS)
  assert ('id="banner"' in page) == shown
  if shown:
    assert 'trained on 232 images, far too few' in page
    assert page.index('id="banner"') < page.index('id="run"')


def test_the_notebooks_default_run_is_the_one_make_demo_trains():
  with open(os.path.join(REPO, 'Makefile')) as f:
    demo_run = re.search(r'^DEMO_RUN :?= (\S+)$', f.read(), re.M).group(1)
  with open(os.path.join(REPO, 'notebooks', 'evaluate_checkpoint.ipynb')) as f:
    default = re.search(r"CHEXNET_WORKDIR', '([^']+)'", f.read()).group(1)
  assert default == demo_run
  with open(os.path.join(REPO, 'docs', 'evaluation.md')) as f:
    docs = f.read()
  assert 'jupyter nbconvert --to html --execute' in docs and f'`{demo_run}`' in docs
