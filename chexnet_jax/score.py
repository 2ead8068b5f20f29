r"""Scores any model's predictions against a dataset's labels, as evaluate does.

  python -m chexnet_jax.score PRED.csv --labels LABELS.csv [--split_list test_list.txt] \
      [--compare OTHER.csv] --output_dir DIR [--bootstrap 1000] [--seed 0]

PRED.csv comes from any tool: one image column (`Image Index`, `image`,
`image_name` or `path`) and one probability column per label, named `<Label>` or
`prob_<Label>` (evaluate's and predict's predictions.csv qualify). LABELS.csv is
NIH's Data_Entry_2017(_v2020).csv(.gz), joined on the image's file name, or a
dataset's own CSV (the one `input_pipeline.build --csv` reads: an image path
column, 1/0 label columns, anything else unknown, and a patient column), joined
on the path. --split_list keeps the images it names (e.g. NIH's test_list.txt).

Writes DIR/ whole (a temporary folder renamed into place): auroc.csv, metrics.json,
roc_curves.png, pr_curves.png, reliability.png and report.html, the same table and
page as evaluate (scoring, label_columns, report and figures render them). The
sections that need validation predictions or the model itself (thresholds,
calibration, localisation, heatmaps) say they are not available.

--compare OTHER.csv: a paired comparison on the images both files score:
per label and for the mean, AUROC(PRED) - AUROC(OTHER) with a 95% interval and a
two-sided p-value from one patient bootstrap applied to both (compare.csv, the
page, the console).
"""

import argparse
import csv
import json
import os
import sys

import numpy as np

from chexnet_jax import command_line
from chexnet_jax import errors
from chexnet_jax.report import eval_outputs
from chexnet_jax.evaluation import label_columns
from chexnet_jax.evaluation import metrics as metrics_lib
from chexnet_jax.report import page as report_lib
from chexnet_jax.evaluation import scoring
from input_pipeline import labels as labels_lib
from input_pipeline import nih
from input_pipeline import records as records_lib

IMAGE_COLUMNS = ('Image Index', 'image', 'image_name', 'path', 'Path')
PATIENT_COLUMNS = ('Patient ID', 'patient', 'patient_id', 'Patient')
NOT_AVAILABLE = {
  'calibration': 'Not available: a temperature is fitted on validation predictions, '
  'and a predictions file has none. The diagrams show the probabilities as given.',
  'localisation': 'Not available: localisation needs the model (its activation maps).',
  'heatmaps': 'Not available: heatmaps need the model (its activation maps).',
}


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m chexnet_jax.score',
    description="Score any model's predictions CSV against NIH's or a dataset's labels: "
    'AUROC and AUPRC with patient-bootstrap CIs, curves, report.html; --compare two models.',
  )
  parser.add_argument('predictions', help='predictions CSV: an image column, one per label')
  parser.add_argument(
    '--labels', required=True, help="NIH's Data_Entry CSV (.csv or .csv.gz) or a dataset's CSV"
  )
  parser.add_argument('--split_list', default=None, help='keep only the images it lists')
  parser.add_argument('--compare', default=None, help="another model's predictions CSV")
  parser.add_argument('--output_dir', required=True, help='where to write the report')
  parser.add_argument('--bootstrap', type=int, default=1000, help='patient bootstrap resamples')
  parser.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  parser.add_argument(
    '--only',
    default='',
    help='score only these labels (comma-separated); by default PRED must have a column '
    'for every label of the labels file',
  )
  return parser.parse_args(argv)


# ----------------------------------------------------------------------------
# Reading.


def _read_table(path):
  """(header, rows as dicts) of a CSV (.gz too); UserError when it cannot be read."""
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(f'{path}: no such file; give the path of a CSV file.')
  try:
    with records_lib.open_text(path) as f:
      reader = csv.DictReader(f)
      return [name.strip() for name in reader.fieldnames or []], list(reader)
  except (UnicodeDecodeError, OSError, csv.Error) as error:
    raise errors.UserValueError(f'{path}: not a readable CSV file ({error}).') from None


def _pick_column(path, header, candidates, what):
  for name in candidates:
    if name in header:
      return name
  raise errors.UserValueError(
    f'{path}: no {what} column; name one of {", ".join(map(repr, candidates))} '
    f'(its columns: {", ".join(header)}).'
  )


def _probability_columns(path, header, names):
  """{label: column} for every one of `names`, which PRED has as `<Label>` or
  `prob_<Label>`: a label without its column stops the scoring (a mean over fewer
  labels is not the mean the reader expects)."""
  columns = {}
  for name in names:
    for column in (f'prob_{name}', name):
      if column in header:
        columns[name] = column
        break
  if not columns:
    raise errors.UserValueError(
      f'{path}: no probability column for any label; name them <Label> or prob_<Label> '
      f'for the labels {", ".join(names)}.'
    )
  missing = [name for name in names if name not in columns]
  if missing:
    kept = ','.join(n for n in names if n in columns)
    raise errors.UserValueError(
      f'{path}: no probability column for {", ".join(missing)} (of the {len(names)} labels '
      f'scored); add prob_<Label> columns for them, or score the others alone with --only {kept}.'
    )
  return columns


def read_predictions(path, names):
  """-> (image column, {image: {label: probability}}) for the labels of `names` it has."""
  header, rows = _read_table(path)
  image_column = _pick_column(path, header, IMAGE_COLUMNS, 'image')
  columns = _probability_columns(path, header, names)
  predictions = {}
  for line, row in enumerate(rows, start=2):
    image = (row.get(image_column) or '').strip()
    if not image:
      raise errors.UserValueError(f'{path} line {line}: the {image_column!r} cell is empty.')
    if image in predictions:
      raise errors.UserValueError(f'{path} line {line}: image {image!r} appears twice.')
    predictions[image] = {name: _probability(path, line, row, c) for name, c in columns.items()}
  if not predictions:
    raise errors.UserValueError(f'{path}: has a header but no rows of predictions.')
  return image_column, predictions


def _probability(path, line, row, column):
  text = (row.get(column) or '').strip()
  try:
    value = float(text)
  except ValueError:
    value = float('nan')
  if not 0.0 <= value <= 1.0:
    raise errors.UserValueError(
      f'{path} line {line}: {column} is {text!r}, not a probability between 0 and 1.'
    )
  return value


def _is_nih(header):
  return 'Finding Labels' in header


def read_labels(path):
  """-> (names, {image key: (labels float32 [L], patient)}, description).

  NIH's Data_Entry file is keyed by image file name; a dataset's CSV by its path.
  """
  header, rows = _read_table(path)
  if _is_nih(header):
    entries, problems = nih.read_data_entry(path)
    if problems:
      raise errors.UserValueError(f'{problems[0].message} ({len(problems)} bad rows in all).')
    truth = {n: (e.labels.astype(np.float32), str(e.patient_id)) for n, e in entries.items()}
    return labels_lib.LABELS, truth, f'NIH ChestX-ray14 ({os.path.basename(path)})'
  return _read_dataset_csv(path, header, rows)


def _read_dataset_csv(path, header, rows):
  """A dataset's own CSV: 1 positive, 0 negative, anything else unknown (-1)."""
  image_column = _pick_column(path, header, IMAGE_COLUMNS, 'image path')
  patient_column = next((c for c in PATIENT_COLUMNS if c in header), None)
  names = tuple(c for c in header if c not in (image_column, patient_column) and c)
  truth = {}
  for line, row in enumerate(rows, start=2):
    image = os.path.normpath((row.get(image_column) or '').strip())
    patient = (row.get(patient_column) or '').strip() if patient_column else image
    values = [(row.get(n) or '').strip() for n in names]
    truth[image] = (
      np.array([{'1': 1.0, '1.0': 1.0, '0': 0.0, '0.0': 0.0}.get(v, -1.0) for v in values]),
      patient or f'{path} line {line}',
    )
  why = '' if patient_column else '; no patient column: every image counts as its own patient'
  return names, truth, f'{os.path.basename(path)}{why}'


def read_split_list(path):
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(f'{path}: no such split list; give a file of image names.')
  with open(path, encoding='utf-8') as f:
    return {line.strip() for line in f if line.strip()}


# ----------------------------------------------------------------------------
# Joining.


def _label_key(image, truth):
  """The labels' key of a predictions row: its path, else its file name (NIH's index)."""
  path = os.path.normpath(image)
  if path in truth:
    return path
  name = os.path.basename(path)
  return name if name in truth else None


def join(pred_path, predictions, truth, split_list):
  """-> {label key: image as PRED names it} for the images kept, in PRED's order."""
  kept = {}
  for image in predictions:
    key = _label_key(image, truth)
    if key is None:
      raise errors.UserValueError(
        f'{pred_path}: image {image!r} is not in the labels file; score predictions '
        'of the images the labels describe.'
      )
    if split_list is None or key in split_list or os.path.basename(key) in split_list:
      kept[key] = image
  if not kept:
    raise errors.UserValueError(
      f'{pred_path}: none of its {len(predictions)} images is in the split list; '
      'give the list of the split these predictions are of.'
    )
  return kept


def arrays(keys, images, predictions, truth, all_names, names):
  """(labels [N, L], probs [N, L], patients) of `keys` for the labels `names`."""
  columns = [all_names.index(name) for name in names]
  labels = np.array([truth[key][0][columns] for key in keys], dtype=np.float32)
  probs = np.array(
    [[predictions[images[key]][name] for name in names] for key in keys], dtype=np.float32
  )
  return labels.reshape(len(keys), len(names)), probs, [truth[key][1] for key in keys]


# ----------------------------------------------------------------------------
# Scoring and writing.


def build_evaluation(pred_path, description, keys, labels, probs, patients, names, args):
  """A scoring.Evaluation of a predictions file: no thresholds, no calibration."""
  report = metrics_lib.classification_report(
    labels,
    probs,
    patients,
    thresholds={name: float('nan') for name in names},
    names=names,
    num_resamples=args.bootstrap,
    seed=args.seed,
  )
  report['loss'] = None
  split = os.path.basename(args.split_list) if args.split_list else 'every image of the file'
  identity = [
    ('predictions', os.path.basename(pred_path)),
    ('labels', description),
    ('labels scored', f'{len(names)}: {", ".join(names)}'),
    ('images', report['num_examples']),
    ('patients', report['num_patients']),
    ('split', split),
    (
      '95% intervals',
      f'bootstrap over patients, {args.bootstrap} resamples, seed {args.seed}',
    ),
    ('thresholds', 'not available: no validation predictions'),
  ]
  return scoring.Evaluation.from_predictions(
    split,
    names,
    report,
    scoring.Predictions(probs, labels, np.arange(len(keys))),
    [{'image_name': key, 'patient': patient} for key, patient in zip(keys, patients)],
    identity,
    label_file=description,
    not_available=dict(NOT_AVAILABLE),
  )


def compare(labels, probs, other_probs, patients, names, args):
  return metrics_lib.paired_auroc_difference(
    labels, probs, other_probs, patients, names=names, num_resamples=args.bootstrap, seed=args.seed
  )


def p_text(entry):
  """The p-value's cell: '< 1/(B+1)' where no resample reached 0 (the bootstrap's floor)."""
  if entry.get('p_below') is not None:
    return f'< 1/{entry["num_resamples"] + 1}'
  return label_columns.number(entry['p_value'])


def comparison_rows(comparison):
  """[(label, difference, ci low, ci high, p, positives, caution)] as text, the mean last."""
  rows = []
  for name, entry in comparison.items():
    low, high = entry['ci']
    positives = entry.get('num_positive')
    rows.append(
      (
        name,
        label_columns.number(entry['difference']),
        label_columns.number(low),
        label_columns.number(high),
        p_text(entry),
        '' if positives is None else str(positives),
        '; '.join(label_columns.cautions({'num_positive': positives})),
      )
    )
  return rows


def with_counts(comparison, report):
  """Each label's entry with its positive images among those compared (report's count)."""
  per_label = report['per_label']
  return {
    name: dict(entry, num_positive=per_label[name].get('num_positive'))
    if name in per_label
    else entry
    for name, entry in comparison.items()
  }


def comparison_html(comparison, pred_name, other_name, num_images):
  body = ''.join(
    '<tr>' + ''.join(f'<td>{report_lib._esc(cell)}</td>' for cell in row) + '</tr>'
    for row in comparison_rows(comparison)
  )
  return (
    f'<h2 id="compare">Compared with {report_lib._esc(other_name)}</h2>'
    f'<p class="note">AUROC of {report_lib._esc(pred_name)} minus AUROC of '
    f'{report_lib._esc(other_name)} on the {num_images} images both score, with a 95% '
    'interval and a two-sided p-value from one bootstrap over patients applied to both '
    '(paired). An empty cell: the label has one class among these images. A label with '
    f'fewer than {label_columns.MIN_POSITIVES} positive images has a caution: its difference '
    'and p are not a finding.</p>'
    '<table id="comparison"><thead><tr><th class="name">Finding</th><th>Difference</th>'
    '<th>95% low</th><th>95% high</th><th>p</th><th>Positives</th><th>Caution</th></tr></thead>'
    f'<tbody>{body}</tbody></table>'
  )


def comparison_table(comparison):
  width = max([12, *(len(name) + 2 for name in comparison)])
  lines = [f'{"Pathology":<{width}}{"AUROC diff":>11} {"95% CI":<17}{"p":>9}{"pos":>6}']
  lines.append('-' * len(lines[0]))
  for name, difference, low, high, p, positives, caution in comparison_rows(comparison):
    line = f'{name:<{width}}{difference:>11} {low + " to " + high:<17}{p:>9}{positives:>6}'
    lines.append(line + (f'  caution: {caution}' if caution else ''))
  return '\n'.join(lines)


def write_comparison_csv(path, comparison):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(
      ['pathology', 'auroc_difference', 'ci_low', 'ci_high', 'p_value', 'num_positive', 'caution']
    )
    writer.writerows(comparison_rows(comparison))


def write_outputs(out_dir, evaluation, comparison_section, comparison):
  eval_outputs.write_auroc_csv(os.path.join(out_dir, 'auroc.csv'), evaluation.report)
  summary = {
    'identity': dict(evaluation.identity),
    'labels': list(evaluation.label_names),
    **evaluation.report,
    'comparison': comparison,
  }
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(summary, f, indent=2, allow_nan=False)
  if comparison is not None:
    write_comparison_csv(os.path.join(out_dir, 'compare.csv'), comparison)
  report_lib.write_report(out_dir, evaluation, extra_html=comparison_section)


def _labels_scored(only, all_names, labels_path):
  """The labels file's names, or those --only picks (each checked against it)."""
  if not only:
    return list(all_names)
  picked = [n.strip() for n in only.split(',') if n.strip()]
  unknown = [n for n in picked if n not in all_names]
  if unknown:
    raise errors.UserValueError(
      f'--only {only}: {", ".join(unknown)} is not a label of {labels_path} '
      f'({", ".join(all_names)}).'
    )
  return [n for n in all_names if n in picked]


def score(args):
  all_names, truth, description = read_labels(args.labels)
  names = _labels_scored(args.only, all_names, args.labels)
  split_list = read_split_list(args.split_list) if args.split_list else None
  _, predictions = read_predictions(args.predictions, names)
  images = join(args.predictions, predictions, truth, split_list)
  other_probs, comparison, section = None, None, ''
  if args.compare:
    _, other = read_predictions(args.compare, names)
    other_images = join(args.compare, other, truth, split_list)
    images = {key: image for key, image in images.items() if key in other_images}
    if not images or not names:
      raise errors.UserValueError(
        f'{args.predictions} and {args.compare} share no '
        f'{"image" if not images else "label"}; compare predictions of the same images.'
      )
    keys = list(images)
    _, other_probs, _ = arrays(keys, other_images, other, truth, list(all_names), names)
  keys = list(images)
  labels, probs, patients = arrays(keys, images, predictions, truth, list(all_names), names)
  evaluation = build_evaluation(
    args.predictions, description, keys, labels, probs, patients, names, args
  )
  if other_probs is not None:
    comparison = with_counts(
      compare(labels, probs, other_probs, patients, names, args), evaluation.report
    )
    section = comparison_html(
      comparison, os.path.basename(args.predictions), os.path.basename(args.compare), len(keys)
    )
  with eval_outputs.published(args.output_dir) as staging:
    write_outputs(staging, evaluation, section, comparison)
  return evaluation, comparison


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    evaluation, comparison = score(args)
  except errors.UserError as error:
    return command_line.fail(error)
  report = evaluation.report
  print(
    f'{os.path.basename(args.predictions)}: {report["num_examples"]} images of '
    f'{report["num_patients"]} patients; 95% CI: patient bootstrap'
  )
  print(f'labels: {evaluation.label_file}')
  print(eval_outputs.format_auroc_table(report))
  for name in report['per_label']:  # Thresholds are not available here: only its cautions.
    for note in label_columns.cautions(label_columns.label_row(report, name)):
      print(f'  {name}: {note}')
  if comparison is not None:
    print(f'paired comparison with {os.path.basename(args.compare)}:')
    print(comparison_table(comparison))
  print(f'wrote {args.output_dir} (open {report_lib.report_path(args.output_dir)} in a browser)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
