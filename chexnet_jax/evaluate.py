r"""Evaluates a trained run on a split and writes the report.

  python -m chexnet_jax.evaluate --workdir DIR [--checkpoint best|latest|STEP] \
      [--split test|validation] [--tta none|flip|tencrop] [--bootstrap 1000] \
      [--data_dir DIR]

Works from any directory; --data_dir says where the run's dataset lives now, if
it moved (or the run was trained on another machine).

Everything is per label of the run: its dataset's names and count
(labels_lib.names_of(config): NIH's 14, or the labels a built CSV/CheXpert dataset
records). Writes DIR/eval/<split>/ (DIR/eval/<split>-<tta>/ with test-time augmentation):
  metrics.json      every number below, plus localisation scores where boxes exist
  auroc.csv         per label + mean: AUROC with 95% CI, AUPRC with 95% CI,
                    validation-chosen threshold, sensitivity, specificity, positives,
                    known and unknown labels (num_known, num_unknown)
  predictions.csv   index, image, patient, prob_<label> per label, label_<label> per
                    label (1, 0, or -1 for an unknown label, e.g. uncertain)
  report.html       one self-contained page of all of it (chexnet_jax/report.py)
  roc_curves.png, pr_curves.png, reliability.png (one panel per label),
  gallery/*.png     class activation maps of confident true positives (figures.py)
and DIR/eval/calibration.json, the temperature fitted on validation that
`predict --calibrated` applies (calibration.py; written without TTA only),
and prints the AUROC table, one row per label. Confidence intervals resample patients
(seeded). Thresholds maximise Youden's J on the validation split and are applied
unchanged to the evaluated split. An unknown label (below 0: CheXpert's uncertain
under U-Ignore) is left out of every number, curve and calibration fit of its label.

Multi-process: start it like training (srun, or --coordinator_address with
--num_processes/--process_id on each process); every process scores its shard,
only process 0 writes.
"""

import argparse
import csv
import dataclasses
import json
import os
import shutil
import sys
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

from chexnet_jax import calibration as calibration_lib
from chexnet_jax import cam as cam_lib
from chexnet_jax import checkpoints
from chexnet_jax import distributed
from chexnet_jax import figures
from chexnet_jax import inference
from chexnet_jax import metrics as metrics_lib
from chexnet_jax import models
from chexnet_jax import report as report_lib
from chexnet_jax import run_dir
from chexnet_jax import sharding
from chexnet_jax import tta as tta_lib
from input_pipeline import labels as labels_lib
from input_pipeline import pipeline

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


def score_split_with_tta(run, split, tta):
  """One masked pass with `tta` views per image; mean of their probabilities."""
  logits_fn = inference.make_logits_fn(run.model, models.DTYPES[run.config.dtype])
  config = _tta_iteration_config(run.config, tta)

  def mean_probs(batch):
    views = tta_views(batch['image'], tta, run.config.image_size)
    return sum(
      jax.nn.sigmoid(logits_fn(run.variables, _to_global_images(v, run.mesh))) for v in views
    ) / len(views)

  return Predictions(*inference.gather_split_scores(config, split, mean_probs, run.mesh))


def score_split(run, split, tta='none'):
  """Scores every example of `split` once; the plain pass is training's own
  validation pass (inference.evaluate_split)."""
  if tta not in TTA_MODES:
    raise ValueError(f'chexnet_jax/evaluate.py: --tta={tta!r}; choose one of {TTA_MODES}.')
  if tta != 'none':
    return score_split_with_tta(run, split, tta)
  result, probs, labels, indices = inference.evaluate_split(
    run.config, run.model, run.variables, run.mesh, split
  )
  return Predictions(
    np.asarray(probs), np.asarray(labels), np.asarray(indices), loss=result['loss']
  )


# ----------------------------------------------------------------------------
# Who is who: image names, patients and boxes of a split.


def split_records(config, split, indices):
  """split_metadata rows for `indices` (image_name, patient_id, boxes)."""
  metadata = pipeline.split_metadata(config, split)
  if len(metadata) < len(indices) or (len(indices) and max(indices) >= len(metadata)):
    raise ValueError(
      f'chexnet_jax/evaluate.py: split {split!r} has {len(metadata)} metadata rows '
      f'but predictions reach index {max(indices)}; the dataset changed since '
      'the run was trained. Rebuild it, or evaluate with the matching data_dir.'
    )
  return [metadata[i] for i in indices]


# NIH's boxes (and the synthetic ones) are in the frame of the 1024 x 1024 release.
BOX_FRAME = (1024, 1024)


def boxes_in_input(record, config):
  """[(label index, (x, y, w, h) in model-input pixels)] of a split_metadata row.

  Boxes wholly cut away by the centre crop are left out.
  """
  boxes = []
  for box in record.get('boxes', ()):
    mapped = cam_lib.original_box_to_input(
      box['bbox'],
      BOX_FRAME,
      config.dataset_image_size,
      config.image_size,
      config.get('eval_preprocess', 'center_crop'),
    )
    if mapped is not None:
      boxes.append((int(box['label']), mapped))
  return boxes


# ----------------------------------------------------------------------------
# The report.


@dataclasses.dataclass
class Evaluation:
  """Everything evaluate() computed; written by write_outputs()."""

  split: str
  tta: str
  step: int
  report: dict  # metrics.classification_report(...)
  predictions: Predictions
  records: list  # split_metadata rows, aligned with predictions
  threshold_source: str
  config: Any  # The run's config.


def evaluate(run, split='test', tta='none', num_resamples=1000, seed=0):
  """Scores `split` (and validation, for thresholds) and builds the report.

  Collective: every process must call it. The report is built on process 0 only
  (the bootstrap is CPU work the others need not repeat); they return None.
  """
  predictions = score_split(run, split, tta)
  validation = predictions if split == 'validation' else score_split(run, 'validation', tta)
  if jax.process_index() != 0:
    return None
  names = labels_lib.names_of(run.config)
  thresholds = metrics_lib.youden_thresholds(validation.labels, validation.probs, names)
  records = split_records(run.config, split, predictions.indices)
  patients = [str(r['patient_id']) for r in records]
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
  evaluation = Evaluation(
    split=split,
    tta=tta,
    step=int(run.step),
    report=report,
    predictions=predictions,
    records=records,
    threshold_source='validation',
    config=run.config,
  )
  report_lib.calibrate(evaluation, validation)  # Temperature fitted on validation.
  return evaluation


def _fmt(value, digits=3):
  return ' ' * (digits + 2) if value is None else f'{value:.{digits}f}'


def format_auroc_table(report):
  """The AUROC table printed by evaluate and the notebook: one row per label of the
  run (report['per_label'], in the run's order), then the mean. Pos counts positives;
  Unk, shown when some label is unknown (-1), the entries left out."""
  width = max([20, *(len(name) + 2 for name in report['per_label'])])
  show_unknown = any(row.get('num_unknown') for row in report['per_label'].values())
  header = (
    f'{"Pathology":<{width}}{"AUROC":>7}  {"95% CI":<15}{"AUPRC":>7}'
    f'{"Sens":>7}{"Spec":>7}{"Pos":>6}' + (f'{"Unk":>6}' if show_unknown else '')
  )
  lines = [header, '-' * len(header)]
  for name in report['per_label']:
    row = report['per_label'][name]
    low, high = row['auroc_ci']
    lines.append(
      f'{name:<{width}}{_fmt(row["auroc"]):>7}  {_fmt(low)}-{_fmt(high):<9}'
      f'{_fmt(row["auprc"]):>7}{_fmt(row["sensitivity"]):>7}'
      f'{_fmt(row["specificity"]):>7}{row["num_positive"]:>6}'
      + (f'{row.get("num_unknown", 0):>6}' if show_unknown else '')
    )
  low, high = report['mean_auroc_ci']
  lines.append('-' * len(header))
  lines.append(
    f'{"Mean":<{width}}{_fmt(report["mean_auroc"]):>7}  '
    f'{_fmt(low)}-{_fmt(high):<9}{_fmt(report["mean_auprc"]):>7}'
  )
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Files (process 0 only).


AUROC_CSV_COLUMNS = (
  'pathology',
  'auroc',
  'auroc_ci_low',
  'auroc_ci_high',
  'auprc',
  'auprc_ci_low',
  'auprc_ci_high',
  'threshold',
  'sensitivity',
  'specificity',
  'num_positive',
  'num_known',
  'num_unknown',
)


def _csv_value(value):
  return '' if value is None else value


def write_auroc_csv(path, report):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(AUROC_CSV_COLUMNS)
    for name in report['per_label']:
      row = report['per_label'][name]
      writer.writerow(
        [
          name,
          *map(
            _csv_value,
            (
              row['auroc'],
              *row['auroc_ci'],
              row['auprc'],
              *row['auprc_ci'],
              row['threshold'],
              row['sensitivity'],
              row['specificity'],
              row['num_positive'],
              row.get('num_known', report['num_examples']),
              row.get('num_unknown', 0),
            ),
          ),
        ]
      )
    writer.writerow(
      [
        'mean',
        *map(
          _csv_value,
          (
            report['mean_auroc'],
            *report['mean_auroc_ci'],
            report['mean_auprc'],
            *report['mean_auprc_ci'],
          ),
        ),
        '',
        '',
        '',
        '',
        '',
        '',
      ]
    )


def write_predictions_csv(path, evaluation):
  """One row per image: index, image, patient, prob_<label> for each of the run's
  labels, then label_<label> (1 positive, 0 negative, -1 unknown)."""
  predictions = evaluation.predictions
  names = labels_lib.names_of(evaluation.config)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(
      ['index', 'image', 'patient', *[f'prob_{n}' for n in names], *[f'label_{n}' for n in names]]
    )
    for row, record in enumerate(evaluation.records):
      writer.writerow(
        [
          int(predictions.indices[row]),
          record['image_name'],
          record['patient_id'],
          *[f'{p:.9g}' for p in predictions.probs[row]],  # float32 round-trips.
          *[int(y) for y in predictions.labels[row]],
        ]
      )


def roc_figure(evaluation):
  """matplotlib Figure: ROC small multiples, one panel per label with its band."""
  return report_lib.curve_figures(evaluation)['roc']


def plot_roc_curves(path, evaluation):
  roc_figure(evaluation).savefig(path, bbox_inches='tight')


def label_file(config):
  """Which label file the dataset was built from (2017 or the v2020 revision)."""
  return pipeline.get_dataset_info(config).get('label_file', 'not recorded')


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
    'label_file': label_file(config),
    'labels': list(labels_lib.names_of(config)),
    **evaluation.report,
    'localization': localization,
    'gallery': list(gallery),
  }
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(summary, f, indent=2, allow_nan=False)


# ----------------------------------------------------------------------------
# Heatmaps: a gallery of confident true positives, and localisation where boxes exist.


def gallery_choices(evaluation, size):
  """[(row, label index)]: the most confident true positive of each of the run's labels.

  One per label (an unknown label, -1, is never a positive), most confident first;
  an example with a box for that label is preferred, so the gallery shows the
  dataset's annotation (NIH's boxes) where it can.
  """
  probs, labels = evaluation.predictions.probs, evaluation.predictions.labels
  boxed = {
    (row, k)
    for row, record in enumerate(evaluation.records)
    for k, _ in boxes_in_input(record, evaluation.config)
  }
  best = []
  for k in range(len(labels_lib.names_of(evaluation.config))):
    positives = [row for row in np.flatnonzero(labels[:, k] > 0)]
    if positives:
      # Boxed first, then by probability: max over (has box, prob).
      row = max(positives, key=lambda r: ((r, k) in boxed, probs[r, k]))
      best.append((int(row), k))
  best.sort(key=lambda choice: -probs[choice])
  return best[:size]


CAM_BATCH = 16  # Images per CAM call: maps are [B, L, S, S] float32, so keep B small.


def _selected_images(config, split, wanted_indices):
  """Yields (index, uint8 [S, S, 1]) for the wanted examples, read on this process alone."""
  wanted = set(int(i) for i in wanted_indices)
  for batch in pipeline.create_eval_iterator(config, split, process_index=0, process_count=1):
    for row in np.flatnonzero(batch['mask']):
      if int(batch['index'][row]) in wanted:
        wanted.discard(int(batch['index'][row]))
        yield int(batch['index'][row]), batch['image'][row]
    if not wanted:
      return


def class_activation_maps(run, split, wanted_indices):
  """Yields (index, image, maps [L, S, S]) for the wanted examples, CAM_BATCH at a time.

  Runs on process 0 with a local copy of the weights (cam.local_copy), so the other
  processes need not take part.
  """
  cam_fn = cam_lib.make_cam_fn(run.model, models.DTYPES[run.config.dtype])
  variables = cam_lib.local_copy(run.variables)
  pending = []

  def flush():
    images = np.stack([image for _, image in pending])
    padded = np.concatenate(
      [images, np.zeros_like(images[:1]).repeat(CAM_BATCH - len(pending), axis=0)]
    )  # One shape, one compilation.
    maps = np.asarray(cam_fn(variables, padded)[1])
    done = [(index, image, maps[j]) for j, (index, image) in enumerate(pending)]
    pending.clear()
    return done

  for item in _selected_images(run.config, split, wanted_indices):
    pending.append(item)
    if len(pending) == CAM_BATCH:
      yield from flush()
  if pending:
    yield from flush()


def draw_heatmaps(run, evaluation, out_dir, gallery_size=8, cam_threshold=0.5):
  """Writes the gallery and scores localisation; returns (gallery, localization).

  Localisation: every box of the split against the CAM of its label, scored as
  IoU and IoBB of the box around the map's peak region (Wang et al. 2017). A box
  whose label is unknown (-1) for its image is not scored, like every other number.
  """
  gallery = gallery_choices(evaluation, gallery_size)
  names = labels_lib.names_of(run.config)
  bias = cam_lib.head_bias(cam_lib.local_copy(run.variables)['params'], len(names))
  boxes_by_row = {
    row: boxes_in_input(record, run.config) for row, record in enumerate(evaluation.records)
  }
  rows = {row for row, _ in gallery} | {row for row, boxes in boxes_by_row.items() if boxes}
  row_of = {int(evaluation.predictions.indices[row]): row for row in rows}
  gallery_maps, scores = {}, {}
  labels = np.asarray(evaluation.predictions.labels)
  for index, image, maps in class_activation_maps(run, evaluation.split, row_of):
    row = row_of[index]
    for k, box in boxes_by_row[row]:
      if k >= labels.shape[1] or labels[row, k] < 0:
        continue
      result = cam_lib.localize(maps[k], box, cam_threshold=cam_threshold)
      scores.setdefault(names[k], {'iou': [], 'iobb': []})
      scores[names[k]]['iou'].append(result['iou'])
      scores[names[k]]['iobb'].append(result['iobb'])
    for gallery_row, k in gallery:
      if gallery_row == row:
        gallery_maps[(row, k)] = (image, maps[k])
  return (
    _write_gallery(out_dir, evaluation, gallery, gallery_maps, cam_threshold, bias),
    _localization(scores, cam_threshold),
  )


def _write_gallery(out_dir, evaluation, gallery, gallery_maps, cam_threshold, bias):
  shutil.rmtree(os.path.join(out_dir, 'gallery'), ignore_errors=True)  # No stale maps.
  entries = []
  for row, k in gallery:
    image, heat = gallery_maps[(row, k)]
    record, name = evaluation.records[row], labels_lib.names_of(evaluation.config)[k]
    true_box = next(
      (box for label, box in boxes_in_input(record, evaluation.config) if label == k), None
    )
    prob = float(evaluation.predictions.probs[row, k])
    stem = os.path.splitext(os.path.basename(str(record['image_name'])))[0]
    path = os.path.join(out_dir, 'gallery', f'{stem}_{name}.png')
    figures.save_heatmap(
      path,
      image,
      heat,
      bias[k],
      finding=name,
      probability=prob,
      image_name=stem,
      true_box=true_box,
      model_box=cam_lib.cam_to_box(heat, cam_threshold),
    )
    entries.append(
      {
        'image': str(record['image_name']),
        'label': name,
        'probability': prob,
        'file': os.path.relpath(path, out_dir),
        'box': true_box is not None,  # The dataset's annotation drawn on it.
      }
    )
  return entries


def _localization(scores, cam_threshold):
  """Wang et al.'s accuracy at T(IoU) and T(IoBB) per label; None without boxes."""
  if not scores:
    return None
  every = {
    'iou': [s for v in scores.values() for s in v['iou']],
    'iobb': [s for v in scores.values() for s in v['iobb']],
  }
  return {
    'cam_threshold': cam_threshold,
    'per_label': {name: _accuracies(scores[name]) for name in scores},
    'all': _accuracies(every),
  }


def _accuracies(scores):
  return {
    'num_boxes': len(scores['iou']),
    'mean_iou': float(np.mean(scores['iou'])),
    'mean_iobb': float(np.mean(scores['iobb'])),
    'accuracy_iou': {str(t): v for t, v in cam_lib.localization_accuracy(scores['iou']).items()},
    'accuracy_iobb': {str(t): v for t, v in cam_lib.localization_accuracy(scores['iobb']).items()},
  }


# ----------------------------------------------------------------------------
# Command line.


def output_dir(workdir, split, tta):
  return os.path.join(workdir, 'eval', split if tta == 'none' else f'{split}-{tta}')


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m chexnet_jax.evaluate',
    description='Evaluate a trained chexnet_jax run: AUROC with patient-bootstrap '
    'CIs, AUPRC, thresholds, ROC curves, heatmaps.',
  )
  parser.add_argument('--workdir', required=True, help='the training run directory')
  parser.add_argument(
    '--checkpoint',
    default='best',
    type=checkpoints.parse_selector,
    help="'best' (validation mean AUROC), 'latest', or a step",
  )
  parser.add_argument(
    '--data_dir',
    default=None,
    help="where the run's dataset lives now (default: the data_dir it was trained with)",
  )
  parser.add_argument('--split', default='test', choices=('test', 'validation'))
  parser.add_argument(
    '--tta',
    default='none',
    choices=TTA_MODES,
    help='test-time augmentation: none, flip, or tencrop',
  )
  parser.add_argument(
    '--bootstrap', type=int, default=1000, help='patient-level bootstrap resamples for the 95%% CIs'
  )
  parser.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  parser.add_argument('--gallery', type=int, default=8, help='heatmaps in the gallery')
  parser.add_argument(
    '--coordinator_address', default='', help='host:port of process 0 (multi-process without Slurm)'
  )
  parser.add_argument('--num_processes', type=int, default=-1)
  parser.add_argument('--process_id', type=int, default=-1)
  return parser.parse_args(argv)


def _start_processes(args):
  """Joins the multi-process job (Slurm or explicit), like training does."""
  config = run_dir.load_config(args.workdir, args.data_dir)
  # The training job's own coordinator is not this job's: use the flags.
  config.coordinator_address = args.coordinator_address
  config.num_processes = args.num_processes
  config.process_id = args.process_id
  distributed.initialize(config)
  return config


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = _start_processes(args)
    run = checkpoints.load_run(args.workdir, args.checkpoint, config=config)
    evaluation = evaluate(run, args.split, args.tta, args.bootstrap, args.seed)
  except (FileNotFoundError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  if evaluation is not None:  # Process 0.
    out_dir = output_dir(args.workdir, args.split, args.tta)
    gallery, localization = draw_heatmaps(run, evaluation, out_dir, args.gallery)
    write_outputs(out_dir, evaluation, gallery, localization)
    report_path = report_lib.write_report(
      out_dir, evaluation, gallery, localization, report_lib.run_name(args.workdir)
    )
    if args.tta == 'none':  # predict scores without TTA: its temperature must too.
      calibration_lib.write_temperature(
        args.workdir, evaluation.report['calibration']['temperature'], run.step, args.tta
      )
    print(
      f'{args.split} split, checkpoint step {run.step}, tta {args.tta}, '
      f'{evaluation.report["num_examples"]} images of '
      f'{evaluation.report["num_patients"]} patients; 95% CI: patient bootstrap; '
      'thresholds: Youden on validation'
    )
    print(f'labels: {label_file(config)}')
    print(format_auroc_table(evaluation.report))
    for name in labels_lib.names_of(evaluation.config):  # Why a cell of the table is blank.
      for why in dict.fromkeys(report_lib.empty_cell_reasons(evaluation, name).values()):
        print(f'  {name}: {why}')
    print(
      f'calibration: temperature {evaluation.report["calibration"]["temperature"]:.3f} '
      'fitted on validation'
    )
    print(f'wrote {out_dir} (open {report_path} in a browser)')
  # The others wait here, not in JAX's shutdown barrier, whose timeout is short.
  multihost_utils.sync_global_devices('chexnet_jax.evaluate: written')
  return 0


if __name__ == '__main__':
  sys.exit(main())
