"""chexnet_jax/evaluation/metrics.py against scikit-learn and hand-checked cases."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from chexnet_jax.evaluation import label_columns
from chexnet_jax.evaluation import metrics
from input_pipeline import labels as labels_lib

NAMES = ('a', 'b', 'c')


def _random_predictions(num=200, seed=0):
  rng = np.random.default_rng(seed)
  labels = (rng.random((num, 3)) < 0.3).astype(np.float32)
  probs = np.clip(0.35 * labels + 0.65 * rng.random((num, 3)), 0, 1).astype(np.float32)
  patients = rng.integers(0, num // 3, size=num)
  return labels, probs, patients


def test_auroc_and_auprc_equal_sklearn():
  labels, probs, _ = _random_predictions()
  aurocs = metrics.auroc_per_label(labels, probs, NAMES)
  auprcs = metrics.auprc_per_label(labels, probs, NAMES)
  for k, name in enumerate(NAMES):
    assert aurocs[name] == pytest.approx(sk_metrics.roc_auc_score(labels[:, k], probs[:, k]))
    assert auprcs[name] == pytest.approx(
      sk_metrics.average_precision_score(labels[:, k], probs[:, k])
    )


def test_default_names_are_the_14_labels_and_one_class_label_is_nan():
  labels = np.zeros((6, 14))
  labels[:3, 0] = 1
  probs = np.linspace(0, 1, 84).reshape(6, 14)
  aurocs = metrics.auroc_per_label(labels, probs)
  assert tuple(aurocs) == labels_lib.LABELS
  assert aurocs['Atelectasis'] == 0.0  # Positives are the first (lowest-scored) rows.
  assert np.isnan(aurocs['Hernia'])
  assert metrics.mean_score(aurocs) == 0.0


def test_shape_mismatch_names_the_file():
  with pytest.raises(ValueError, match='metrics.py'):
    metrics.auroc_per_label(np.zeros((4, 2)), np.zeros((4, 3)), NAMES)


def test_integer_weights_equal_duplicated_rows():
  labels, probs, _ = _random_predictions(60)
  weights = np.random.default_rng(1).integers(0, 3, size=60).astype(float)
  rows = np.repeat(np.arange(60), weights.astype(int))
  weighted = metrics.auroc_per_label(labels, probs, NAMES, weights=weights)
  duplicated = metrics.auroc_per_label(labels[rows], probs[rows], NAMES)
  for name in NAMES:
    assert weighted[name] == pytest.approx(duplicated[name])


def test_bootstrap_resamples_whole_patients():
  patients = np.array([7, 7, 7, 3, 3, 9])
  for weights in metrics.bootstrap_weights(patients, num_resamples=20, seed=0):
    assert weights[0] == weights[1] == weights[2]
    assert weights[3] == weights[4]
    assert weights[0] + weights[3] + weights[5] == 3  # 3 patients drawn, with replacement.


def test_bootstrap_intervals_are_seeded_and_contain_the_estimate():
  labels, probs, patients = _random_predictions()
  first = metrics.bootstrap_intervals(
    labels, probs, patients, names=NAMES, num_resamples=50, seed=3
  )
  again = metrics.bootstrap_intervals(
    labels, probs, patients, names=NAMES, num_resamples=50, seed=3
  )
  assert first == again
  aurocs = metrics.auroc_per_label(labels, probs, NAMES)
  for name in NAMES:
    interval = first['auroc'][name]
    assert interval.low <= aurocs[name] <= interval.high
    assert interval.high - interval.low > 0.01
  mean = first['auroc']['mean']
  assert mean.low <= metrics.mean_score(aurocs) <= mean.high


def test_youden_threshold_separates_perfectly_separable_scores():
  labels = np.array([[0], [0], [0], [1], [1]])
  probs = np.array([[0.1], [0.2], [0.4], [0.6], [0.9]])
  threshold = metrics.youden_thresholds(labels, probs, ('x',))['x']
  assert 0.4 < threshold <= 0.6
  sens, spec = metrics.sensitivity_specificity(labels, probs, {'x': threshold}, ('x',))['x']
  assert (sens, spec) == (1.0, 1.0)


def test_sensitivity_specificity_hand_computed():
  labels = np.array([[1], [1], [1], [1], [0], [0], [0], [0], [0]])
  probs = np.array([[0.9], [0.8], [0.3], [0.2], [0.7], [0.1], [0.1], [0.1], [0.1]])
  sens, spec = metrics.sensitivity_specificity(labels, probs, {'x': 0.5}, ('x',))['x']
  assert sens == pytest.approx(2 / 4)
  assert spec == pytest.approx(4 / 5)


def test_classification_report_is_json_ready():
  import json

  labels, probs, patients = _random_predictions()
  labels[:, 2] = 0  # A label without positives: nulls, not NaN, in JSON.
  thresholds = metrics.youden_thresholds(labels, probs, NAMES)
  report = metrics.classification_report(
    labels, probs, patients, thresholds=thresholds, names=NAMES, num_resamples=20
  )
  text = json.dumps(report, allow_nan=False)
  assert json.loads(text)['per_label']['c']['auroc'] is None
  assert report['mean_auroc'] == pytest.approx(
    np.mean([report['per_label'][n]['auroc'] for n in ('a', 'b')])
  )
  assert report['num_patients'] == len(np.unique(patients))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ranked_column_equals_sklearn_with_weights_and_ties(seed):
  rng = np.random.default_rng(seed)
  labels = (rng.random(300) < 0.2).astype(float)
  probs = np.round(rng.random(300) * 0.5 + 0.3 * labels, 2)  # Many ties.
  weights = rng.integers(0, 4, size=300).astype(float)  # Zeros too.
  auroc, average_precision = metrics._RankedColumn(labels, probs).scores(weights)
  assert auroc == pytest.approx(
    sk_metrics.roc_auc_score(labels, probs, sample_weight=weights), abs=1e-12
  )
  assert average_precision == pytest.approx(
    sk_metrics.average_precision_score(labels, probs, sample_weight=weights), abs=1e-12
  )


def test_bootstrap_mean_interval_uses_resamples_of_the_same_patients():
  labels, probs, patients = _random_predictions()
  intervals = metrics.bootstrap_intervals(
    labels, probs, patients, names=NAMES, num_resamples=30, seed=0
  )
  aurocs = []
  for weights in metrics.bootstrap_weights(patients, 30, seed=0):
    aurocs.append(metrics.mean_score(metrics.auroc_per_label(labels, probs, NAMES, weights)))
  low, high = np.percentile(aurocs, [2.5, 97.5])
  assert intervals['auroc']['mean'].low == pytest.approx(low, abs=1e-12)
  assert intervals['auroc']['mean'].high == pytest.approx(high, abs=1e-12)


def test_the_bootstrap_says_how_many_resamples_it_dropped():
  """A resample where a label has one class has no AUROC: it is left out of that
  label's interval, and the report says how many were, so a small-count interval
  that rests on fewer resamples is seen as such."""
  names = ('Rare', 'Common')
  patients = np.arange(20)
  labels = np.zeros((20, 2), np.float32)
  labels[0, 0] = 1  # One positive: most resamples miss it.
  labels[::2, 1] = 1
  probs = np.random.default_rng(0).uniform(size=(20, 2))
  report = metrics.classification_report(
    labels, probs, patients, thresholds={n: 0.5 for n in names}, names=names, num_resamples=200
  )
  rare, common = report['per_label']['Rare'], report['per_label']['Common']
  weights = list(metrics.bootstrap_weights(patients, 200, 0))
  missing = sum(np.asarray(w)[0] == 0 for w in weights)  # Resamples without the positive.
  assert 0 < missing < 200
  assert rare['auroc_ci_dropped'] == missing and common['auroc_ci_dropped'] == 0
  assert report['bootstrap']['dropped'] == {'Rare': missing}
  assert any(f'{missing} of 200 bootstrap resamples' in c for c in label_columns.cautions(rare))
