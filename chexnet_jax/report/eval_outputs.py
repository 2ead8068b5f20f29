"""The files of an evaluation, written by process 0.

DIR/eval/<split>/ (DIR/eval/<split>-<tta>/ with test-time augmentation) holds
metrics.json, auroc.csv (its per-label columns: label_columns.COLUMNS),
predictions.csv, report.html with its figures, and gallery/. An evaluation
writes all of them into a temporary folder beside it and renames that folder
into place at the end (`published`), so two evaluations of one split never mix
or clobber each other's files: the last to finish wins, whole.
"""

import contextlib
import csv
import json
import os
import re
import shutil

from chexnet_jax.evaluation import label_columns
from chexnet_jax.evaluation import scoring
from chexnet_jax.runtime import files

# Renames tried when another evaluation of the split publishes at the same time.
PUBLISH_ATTEMPTS = 10


def safe_file_name(text):
  """Letters, digits, '.', '-' and '_' only: no spaces or folders in an output's name."""
  return re.sub(r'[^A-Za-z0-9._-]+', '_', text).strip('_') or 'image'


def output_dir(workdir, split, tta):
  return os.path.join(workdir, 'eval', split if tta == 'none' else f'{split}-{tta}')


def format_auroc_table(report):
  """The table evaluate and the notebook print (label_columns.console_table)."""
  return label_columns.console_table(report)


def write_auroc_csv(path, report):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(label_columns.csv_header())
    writer.writerows(label_columns.csv_rows(report))


def write_predictions_csv(path, evaluation):
  """One row per image: index, image (the dataset's path, NIH's Image Index), patient
  (the dataset's own ID), prob_<label> for each of the run's labels, then
  label_<label> (1 positive, 0 negative, -1 unknown)."""
  predictions = evaluation.predictions
  names = evaluation.label_names
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(
      ['index', 'image', 'patient', *[f'prob_{n}' for n in names], *[f'label_{n}' for n in names]]
    )
    patients = scoring.patients_of(evaluation.records)
    for row, (record, patient) in enumerate(zip(evaluation.records, patients)):
      writer.writerow(
        [
          int(predictions.indices[row]),
          record['image_name'],
          patient,
          *[f'{p:.9g}' for p in predictions.probs[row]],  # float32 round-trips.
          *[int(y) for y in predictions.labels[row]],
        ]
      )


def write_outputs(out_dir, evaluation, gallery=(), localization=None):
  """metrics.json, auroc.csv, predictions.csv into out_dir (figures: report.write_report)."""
  os.makedirs(out_dir, exist_ok=True)
  write_auroc_csv(os.path.join(out_dir, 'auroc.csv'), evaluation.report)
  write_predictions_csv(os.path.join(out_dir, 'predictions.csv'), evaluation)
  config = evaluation.config
  summary = {
    'split': evaluation.split,
    'tta': evaluation.tta,
    'step': evaluation.step,
    'model': config.model,
    'dataset': config.dataset,
    'image_size': config.image_size,
    'dataset_image_size': config.dataset_image_size,
    'threshold_source': evaluation.threshold_source,
    'label_file': evaluation.label_file,
    'labels': list(evaluation.label_names),
    **evaluation.report,
    'localization': localization,
    'gallery': list(gallery),
  }
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(summary, f, indent=2, allow_nan=False)


@contextlib.contextmanager
def published(out_dir):
  """Yields a temporary folder beside `out_dir`; renames it to `out_dir`
  when the block ends without an error (else removes it)."""
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = files.staging_dir(parent, prefix=f'.{os.path.basename(out_dir)}.')
  try:
    yield staging
    _replace_directory(staging, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def _replace_directory(staging, out_dir):
  """Renames `staging` to `out_dir`, moving a previous `out_dir` out of the way.

  os.rename refuses a non-empty target, so an evaluation that published
  meanwhile is moved aside again: each try ends with one whole folder in place.
  """
  replaced = f'{staging}.replaced'
  for _ in range(PUBLISH_ATTEMPTS):
    with contextlib.suppress(FileNotFoundError):
      os.rename(out_dir, replaced)
    try:
      os.rename(staging, out_dir)
    except OSError:  # Another evaluation published first: move it aside too.
      shutil.rmtree(replaced, ignore_errors=True)
      continue
    shutil.rmtree(replaced, ignore_errors=True)
    return
  raise OSError(f'{out_dir}: could not be replaced in {PUBLISH_ATTEMPTS} attempts.')
