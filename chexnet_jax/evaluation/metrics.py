"""Classification metrics per label of a run (NIH's 14 or a dataset's own).

AUROC and AUPRC per label (scikit-learn), patient-resampled bootstrap confidence
intervals, and operating thresholds chosen on validation (Youden's J) with the
sensitivity/specificity they give on another split.

Conventions: `labels` and `probs` are [N, L] arrays (L = len(names)); a label with
only one class present has no AUROC and gets nan, never an exception, because a
small validation split can easily lack e.g. Hernia positives.
"""

import dataclasses
import warnings

import numpy as np
from sklearn import metrics as sk_metrics

from chexnet_jax.model import losses
from input_pipeline import labels as labels_lib


def _check_shapes(labels, probs, names):
  labels, probs = np.asarray(labels), np.asarray(probs)
  if labels.shape != probs.shape or labels.ndim != 2:
    raise ValueError(
      f'chexnet_jax/evaluation/metrics.py: labels {labels.shape} and probs {probs.shape} '
      'must both be [num_examples, num_labels].'
    )
  if labels.shape[1] != len(names):
    raise ValueError(
      f'chexnet_jax/evaluation/metrics.py: {labels.shape[1]} label columns but '
      f'{len(names)} names; pass names= matching the columns.'
    )
  return labels, probs


def _has_both_classes(column, weights=None):
  present = column if weights is None else column[weights > 0]
  return 0 < present.sum() < len(present)


def known(labels, k):
  """Rows whose label k is known: a label below 0 is unknown (masked out, e.g.
  CheXpert's uncertain under U-Ignore) and is left out of every metric."""
  return losses.is_known(np.asarray(labels)[:, k])


def _per_label(score_fn, labels, probs, names, weights=None):
  """Applies score_fn(y, p, sample_weight) to every column; nan where undefined."""
  labels, probs = _check_shapes(labels, probs, names)
  scores = {}
  for k, name in enumerate(names):
    rows = known(labels, k)
    w = None if weights is None else np.asarray(weights)[rows]
    if _has_both_classes(labels[rows, k], w):
      scores[name] = float(score_fn(labels[rows, k], probs[rows, k], sample_weight=w))
    else:
      scores[name] = float('nan')
  return scores


def auroc_per_label(labels, probs, names=labels_lib.LABELS, weights=None):
  """Area under the ROC curve per label -> {name: float} (nan if a label has one class)."""
  return _per_label(sk_metrics.roc_auc_score, labels, probs, names, weights)


def auprc_per_label(labels, probs, names=labels_lib.LABELS, weights=None):
  """Area under the precision-recall curve (average precision) per label."""
  return _per_label(sk_metrics.average_precision_score, labels, probs, names, weights)


def mean_score(scores):
  """Mean over the labels that have a score (nan ones, e.g. one-class labels, skipped)."""
  values = np.array(list(scores.values()), dtype=np.float64)
  return float(np.nanmean(values)) if np.isfinite(values).any() else float('nan')


# ----------------------------------------------------------------------------
# Patient-resampled bootstrap.


def _patient_groups(patients):
  """Maps every image to the position of its patient among the unique patients."""
  _, image_to_patient = np.unique(np.asarray(patients), return_inverse=True)
  return image_to_patient.ravel()


def bootstrap_weights(patients, num_resamples, seed):
  """Yields per-image multiplicities of patient-level resamples with replacement.

  Images of one patient are correlated, so we resample patients (all their images
  together), as the CheXNet literature does; an image-level bootstrap gives too-narrow
  intervals. A weight vector (how many times each image was drawn) is equivalent to
  concatenating the drawn images and cheaper.
  """
  image_to_patient = _patient_groups(patients)
  num_patients = image_to_patient.max() + 1
  rng = np.random.default_rng(seed)
  for _ in range(num_resamples):
    drawn = rng.integers(0, num_patients, size=num_patients)
    patient_counts = np.bincount(drawn, minlength=num_patients)
    yield patient_counts[image_to_patient].astype(np.float64)


@dataclasses.dataclass
class Interval:
  low: float
  high: float
  # Resamples left out: those where the metric is undefined (a label with one class).
  dropped: int = 0


def _percentile_interval(samples, confidence):
  samples = np.asarray(samples, dtype=np.float64)
  dropped = int((~np.isfinite(samples)).sum())
  samples = samples[np.isfinite(samples)]
  if samples.size == 0:
    return Interval(float('nan'), float('nan'), dropped)
  tail = 100 * (1 - confidence) / 2
  low, high = np.percentile(samples, [tail, 100 - tail])
  return Interval(float(low), float(high), dropped)


class _RankedColumn:
  """One label's scores sorted once, so each bootstrap resample costs O(N), not a sort.

  scikit-learn re-sorts on every call: 1000 resamples x NIH's 14 labels x 2 metrics on
  the 25,596-image test set took ~5 minutes; this takes seconds. Equal to
  sklearn's roc_auc_score / average_precision_score with sample_weight (tested).
  """

  def __init__(self, labels, probs):
    self.order = np.argsort(-np.asarray(probs), kind='mergesort')
    self.positive = np.asarray(labels)[self.order] > 0.5
    # Last position of each run of equal scores: one ROC point per distinct threshold.
    self.ends = np.r_[np.flatnonzero(np.diff(np.asarray(probs)[self.order])), len(probs) - 1]

  def scores(self, weights):
    """(AUROC, average precision) under per-example weights; nan if a class is absent."""
    if not len(self.order):  # Every label of this column unknown.
      return float('nan'), float('nan')
    weights = weights[self.order]
    true_pos = np.cumsum(weights * self.positive)[self.ends]
    false_pos = np.cumsum(weights * ~self.positive)[self.ends]
    num_pos, num_neg = true_pos[-1], false_pos[-1]
    if num_pos == 0 or num_neg == 0:
      return float('nan'), float('nan')
    tpr, fpr = np.r_[0.0, true_pos / num_pos], np.r_[0.0, false_pos / num_neg]
    auroc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    predicted = true_pos + false_pos
    precision = np.divide(true_pos, predicted, out=np.zeros_like(true_pos), where=predicted > 0)
    average_precision = float(np.sum(np.diff(tpr) * precision))
    return auroc, average_precision


def bootstrap_intervals(
  labels, probs, patients, *, names=labels_lib.LABELS, num_resamples=1000, seed=0, confidence=0.95
):
  """Percentile bootstrap CIs of AUROC and AUPRC per label and of their means.

  Returns {'auroc': {name: Interval, 'mean': Interval}, 'auprc': {...}}. Seeded, so
  the same predictions always give the same intervals.
  """
  labels, probs = _check_shapes(labels, probs, names)
  rows = [known(labels, k) for k in range(len(names))]
  columns = [_RankedColumn(labels[rows[k], k], probs[rows[k], k]) for k in range(len(names))]
  samples = np.full((2, num_resamples, len(names)), np.nan)  # [metric, resample, label]
  for r, weights in enumerate(bootstrap_weights(patients, num_resamples, seed)):
    for k, column in enumerate(columns):
      samples[:, r, k] = column.scores(np.asarray(weights)[rows[k]])
  result = {}
  for m, metric in enumerate(('auroc', 'auprc')):
    per_label = {
      name: _percentile_interval(samples[m, :, k], confidence) for k, name in enumerate(names)
    }
    with np.errstate(all='ignore'), warnings.catch_warnings():
      warnings.simplefilter('ignore', RuntimeWarning)  # All-nan resamples: skipped below.
      means = np.nanmean(samples[m], axis=1)
    per_label['mean'] = _percentile_interval(means, confidence)
    result[metric] = per_label
  return result


# ----------------------------------------------------------------------------
# Operating points.


def youden_thresholds(labels, probs, names=labels_lib.LABELS):
  """Per label, the probability threshold maximising Youden's J = TPR - FPR.

  Choose these on validation and apply them to test: choosing on test itself
  overstates sensitivity and specificity.
  """
  labels, probs = _check_shapes(labels, probs, names)
  thresholds = {}
  for k, name in enumerate(names):
    rows = known(labels, k)
    if not _has_both_classes(labels[rows, k]):
      thresholds[name] = float('nan')
      continue
    fpr, tpr, candidates = sk_metrics.roc_curve(labels[rows, k], probs[rows, k])
    # sklearn's first candidate is +inf (predict nothing positive); J is 0 there anyway.
    best = int(np.argmax(tpr - fpr))
    thresholds[name] = float(min(candidates[best], 1.0))
  return thresholds


def sensitivity_specificity(labels, probs, thresholds, names=labels_lib.LABELS):
  """{name: (sensitivity, specificity)} predicting positive when prob >= threshold."""
  labels, probs = _check_shapes(labels, probs, names)
  result = {}
  for k, name in enumerate(names):
    rows = known(labels, k)
    truth = labels[rows, k] > 0.5
    predicted = probs[rows, k] >= thresholds[name]
    sensitivity = predicted[truth].mean() if truth.any() else float('nan')
    specificity = (~predicted[~truth]).mean() if (~truth).any() else float('nan')
    if not np.isfinite(thresholds[name]):
      sensitivity = specificity = float('nan')
    result[name] = (float(sensitivity), float(specificity))
  return result


# ----------------------------------------------------------------------------
# The full report written by evaluate.py and shown by the notebook.


def _nan_to_none(value):
  return None if value is None or not np.isfinite(value) else float(value)


def classification_report(
  labels, probs, patients, *, thresholds, names=labels_lib.LABELS, num_resamples=1000, seed=0
):
  """JSON-ready per-label and mean metrics with 95% patient-bootstrap intervals.

  `thresholds` ({name: float}) should come from youden_thresholds on validation.
  Returns {'per_label': {name: {...}}, 'mean_auroc', 'mean_auroc_ci', 'mean_auprc',
  'mean_auprc_ci', 'num_examples', 'num_patients'}; nan becomes None (JSON null).
  Per label, num_positive counts its positives and num_known / num_unknown its known
  and unknown (below 0, left out of every number) entries.
  """
  aurocs = auroc_per_label(labels, probs, names)
  auprcs = auprc_per_label(labels, probs, names)
  intervals = bootstrap_intervals(
    labels, probs, patients, names=names, num_resamples=num_resamples, seed=seed
  )
  operating = sensitivity_specificity(labels, probs, thresholds, names)
  per_label = {}
  for k, name in enumerate(names):
    ci, pr_ci = intervals['auroc'][name], intervals['auprc'][name]
    per_label[name] = {
      'auroc': _nan_to_none(aurocs[name]),
      'auroc_ci': [_nan_to_none(ci.low), _nan_to_none(ci.high)],
      'auprc': _nan_to_none(auprcs[name]),
      'auprc_ci': [_nan_to_none(pr_ci.low), _nan_to_none(pr_ci.high)],
      'threshold': _nan_to_none(thresholds[name]),
      'sensitivity': _nan_to_none(operating[name][0]),
      'specificity': _nan_to_none(operating[name][1]),
      'num_positive': int((np.asarray(labels)[:, k] > 0).sum()),
      'num_known': int(known(labels, k).sum()),
      'num_unknown': int((~known(labels, k)).sum()),
      # Of num_resamples: left out of the intervals (the label had one class there).
      'auroc_ci_dropped': ci.dropped,
      'auprc_ci_dropped': pr_ci.dropped,
      'num_resamples': num_resamples,
    }
  mean_ci, mean_pr_ci = intervals['auroc']['mean'], intervals['auprc']['mean']
  return {
    'per_label': per_label,
    'mean_auroc': _nan_to_none(mean_score(aurocs)),
    'mean_auroc_ci': [_nan_to_none(mean_ci.low), _nan_to_none(mean_ci.high)],
    'mean_auprc': _nan_to_none(mean_score(auprcs)),
    'mean_auprc_ci': [_nan_to_none(mean_pr_ci.low), _nan_to_none(mean_pr_ci.high)],
    'num_examples': int(len(labels)),
    'num_patients': int(len(np.unique(np.asarray(patients)))),
    'bootstrap': {
      'num_resamples': num_resamples,
      'seed': seed,
      'unit': 'patient',
      'confidence': 0.95,
      # Per label with any: resamples left out of its AUROC interval.
      'dropped': {
        name: row['auroc_ci_dropped'] for name, row in per_label.items() if row['auroc_ci_dropped']
      },
    },
  }


# ----------------------------------------------------------------------------
# Two models on the same images.


def paired_auroc_difference(
  labels, probs_a, probs_b, patients, *, names, num_resamples=1000, seed=0, confidence=0.95
):
  """Per label and for the mean: AUROC of model A minus model B on the same images.

  Both models are scored on every patient resample (the same weights), so the
  interval is that of the paired difference. The two-sided p-value is twice the
  smaller share of resamples on either side of 0; where none reaches 0 it is only
  known to be below 1/(B+1) (B: the resamples used), and 'p_below' holds that bound.
  Returns {name or 'mean': {'difference', 'ci': [low, high], 'p_value', 'p_below',
  'num_resamples'}}; None where a label has one class.
  """
  labels, probs_a = _check_shapes(labels, probs_a, names)
  _, probs_b = _check_shapes(labels, probs_b, names)
  rows = [known(labels, k) for k in range(len(names))]
  pairs = [
    (_RankedColumn(labels[r, k], probs_a[r, k]), _RankedColumn(labels[r, k], probs_b[r, k]))
    for k, r in enumerate(rows)
  ]
  samples = np.full((num_resamples, len(names)), np.nan)
  for i, weights in enumerate(bootstrap_weights(patients, num_resamples, seed)):
    for k, (column_a, column_b) in enumerate(pairs):
      w = np.asarray(weights)[rows[k]]
      samples[i, k] = column_a.scores(w)[0] - column_b.scores(w)[0]
  auroc_a = auroc_per_label(labels, probs_a, names)
  auroc_b = auroc_per_label(labels, probs_b, names)
  observed = {name: auroc_a[name] - auroc_b[name] for name in names}
  with np.errstate(all='ignore'), warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # One-class labels: nan, skipped.
    mean_samples = np.nanmean(samples, axis=1)
  result = {
    name: _paired_summary(observed[name], samples[:, k], confidence) for k, name in enumerate(names)
  }
  result['mean'] = _paired_summary(mean_score(observed), mean_samples, confidence)
  return result


def _paired_summary(observed, samples, confidence):
  samples = np.asarray(samples)[np.isfinite(samples)]
  if not np.isfinite(observed) or not samples.size:
    return {'difference': None, 'ci': [None, None], 'p_value': None, 'p_below': None}
  interval = _percentile_interval(samples, confidence)
  tail = min((samples <= 0).mean(), (samples >= 0).mean())
  # No resample reached 0: all the bootstrap can say is p < 1/(B+1) (p_below).
  floor = 1 / (samples.size + 1)
  return {
    'difference': float(observed),
    'ci': [interval.low, interval.high],
    'p_value': float(min(1.0, max(2 * tail, floor))),
    'p_below': floor if tail == 0 else None,
    'num_resamples': int(samples.size),
  }
