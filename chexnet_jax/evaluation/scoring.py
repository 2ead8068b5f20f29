"""Scoring a split of a trained run, and the report of the numbers.

`score_split` runs every example of a split through the model once (with
test-time augmentation if asked); `evaluate` scores a split and validation
(for the thresholds and the temperature) and builds the Evaluation that
eval_outputs writes, localization draws on and report/page.py renders. Every
process takes part in the passes (they are collective); the report is built on
process 0 only.
"""

import dataclasses
import sys
from typing import Any, Optional

import jax
import numpy as np
import tqdm

from chexnet_jax.evaluation import calibration as calibration_lib
from chexnet_jax import errors

from chexnet_jax.evaluation import inference
from chexnet_jax.evaluation import metrics as metrics_lib
from chexnet_jax.model import densenet
from chexnet_jax.runtime import sharding
from chexnet_jax.evaluation import tta as tta_lib

from input_pipeline import sources

TTA_MODES = ('none', 'flip', 'tencrop')


@dataclasses.dataclass
class Predictions:
  """Per-example outputs of one pass over a split, rows ordered by example index."""

  probs: np.ndarray  # float32 [N, L], L = the run's number of labels
  labels: np.ndarray  # float32 [N, L]: 1, 0, or -1 (unknown, masked)
  indices: np.ndarray  # int [N]
  loss: Any = None  # BCE of the un-augmented pass (None with TTA).


# ----------------------------------------------------------------------------
# Scoring a split (every process takes part: the passes are collective).


def tta_views(images, tta, image_size):
  """uint8 [b, S, S, 1] -> list of uint8 [b, image_size, image_size, 1] views.

  'flip' averages the image and its mirror; 'tencrop' the four corner and centre
  crops of the stored S x S image and their mirrors (S = dataset_image_size).
  """
  if tta == 'none':
    return [images]
  if tta == 'flip':
    return [images, images[:, :, ::-1]]
  size = images.shape[1]
  last = size - image_size
  middle = last // 2
  corners = [(0, 0), (0, last), (last, 0), (last, last), (middle, middle)]
  crops = [images[:, y : y + image_size, x : x + image_size] for y, x in corners]
  return crops + [crop[:, :, ::-1] for crop in crops]


def _tta_iteration_config(config, tta):
  """Ten-crop needs the whole stored image, so the iterator must not crop it."""
  config = config.copy_and_resolve_references()
  if tta == 'tencrop':
    tta_lib.check_tencrop(config)  # 10 distinct views at the training scale, or refused.
    config.image_size = config.dataset_image_size
  return config


def _to_global_images(images, mesh):
  return sharding.to_global({'image': np.ascontiguousarray(images)}, mesh)['image']


def progress_bar(config, split, enabled=True):
  """An iterator wrapper drawing a tqdm bar of the images of `split` scored (stderr,
  process 0 only; None when not enabled). Counts real images: padding is not one."""
  if not enabled or jax.process_index() != 0:
    return None
  # The source's length: reading every record's metadata just to count them is not needed.
  total = len(sources.get_source(config, split)) if jax.process_count() == 1 else None

  def wrap(batches):
    with tqdm.tqdm(total=total, desc=f'scoring {split}', unit='image', file=sys.stderr) as bar:
      for batch in batches:
        yield batch
        bar.update(int(np.sum(batch['mask'])))

  return wrap


def score_split_with_tta(run, split, tta, progress=False):
  """One masked pass with `tta` views per image; mean of their probabilities."""
  logits_fn = inference.make_logits_fn(run.model, densenet.DTYPES[run.config.dtype])
  config = _tta_iteration_config(run.config, tta)

  def mean_probs(batch):
    views = tta_views(batch['image'], tta, run.config.image_size)
    return sum(
      jax.nn.sigmoid(logits_fn(run.variables, _to_global_images(v, run.mesh))) for v in views
    ) / len(views)

  return Predictions(
    *inference.gather_split_scores(
      config, split, mean_probs, run.mesh, progress_bar(config, split, progress)
    )
  )


def score_split(run, split, tta='none', progress=False):
  """Scores every example of `split` once; the plain pass is training's own
  validation pass (inference.evaluate_split)."""
  if tta not in TTA_MODES:
    raise errors.UserValueError(
      f'chexnet_jax/evaluate.py: --tta={tta!r}; choose one of {TTA_MODES}.'
    )
  if tta != 'none':
    return score_split_with_tta(run, split, tta, progress)
  result, probs, labels, indices = inference.evaluate_split(
    run.config,
    run.label_names,
    run.model,
    run.variables,
    run.mesh,
    split,
    progress=progress_bar(run.config, split, progress),
  )
  return Predictions(
    np.asarray(probs), np.asarray(labels), np.asarray(indices), loss=result['loss']
  )


# ----------------------------------------------------------------------------
# Who is who: image names and patients of a split.


def split_records(config, split, indices):
  """split_metadata rows for `indices` (image_name, patient_id, boxes)."""
  metadata = sources.split_metadata(config, split)
  if len(metadata) < len(indices) or (len(indices) and max(indices) >= len(metadata)):
    raise errors.UserValueError(
      f'chexnet_jax/evaluate.py: split {split!r} has {len(metadata)} metadata rows '
      f'but predictions reach index {max(indices)}; the dataset changed since '
      'the run was trained. Rebuild it, or evaluate with the matching data_dir.'
    )
  return [metadata[i] for i in indices]


PATIENT_FALLBACK_NOTE = (
  'the dataset was built before it recorded its own patient IDs, so patients are the '
  "builder's numbers (patient_id); rebuild it to see the dataset's IDs"
)


def patient_note(records):
  """PATIENT_FALLBACK_NOTE when some record has no dataset patient ID, else ''."""
  return PATIENT_FALLBACK_NOTE if any(not r.get('patient_recorded', True) for r in records) else ''


def patients_of(records):
  """The dataset's own patient ID of each record; the builder's number for a dataset
  built before it recorded them (patient_note says so)."""
  return [str(r['patient'] if 'patient' in r else r['patient_id']) for r in records]


# ----------------------------------------------------------------------------
# The report.


@dataclasses.dataclass
class Evaluation:
  """What an evaluation computed, as plain data. Two constructors: from_run (a run
  scored on a split: evaluate, the notebook) and from_predictions (a predictions
  file scored against labels: score.py). eval_outputs writes it, report/ renders it."""

  split: str
  label_names: tuple  # The labels of the prediction columns, in order.
  report: dict  # metrics.classification_report(...)
  predictions: Predictions
  records: list  # split_metadata rows, aligned with predictions
  identity: list  # [(field, value)]: the model, data and split the numbers are about.
  tta: str = 'none'
  step: Optional[int] = None  # The checkpoint's step; None for a predictions file.
  threshold_source: Optional[str] = None  # 'validation'; None: no thresholds chosen.
  label_file: str = 'not recorded'  # The label file the dataset was built from.
  patient_note: str = ''  # PATIENT_FALLBACK_NOTE for a dataset built before.
  # {section: why it is not available}: what a predictions file cannot give.
  not_available: dict = dataclasses.field(default_factory=dict)
  config: Any = None  # The run's config; None for a predictions file.
  banner: str = ''  # A warning above everything (small_training_banner), or ''.

  @property
  def of_a_run(self):
    return self.config is not None

  @classmethod
  def from_run(cls, run, split, tta, report, predictions, records, label_file):
    """`run` (a RestoredRun: its config, labels and step) scored on `split`;
    thresholds from validation."""
    evaluation = cls(
      split=split,
      label_names=tuple(run.label_names),
      report=report,
      predictions=predictions,
      records=records,
      identity=[],
      tta=tta,
      step=int(run.step),
      threshold_source='validation',
      label_file=label_file,
      patient_note=patient_note(records),
      config=run.config,
    )
    evaluation.identity = _run_identity(evaluation)
    if getattr(run, 'origin', ''):  # Imported weights: say so beside the model.
      evaluation.identity.insert(1, ('weights', run.origin))
    evaluation.banner = small_training_banner(getattr(run, 'train_images', None))
    return evaluation

  @classmethod
  def from_predictions(cls, split, label_names, report, predictions, records, identity, **notes):
    """A predictions file scored as given: no thresholds, no calibration, no model."""
    return cls(
      split=split,
      label_names=tuple(label_names),
      report=report,
      predictions=predictions,
      records=records,
      identity=list(identity),
      tta='as given',
      **notes,
    )


# Fewer training images than this and a model cannot have learned chest X-rays
# (CheXNet trained on about 78,000): the page and the console say so above the numbers.
MIN_TRAINING_IMAGES = 10_000


def small_training_banner(train_images):
  """The warning for a run trained on too few images to mean anything, or ''."""
  if train_images is None or train_images >= MIN_TRAINING_IMAGES:
    return ''
  return (
    f'This model was trained on {train_images:,} images, far too few to learn chest X-rays '
    f'(CheXNet: about 78,000): these numbers show that the tool runs, not what such a model '
    'can do; do not read them as a result.'
  )


def _run_identity(evaluation):
  config, report = evaluation.config, evaluation.report
  names = evaluation.label_names
  rows = [
    ('model', config.model),
    ('dataset', config.dataset),
    ('label file', evaluation.label_file),
    ('labels', f'{len(names)}: {", ".join(names)}'),
    ('checkpoint step', evaluation.step),
    ('split', evaluation.split),
    ('test-time augmentation', evaluation.tta),
    ('images', report['num_examples']),
    ('patients', report['num_patients']),
    *([('patient IDs', evaluation.patient_note)] if evaluation.patient_note else []),
    (
      'model input',
      f'{config.image_size} px '
      f'({config.eval_preprocess} of the stored '
      f'{config.dataset_image_size} px image)',
    ),
    (
      '95% intervals',
      f'bootstrap over patients, '
      f'{report["bootstrap"]["num_resamples"]} resamples, '
      f'seed {report["bootstrap"]["seed"]}',
    ),
    ('thresholds', f"Youden's J, chosen on the {evaluation.threshold_source} split"),
  ]
  return [(name, str(value)) for name, value in rows]


def announce(message, enabled=True):
  """One phase of a tool's work, on stderr (process 0): the results go to stdout."""
  if enabled and jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def evaluate(run, split='test', tta='none', num_resamples=1000, seed=0, progress=False):
  """Scores `split` (and validation, for thresholds) and builds the report.

  Collective: every process must call it. The report is built on process 0 only
  (the bootstrap is CPU work the others need not repeat); they return None.
  `progress` announces each phase and draws a bar while scoring (stderr).
  """
  predictions = score_split(run, split, tta, progress)
  if split == 'validation':
    validation = predictions
  else:
    announce('scoring validation: thresholds and the temperature are chosen there', progress)
    validation = score_split(run, 'validation', tta, progress)
  if jax.process_index() != 0:
    return None
  announce(
    f'bootstrap: {num_resamples} patient resamples for the 95% intervals (seed {seed})', progress
  )
  names = run.label_names
  thresholds = metrics_lib.youden_thresholds(validation.labels, validation.probs, names)
  records = split_records(run.config, split, predictions.indices)
  patients = patients_of(records)
  report = metrics_lib.classification_report(
    predictions.labels,
    predictions.probs,
    patients,
    thresholds=thresholds,
    names=names,
    num_resamples=num_resamples,
    seed=seed,
  )
  report['loss'] = predictions.loss
  evaluation = Evaluation.from_run(
    run, split, tta, report, predictions, records, label_file(run.config)
  )
  calibrate(evaluation, validation)  # Temperature fitted on validation.
  return evaluation


def calibrate(evaluation, validation):
  """Adds report['calibration'] (temperature fitted on `validation` Predictions)."""
  evaluation.report['calibration'] = calibration_lib.calibration_report(
    evaluation.predictions.labels,
    evaluation.predictions.probs,
    validation.labels,
    validation.probs,
    evaluation.label_names,
  )
  return evaluation.report['calibration']


def label_file(config):
  """Which label file the dataset was built from (2017 or the v2020 revision)."""
  return sources.get_dataset_info(config).get('label_file', 'not recorded')
