"""Can the probabilities be trusted? Reliability, expected calibration error, temperature.

Reliability: the predictions of one label are put in NUM_BINS equal-width bins of
predicted probability; a calibrated model's positives make up, in each bin, about the
bin's mean prediction. Expected calibration error (ECE, Guo et al. 2017) is the
example-weighted mean of |observed frequency - mean prediction| over the bins.

Temperature scaling (Guo et al. 2017): one temperature T > 0, shared by the run's
labels, divides every logit: p' = sigmoid(logit / T). It is fitted on the validation
split by minimising the binary cross-entropy of all the run's labels at once, so the
ranking of the images, and with it every AUROC, is unchanged; only the probabilities
move. T > 1 softens over-confident probabilities, T < 1 sharpens timid ones.

Unknown labels (below 0: CheXpert's uncertain under U-Ignore, masked out of the loss
and metrics.py) are left out everywhere here: of the fit, the cross-entropy, the bins
and the ECE, exactly as if their entries were not in the data.

evaluate writes the fitted temperature to DIR/eval/calibration.json (with the
checkpoint step it belongs to); `python -m chexnet_jax.predict --calibrated` applies it.
"""

import json
import os

import numpy as np
from scipy import optimize

from chexnet_jax.runtime import files
from chexnet_jax import errors
from chexnet_jax.model import losses

NUM_BINS = 10
EPSILON = 1e-7
CALIBRATION_FILE = 'calibration.json'


def logits_from_probs(probs):
  """Inverse sigmoid, clipped so probabilities of exactly 0 or 1 stay finite."""
  probs = np.clip(np.asarray(probs, dtype=np.float64), EPSILON, 1 - EPSILON)
  return np.log(probs) - np.log1p(-probs)


def apply_temperature(probs, temperature):
  """sigmoid(logit(probs) / temperature), element-wise; temperature 1 is the identity."""
  return 1 / (1 + np.exp(-logits_from_probs(probs) / float(temperature)))


def known_entries(labels, values):
  """(labels, values) of the known entries only, both flattened: a label below 0 is
  unknown (masked, e.g. CheXpert's uncertain under U-Ignore) and is dropped."""
  labels = np.asarray(labels, dtype=np.float64)
  values = np.asarray(values, dtype=np.float64)
  if labels.shape != values.shape:
    raise ValueError(
      f'chexnet_jax/evaluation/calibration.py: labels {labels.shape} and probabilities '
      f'{values.shape} must have the same shape.'
    )
  known = losses.is_known(labels.ravel())
  return labels.ravel()[known], values.ravel()[known]


def binary_cross_entropy(labels, probs):
  """Mean BCE over the known entries (nan if there is none)."""
  labels, probs = known_entries(labels, probs)
  if labels.size == 0:
    return float('nan')
  probs = np.clip(probs, EPSILON, 1 - EPSILON)
  return float(-np.mean(labels * np.log(probs) + (1 - labels) * np.log1p(-probs)))


def fit_temperature(labels, probs, bounds=(0.05, 20.0)):
  """The temperature minimising the cross-entropy of all known labels at once.

  labels, probs: [N, L] (or [N]); entries whose label is below 0 (unknown) are left
  out. Returns a float in `bounds`. Searched on log T, which the loss is smooth in.
  """
  labels, probs = known_entries(labels, probs)
  logits = logits_from_probs(probs)
  if labels.size == 0:
    raise errors.UserValueError(
      'chexnet_jax/evaluation/calibration.py: no known label to fit a temperature on; '
      'evaluate a split with images (and labels that are not all unknown).'
    )

  def loss(log_t):
    scaled = logits / np.exp(log_t)
    # log(1 + exp(-|z|)) form of the BCE on logits: stable for large |z|.
    return float(
      np.mean(np.maximum(scaled, 0) - scaled * labels + np.log1p(np.exp(-np.abs(scaled))))
    )

  result = optimize.minimize_scalar(
    loss, bounds=np.log(bounds), method='bounded', options={'xatol': 1e-6}
  )
  return float(np.exp(result.x))


def reliability_bins(labels, probs, num_bins=NUM_BINS):
  """Per equal-width bin of one label's predictions: count, mean prediction, frequency.

  Entries whose label is below 0 (unknown) are left out. Returns {'edges':
  [num_bins + 1], 'count': [num_bins], 'mean_predicted': [...], 'observed': [...]};
  empty bins have nan mean and frequency.
  """
  labels, probs = known_entries(labels, probs)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # Bin b holds edges[b] <= p < edges[b+1]; p == 1 goes in the last bin.
  which = np.clip(np.searchsorted(edges, probs, side='right') - 1, 0, num_bins - 1)
  count = np.bincount(which, minlength=num_bins).astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean_predicted = np.bincount(which, probs, minlength=num_bins) / count
    observed = np.bincount(which, labels, minlength=num_bins) / count
  return {'edges': edges, 'count': count, 'mean_predicted': mean_predicted, 'observed': observed}


def expected_calibration_error(labels, probs, num_bins=NUM_BINS):
  """sum_b (n_b / N) |observed_b - mean_predicted_b|, over the non-empty bins.

  N counts the known entries only; nan when there is none.
  """
  bins = reliability_bins(labels, probs, num_bins)
  filled = bins['count'] > 0
  if not filled.any():
    return float('nan')
  gaps = np.abs(bins['observed'][filled] - bins['mean_predicted'][filled])
  return float(np.sum(bins['count'][filled] * gaps) / bins['count'].sum())


def _none_if_nan(value):
  return None if value is None or not np.isfinite(value) else float(value)


def calibration_report(
  labels, probs, validation_labels, validation_probs, names, num_bins=NUM_BINS
):
  """Temperature fitted on validation and the ECE it gives on the evaluated split.

  `names`: the run's label names, one per column. Unknown entries (label below 0) are
  left out of the fit, the ECE and the cross-entropy. JSON-ready: {'temperature',
  'fitted_on', 'num_bins', 'ece': {'before', 'after'} (mean over the labels that have
  one), 'per_label': {name: {'ece', 'ece_calibrated'}}, 'bce': {...}}.
  """
  labels, probs = np.asarray(labels), np.asarray(probs)
  if labels.ndim != 2 or labels.shape[1] != len(names):
    raise ValueError(
      f'chexnet_jax/evaluation/calibration.py: labels {labels.shape} but {len(names)} '
      "label names; pass the run's names (RestoredRun.label_names)."
    )
  temperature = fit_temperature(validation_labels, validation_probs)
  calibrated = apply_temperature(probs, temperature)
  per_label = {}
  for k, name in enumerate(names):
    per_label[name] = {
      'ece': _none_if_nan(expected_calibration_error(labels[:, k], probs[:, k], num_bins)),
      'ece_calibrated': _none_if_nan(
        expected_calibration_error(labels[:, k], calibrated[:, k], num_bins)
      ),
    }

  def mean(key):
    values = [v[key] for v in per_label.values() if v[key] is not None]
    return float(np.mean(values)) if values else None

  return {
    'temperature': temperature,
    'fitted_on': 'validation',
    'num_bins': num_bins,
    'ece': {'before': mean('ece'), 'after': mean('ece_calibrated')},
    'bce': {
      'before': _none_if_nan(binary_cross_entropy(labels, probs)),
      'after': _none_if_nan(binary_cross_entropy(labels, calibrated)),
    },
    'per_label': per_label,
  }


# ----------------------------------------------------------------------------
# The file predict reads.


def calibration_path(workdir):
  return os.path.join(workdir, 'eval', CALIBRATION_FILE)


def write_temperature(workdir, temperature, step, tta):
  """DIR/eval/calibration.json: the temperature of checkpoint `step`, fitted on validation."""
  path = calibration_path(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  # Written whole: two evaluations never leave a mixed file.
  files.write_json_atomically(
    path,
    {'temperature': float(temperature), 'step': int(step), 'tta': tta, 'fitted_on': 'validation'},
  )
  return path


def read_temperature(workdir, step):
  """The temperature evaluate fitted for checkpoint `step` of the run in `workdir`.

  Raises FileNotFoundError or ValueError with a one-sentence fix.
  """
  path = calibration_path(workdir)
  if not os.path.exists(path):
    raise errors.UserFileNotFoundError(
      f'{path} does not exist; run `python -m chexnet_jax.evaluate --workdir {workdir}` '
      'with the same --checkpoint first, it fits the temperature on validation.'
    )
  with open(path) as f:
    saved = json.load(f)
  if int(saved.get('step', -1)) != int(step):
    raise errors.UserValueError(
      f'{path} holds the temperature of checkpoint step {saved.get("step")}, not of step '
      f'{step}; run `python -m chexnet_jax.evaluate --workdir {workdir} --checkpoint '
      f'{step}` to fit it for this checkpoint.'
    )
  return float(saved['temperature'])
