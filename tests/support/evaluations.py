"""An evaluation built without a model: the numbers of given labels and probabilities,
as scoring.Evaluation.from_run makes them for a tiny run (for the report's tests)."""

import types

import numpy as np

from chexnet_jax.evaluation import metrics
from chexnet_jax.evaluation import scoring


def without_a_model(labels, probs, records, thresholds, names, *, resamples=10, **run):
  """Evaluation of `records` (dicts with image_name and a patient); `run` may set the
  run's step (default 1) and train_images (default unknown)."""
  labels, probs = np.asarray(labels, np.float32), np.asarray(probs, np.float32)
  patients = scoring.patients_of(records)
  result = metrics.classification_report(
    labels, probs, patients, thresholds=thresholds, names=names, num_resamples=resamples
  )
  config = types.SimpleNamespace(
    model='tiny', dataset='own', image_size=32, dataset_image_size=40, eval_preprocess='center_crop'
  )
  run = types.SimpleNamespace(
    config=config, label_names=tuple(names), **{'step': 1, 'train_images': None, **run}
  )
  predictions = scoring.Predictions(probs, labels, np.arange(len(labels)))
  return scoring.Evaluation.from_run(run, 'test', 'none', result, predictions, records, '')
