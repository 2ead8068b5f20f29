"""The per-label columns of an evaluation, declared once.

Each Column says where its value comes from (a row of label_row: one label's
entry of metrics.classification_report, with calibration's ECE) and how it
shows in auroc.csv, the printed table and the HTML table (report/page.py); all three
are rendered from COLUMNS, and the reasons for an empty cell are keyed by the
column's `key` (report.empty_cell_reasons). Adding a column is one entry here.
"""

import dataclasses
from typing import Callable


# The rules for a number that is not a finding, stated once (the table's Caution
# column, auroc.csv's `caution`, evaluate's and score's console): a label with fewer
# than MIN_POSITIVES positive images in the split, and a degenerate operating point
# (a threshold of DEGENERATE_THRESHOLD or more, or sensitivity 0). A label with one
# class has no AUROC at all (report.empty_cell_reasons says so).
MIN_POSITIVES = 10
DEGENERATE_THRESHOLD = 0.9995  # Shown as 1.000.


def cautions(row):
  """[sentence] of why one label's numbers are not a finding ([] when they are)."""
  found = []
  positives = row.get('num_positive')
  if positives is not None and 0 < positives < MIN_POSITIVES:
    found.append(
      f'only {positives} positive image{"s" if positives > 1 else ""} (fewer than '
      f'{MIN_POSITIVES}): too few for the AUROC and AUPRC to be a finding'
    )
  dropped, resamples = row.get('auroc_ci_dropped'), row.get('num_resamples')
  if dropped and resamples and row.get('auroc') is not None:
    found.append(
      f'{dropped} of {resamples} bootstrap resamples had one class of it and were left '
      'out of its intervals, which rest on the rest'
    )
  threshold, sensitivity = row.get('threshold'), row.get('sensitivity')
  if threshold is not None and (threshold >= DEGENERATE_THRESHOLD or sensitivity == 0):
    found.append(
      f'degenerate threshold {threshold:.3f} (sensitivity {number(sensitivity)}): it finds '
      'no positive, so sensitivity and specificity are not a finding'
    )
  return found


def _caution_text(row):
  return '; '.join(cautions(row))


def number(value, digits=3):
  """A cell's text: '' when there is no value."""
  return '' if value is None else f'{value:.{digits}f}'


def with_interval(value, interval):
  """'0.812 (0.790-0.833)', or the value alone when the interval is undefined."""
  if value is None:
    return ''
  low, high = interval
  if low is None or high is None:
    return f'{value:.3f}'
  return f'{value:.3f} ({low:.3f}-{high:.3f})'


def _prevalence(row):
  known, positive, unknown = row['num_known'], row['num_positive'], row['num_unknown']
  if not known:
    return ''
  detail = f' of {known} known; {unknown} unknown' if unknown else ''
  return f'{positive / known:.1%} ({positive}{detail})'


def _console(value, digits=3):
  """A printed cell: blank (same width) when there is no value."""
  return ' ' * (digits + 2) if value is None else f'{value:.{digits}f}'


@dataclasses.dataclass(frozen=True)
class Column:
  """One per-label column and how each output renders it."""

  key: str  # Also the key of its empty-cell reason.
  title: str = ''  # HTML header; '' = not on the page.
  html: Callable = None  # row -> the page's cell text.
  csv: tuple = ()  # ((header, row -> value or None), ...) in auroc.csv.
  console: tuple = ()  # ((header, width, row -> text), ...) in the printed table.
  console_if_unknown: bool = False  # Printed only when some label is unknown.
  sentence: bool = False  # Its page cell is text, aligned left.


def _field(name, index=None):
  if index is None:
    return lambda row: row.get(name)
  return lambda row: (row.get(name) or (None, None))[index]


COLUMNS = (
  Column(
    'auroc',
    'AUROC (95% CI)',
    lambda row: with_interval(row['auroc'], row['auroc_ci']),
    csv=(
      ('auroc', _field('auroc')),
      ('auroc_ci_low', _field('auroc_ci', 0)),
      ('auroc_ci_high', _field('auroc_ci', 1)),
    ),
    console=(
      ('AUROC', 7, lambda row: _console(row.get('auroc'))),
      (
        '95% CI',
        -11,
        lambda row: '-'.join(_console(_field('auroc_ci', i)(row)) for i in (0, 1)),
      ),
    ),
  ),
  Column(
    'auprc',
    'AUPRC (95% CI)',
    lambda row: with_interval(row['auprc'], row['auprc_ci']),
    csv=(
      ('auprc', _field('auprc')),
      ('auprc_ci_low', _field('auprc_ci', 0)),
      ('auprc_ci_high', _field('auprc_ci', 1)),
    ),
    console=(('AUPRC', 7, lambda row: _console(row.get('auprc'))),),
  ),
  Column('prevalence', 'Prevalence (positives)', _prevalence),
  Column(
    'threshold',
    'Threshold',
    lambda row: number(row['threshold']),
    csv=(('threshold', _field('threshold')),),
  ),
  Column(
    'sensitivity',
    'Sensitivity',
    lambda row: number(row['sensitivity']),
    csv=(('sensitivity', _field('sensitivity')),),
    console=(('Sens', 7, lambda row: _console(row.get('sensitivity'))),),
  ),
  Column(
    'specificity',
    'Specificity',
    lambda row: number(row['specificity']),
    csv=(('specificity', _field('specificity')),),
    console=(('Spec', 7, lambda row: _console(row.get('specificity'))),),
  ),
  Column(
    'ece',
    'ECE raw / calibrated',
    lambda row: f'{number(row.get("ece"))} / {number(row.get("ece_calibrated"))}',
  ),
  Column(
    'num_positive',
    csv=(('num_positive', _field('num_positive')),),
    console=(('Pos', 6, lambda row: _count(row.get('num_positive'))),),
  ),
  Column(
    'caution',
    'Caution',
    _caution_text,
    csv=(('caution', lambda row: _caution_text(row) or None),),
    sentence=True,
  ),
  Column('num_known', csv=(('num_known', _field('num_known')),)),
  Column(
    'num_unknown',
    csv=(('num_unknown', _field('num_unknown')),),
    console=(('Unk', 6, lambda row: _count(row.get('num_unknown'))),),
    console_if_unknown=True,
  ),
)

HTML_COLUMNS = tuple(column for column in COLUMNS if column.title)


def _count(value):
  return '' if value is None else str(value)


def label_row(report, name):
  """One label's values: its report row, with the calibration's ECE where fitted."""
  calibration = (report.get('calibration') or {}).get('per_label', {})
  return {**report['per_label'][name], **calibration.get(name, {})}


def mean_row(report):
  """The 'mean' row: the means of AUROC and AUPRC and their intervals only."""
  return {key: report.get(f'mean_{key}') for key in ('auroc', 'auroc_ci', 'auprc', 'auprc_ci')}


# ----------------------------------------------------------------- auroc.csv --


def csv_header():
  return ['pathology', *(header for column in COLUMNS for header, _ in column.csv)]


def csv_rows(report):
  """auroc.csv's rows after its header: one per label, then 'mean'; '' for no value."""
  rows = [(name, label_row(report, name)) for name in report['per_label']]
  rows.append(('mean', mean_row(report)))
  return [
    [name, *('' if (v := value(row)) is None else v for c in COLUMNS for _, value in c.csv)]
    for name, row in rows
  ]


# -------------------------------------------------------- the printed table --


def console_table(report):
  """The table evaluate and the notebook print: one row per label of the run, in
  its order, then the mean. Pos counts positives; Unk, shown when some label is
  unknown, the entries left out."""
  show_unknown = any(row.get('num_unknown') for row in report['per_label'].values())
  cells = [
    cell
    for column in COLUMNS
    if show_unknown or not column.console_if_unknown
    for cell in column.console
  ]
  width = max([20, *(len(name) + 2 for name in report['per_label'])])  # Names are long.

  def line(name, texts):
    parts = [f'{text:<{-w}}' if w < 0 else f'{text:>{w}}' for text, (_, w, _) in zip(texts, cells)]
    return f'{name:<{width}}' + ' '.join(parts)

  header = line('Pathology', [title for title, _, _ in cells])
  rule = '-' * len(header)
  body = [
    line(name, [text(label_row(report, name)) for _, _, text in cells])
    for name in report['per_label']
  ]
  mean = line('Mean', [text(mean_row(report)) for _, _, text in cells]).rstrip()
  return '\n'.join([header, rule, *body, rule, mean])
