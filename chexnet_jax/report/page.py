"""DIR/eval/<split>/report.html: one self-contained page per evaluation.

It answers "how good is this checkpoint, where does it look, can I trust its
probabilities" for the run's own labels (its dataset's names and count,
evaluation.label_names): the run's identity; the per-label table
(AUROC and AUPRC with 95% patient-bootstrap intervals, prevalence, sensitivity and
specificity at the threshold chosen on validation, and why a cell is empty); ROC and
precision-recall curves as small multiples with their bands; calibration (reliability
diagrams, expected calibration error, temperature fitted on validation); the
localisation table (IoU and IoBB accuracy at each threshold); and the heatmap gallery.
An unknown label (below 0, e.g. CheXpert's uncertain under U-Ignore) is left out of
that label's numbers, curves, prevalence and calibration, as metrics.py does; the
table says how many there were.

Every image is embedded as a data: URI and a Content-Security-Policy forbids loading
anything else, so the page can be mailed or archived and opens offline. Written by
`python -m chexnet_jax.evaluate`; the notebook shows the same parts.
"""

import base64
import html
import os

import numpy as np

from chexnet_jax.report import figures
from chexnet_jax.evaluation import label_columns
from chexnet_jax.evaluation import scoring
from chexnet_jax.model import losses

REPORT_FILE = 'report.html'
# Images only from data: URIs, styles only inline; nothing is fetched from anywhere.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ----------------------------------------------------------------------------
# Content (plain data, shared by the page and the notebook).


def identity(evaluation, run_name=''):
  """[(field, value)]: which run (or predictions file), data and split the page is about."""
  run = [('run', run_name or 'not given')] if evaluation.of_a_run else []
  return run + [(name, str(value)) for name, value in evaluation.identity]


def empty_cell_reasons(evaluation, name):
  """{column: why it is empty} for one label's row of the table ({} when none is).

  Unknown labels (below 0) are not images of either class: a label whose known
  entries are all of one class has no AUROC, one with no known entry has no number.
  """
  row, split = evaluation.report['per_label'][name], evaluation.split
  column = np.asarray(evaluation.predictions.labels)[:, evaluation.label_names.index(name)]
  known = column[losses.is_known(column)]
  known_words = ' with a known label' if len(known) < len(column) else ''
  reasons = {}
  if row['auroc'] is None:
    missing = 'negative' if (known > 0).any() else 'positive'
    reasons['auroc'] = reasons['auprc'] = (
      f'the {split} split has no {missing} {name} image{known_words}: the area is undefined'
    )
  if evaluation.threshold_source is None:
    reasons['threshold'] = reasons['sensitivity'] = reasons['specificity'] = (
      'not available: a threshold is chosen on validation predictions, and none were given'
    )
  elif row['threshold'] is None:
    reasons['threshold'] = reasons['sensitivity'] = reasons['specificity'] = (
      f'no threshold: the {evaluation.threshold_source} split has only one class of '
      f"{name} (among its known labels), so Youden's J cannot be chosen"
    )
  else:
    if row['sensitivity'] is None:
      reasons['sensitivity'] = f'no positive {name} image{known_words} in the {split} split'
    if row['specificity'] is None:
      reasons['specificity'] = f'no negative {name} image{known_words} in the {split} split'
  if not known.size:
    why = f'every {name} label of the {split} split is unknown'
    for key in ('auroc', 'auprc', 'prevalence', 'sensitivity', 'specificity', 'ece'):
      reasons[key] = why
  return reasons


def per_label_rows(evaluation):
  """[dict] per label of the run: the page's cells as text (label_columns.HTML_COLUMNS),
  and the reasons for empty ones. Prevalence is the share of positives among the
  label's known entries."""
  rows = []
  for name in evaluation.label_names:
    values = label_columns.label_row(evaluation.report, name)
    cells = {column.key: column.html(values) for column in label_columns.HTML_COLUMNS}
    rows.append({'label': name, **cells, 'reasons': empty_cell_reasons(evaluation, name)})
  return rows


def curve_figures(evaluation):
  """{'roc': Figure, 'pr': Figure, 'reliability': Figure} of the evaluated split."""
  predictions, report = evaluation.predictions, evaluation.report
  patients = scoring.patients_of(evaluation.records)
  names = evaluation.label_names
  bands = figures.curve_bands(
    predictions.labels,
    predictions.probs,
    patients,
    names,
    num_resamples=min(figures.BAND_RESAMPLES, report['bootstrap']['num_resamples']),
    seed=report['bootstrap']['seed'],
  )
  title = f'{evaluation.split} split, step {evaluation.step}'
  temperature = (report.get('calibration') or {}).get('temperature', 1.0)
  return {
    'roc': figures.roc_figure(
      predictions.labels, predictions.probs, patients, report, names, f'ROC, {title}', bands=bands
    ),
    'pr': figures.pr_figure(
      predictions.labels,
      predictions.probs,
      patients,
      report,
      names,
      f'Precision-recall, {title}',
      bands=bands,
    ),
    'reliability': figures.reliability_figure(
      predictions.labels, predictions.probs, temperature, names, f'Reliability, {title}'
    ),
  }


def localization_rows(localization, names=()):
  """[(label, boxes, mean IoU, mean IoBB, {T: acc IoU}, {T: acc IoBB})], 'all' last.

  In the order of `names` (the run's labels); a scored label not among them follows.
  """
  if not localization:
    return []
  scored = localization['per_label']
  order = [n for n in names if n in scored] + [n for n in scored if n not in names]
  entries = [(name, scored[name]) for name in order]
  entries.append(('all', localization['all']))
  return [
    (name, s['num_boxes'], s['mean_iou'], s['mean_iobb'], s['accuracy_iou'], s['accuracy_iobb'])
    for name, s in entries
  ]


# ----------------------------------------------------------------------------
# HTML.


def data_uri(png_bytes):
  return 'data:image/png;base64,' + base64.b64encode(png_bytes).decode('ascii')


def _esc(value):
  return html.escape(str(value), quote=True)


def _img(png_bytes, alt, width=None):
  size = f' style="max-width:{width}px;width:100%"' if width else ' style="max-width:100%"'
  return f'<img src="{data_uri(png_bytes)}" alt="{_esc(alt)}"{size}>'


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;
max-width:1100px;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}.banner{background:#fff3cd;border:1px solid #e0b000;padding:.6em 1em}
h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.name,th.name{text-align:left}td.why{text-align:left;color:#8a4b00;
max-width:26em}td.empty{background:#fff6e6}
.scroll{overflow-x:auto}#localization{font-size:0.78em}
#localization td,#localization th{padding:2px 4px}
.note{color:#555;font-size:0.9em}.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:340px}figcaption{font-size:0.8em;color:#444}
"""


_number = label_columns.number
_with_interval = label_columns.with_interval


def _identity_html(rows):
  body = ''.join(
    f'<tr><th class="name">{_esc(k)}</th><td class="name">{_esc(v)}</td></tr>' for k, v in rows
  )
  return f'<table id="identity">{body}</table>'


def per_label_table_html(rows):
  """The per-label table, one <tr> per label in <tbody>, reasons in the last column."""
  head = ''.join(f'<th>{_esc(column.title)}</th>' for column in label_columns.HTML_COLUMNS)
  body = []
  for row in rows:
    cells = []
    for column in label_columns.HTML_COLUMNS:
      why = row['reasons'].get(column.key)
      if why:
        cells.append(f'<td class="empty" title="{_esc(why)}">&mdash;</td>')
      else:
        kind = ' class="why"' if column.sentence else ''
        cells.append(f'<td{kind}>{_esc(row[column.key])}</td>')
    reasons = '; '.join(dict.fromkeys(row['reasons'].values()))  # Unique, in order.
    body.append(
      f'<tr data-label="{_esc(row["label"])}"><td class="name">'
      f'{_esc(row["label"])}</td>{"".join(cells)}'
      f'<td class="why">{_esc(reasons)}</td></tr>'
    )
  return (
    f'<table id="per-label"><thead><tr><th class="name">Finding</th>{head}'
    f'<th class="name">Why a cell is empty</th></tr></thead>'
    f'<tbody>{"".join(body)}</tbody></table>'
  )


def _mean_html(report):
  return (
    f'<p>Mean AUROC {_esc(_with_interval(report["mean_auroc"], report["mean_auroc_ci"]))}'
    f', mean AUPRC {_esc(_with_interval(report["mean_auprc"], report["mean_auprc_ci"]))}'
    ' (over the labels that have one).</p>'
  )


def calibration_html(calibration, not_available=None):
  if not_available:
    return f'<p id="no-calibration">{_esc(not_available)}</p>'
  if not calibration:
    return '<p>No calibration was computed.</p>'
  ece, bce = calibration['ece'], calibration['bce']
  return (
    f'<p id="temperature">Temperature <b>T = {calibration["temperature"]:.3f}</b>, fitted '
    f'on the {_esc(calibration["fitted_on"])} split (one T for all '
    f'{len(calibration["per_label"])} labels of the run: '
    'p&prime; = sigmoid(logit / T); rankings and AUROCs are unchanged; unknown labels '
    'are left out of the fit and of every number here). On this split: '
    f'mean expected calibration error {_number(ece["before"])} before, '
    f'{_number(ece["after"])} after; cross-entropy {_number(bce["before"], 4)} before, '
    f'{_number(bce["after"], 4)} after. ECE: {calibration["num_bins"]} equal-width bins, '
    'weighted by their counts. Apply it to new images with '
    '<code>python -m chexnet_jax.predict --calibrated</code>.</p>'
  )


def localization_html(localization, names=(), not_available=None):
  if not_available:
    return f'<p id="no-localization">{_esc(not_available)}</p>'
  rows = localization_rows(localization, names)
  if not rows:
    return (
      '<p id="no-localization">No box of this split falls in the model input, '
      'so localisation is not scored.</p>'
    )
  thresholds = list(rows[0][4])
  head = ''.join(f'<th>IoU<br>&ge;{_esc(t)}</th>' for t in thresholds) + ''.join(
    f'<th>IoBB<br>&ge;{_esc(t)}</th>' for t in thresholds
  )  # Two-line headers: the 2 x 7 accuracy columns fit the page's width.
  body = []
  for name, boxes, mean_iou, mean_iobb, acc_iou, acc_iobb in rows:
    cells = ''.join(f'<td>{_number(acc_iou[t], 2)}</td>' for t in thresholds)
    cells += ''.join(f'<td>{_number(acc_iobb[t], 2)}</td>' for t in thresholds)
    body.append(
      f'<tr><td class="name">{_esc(name)}</td><td>{boxes}</td>'
      f'<td>{_number(mean_iou)}</td><td>{_number(mean_iobb)}</td>{cells}</tr>'
    )
  return (
    f'<p class="note">Fraction of NIH boxes whose class activation map region '
    f'(connected region where the min-max normalised map is at least '
    f'{localization["cam_threshold"]}, around its peak) reaches each IoU and IoBB '
    'threshold, as in Wang et al. 2017.</p>'
    '<div class="scroll"><table id="localization"><thead><tr>'
    '<th class="name">Finding</th><th>Boxes</th>'
    f'<th>Mean IoU</th><th>Mean IoBB</th>{head}</tr></thead>'
    f'<tbody>{"".join(body)}</tbody></table></div>'
  )


def gallery_html(out_dir, gallery, not_available=None):
  if not_available:
    return f'<p id="no-gallery">{_esc(not_available)}</p>'
  if not gallery:
    return (
      '<p id="no-true-positive">No true positive in this split: no positive image of any '
      "finding reaches that finding's threshold chosen on validation, so there is no "
      'heatmap to show.</p>'
    )
  items = []
  for entry in gallery:
    with open(os.path.join(out_dir, entry['file']), 'rb') as f:
      png = f.read()
    caption = f'{entry["image"]}: {entry["label"]}, p = {entry["probability"]:.3f}'
    items.append(
      f'<figure>{_img(png, caption, 340)}<figcaption>{_esc(caption)}</figcaption></figure>'
    )
  # The annotation is named only where one is drawn: most datasets have no boxes.
  boxed = any(entry.get('box') for entry in gallery)
  return (
    '<p class="note">The most confident true positive of each finding'
    + (' (an image with a box first)' if boxed else '')
    + ". A true positive: a positive image at or above the finding's threshold chosen "
    'on validation; a finding without one is left out'
    + f'. Colour: the {_esc(figures.HEATMAP_SCALE)} (M_c: the '
    "map, b_c: the head's bias, T: the temperature, 1 here); the colour bar is the same "
    'on every image, so bright yellow always means a high probability and dark purple '
    'a low one. '
    + ("Solid cyan: the dataset's box (NIH's annotations). " if boxed else '')
    + "Dashed white: the model's region, the box around the "
    'connected region where the normalised map is at least 50% of its range '
    '(what IoU and IoBB score).</p>'
    f'<div class="gallery" id="gallery">{"".join(items)}</div>'
  )


def render(evaluation, out_dir, gallery, localization, pngs, run_name='', extra_html=''):
  """The page's HTML; pngs = {'roc', 'pr', 'reliability'} PNG bytes; extra_html (e.g.
  score.py's comparison) follows the per-label table."""
  report, missing = evaluation.report, evaluation.not_available
  scored_file = not evaluation.of_a_run
  whose = 'those the predictions file and the labels share' if scored_file else "the run's own"
  title = (
    f'chexnet_jax evaluation: {evaluation.split} split, step {evaluation.step}'
    if not scored_file
    else f'chexnet_jax score: {evaluation.split}'
  )
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title><style>{STYLE}</style></head><body>
<h1>{_esc(title)}</h1>{_banner_html(evaluation.banner)}
<h2 id="run">Run</h2>{_identity_html(identity(evaluation, run_name))}
<h2 id="performance">How good is it: per finding</h2>
<p class="note">{_esc(len(evaluation.label_names))} labels, {whose}. AUROC and AUPRC
with 95% intervals (bootstrap over patients). Prevalence: share of the split's images
with the finding, among those whose label is known (an unknown label, e.g. uncertain,
is left out of every number and curve). Sensitivity and specificity at the threshold
chosen on the validation split (Youden's J) and applied unchanged here. A dash marks an
empty cell; the last column says why.</p>
{per_label_table_html(per_label_rows(evaluation))}{_mean_html(report)}{extra_html}
<h2 id="roc">ROC curves</h2>{_img(pngs['roc'], 'ROC curves, one panel per finding')}
<h2 id="pr">Precision-recall curves</h2>
{_img(pngs['pr'], 'Precision-recall curves, one panel per finding')}
<h2 id="calibration">Can I trust its probabilities: calibration</h2>
{calibration_html(report.get('calibration'), missing.get('calibration'))}
{_img(pngs['reliability'], 'Reliability diagrams, one panel per finding')}
<h2 id="localisation">Where does it look: localisation</h2>
{localization_html(localization, evaluation.label_names, missing.get('localisation'))}
<h2 id="heatmaps">Where does it look: heatmaps</h2>
{gallery_html(out_dir, gallery, missing.get('heatmaps'))}
</body></html>
"""


def _banner_html(banner):
  return f'<p id="banner" class="banner">{_esc(banner)}</p>' if banner else ''


def write_report(out_dir, evaluation, gallery=(), localization=None, run_name='', extra_html=''):
  """Writes roc_curves.png, pr_curves.png, reliability.png and report.html into out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  pngs = {}
  for key, figure in curve_figures(evaluation).items():
    pngs[key] = figures.to_png(figure)
    name = {'roc': 'roc_curves.png', 'pr': 'pr_curves.png', 'reliability': 'reliability.png'}[key]
    with open(os.path.join(out_dir, name), 'wb') as f:
      f.write(pngs[key])
  path = report_path(out_dir)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(render(evaluation, out_dir, list(gallery), localization, pngs, run_name, extra_html))
  return path


def run_name(workdir):
  """The run directory's own name: the page names no absolute path of the machine."""
  return os.path.basename(os.path.normpath(workdir))


def report_path(out_dir):
  return os.path.join(out_dir, REPORT_FILE)
