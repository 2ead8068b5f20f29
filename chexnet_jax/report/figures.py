"""Figures of an evaluation that cannot be misread.

* ROC and precision-recall curves as small multiples: one panel per label of the run
  (no legend of look-alike colours), each with its 95% patient-bootstrap band, the
  AUROC/AUPRC with its interval in the panel's title, and the operating point of the
  threshold chosen on validation.
* Reliability diagrams, one panel per label, before and after temperature scaling.
* Heatmaps (class activation maps) on ONE scale for every image: the CAM converted to
  the model's probability scale, sigmoid((M_c(x, y) + b_c) / T), drawn from 0 to 1 with
  a colour bar. M_c is the class activation map (cam.py) and b_c the head's bias; since
  the image's logit is the spatial mean of M_c + b_c, a pixel's colour is the
  probability the model would give the image if every location looked like that one.
  Bright yellow ('inferno') means a high probability on every heatmap, whichever image
  or finding. T is the
  temperature (1 unless predict --calibrated). NIH's box (solid cyan) and the model's
  region (dashed white: the box around the connected region where the min-max
  normalised CAM is at least 0.5, the one IoU and IoBB are scored on) are named in a
  legend, and the title gives the finding and its probability.

`names` is always the run's label names, one per column of labels/probs
(Evaluation.label_names). An entry whose label is below 0 is unknown (masked,
e.g. CheXpert's uncertain under U-Ignore) and is left out of that label's curve, band,
prevalence line and reliability bins, as metrics.py leaves it out of the numbers.

Bare matplotlib Figures (no pyplot): no global backend state, headless and notebook-safe.
"""

import io
import os

from matplotlib import figure as figure_lib
from matplotlib import lines as lines_lib
from matplotlib import patches
import numpy as np

from chexnet_jax.evaluation import calibration as calibration_lib
from chexnet_jax.evaluation import metrics as metrics_lib

HEATMAP_COLORMAP = 'inferno'
HEATMAP_SCALE = (
  'class activation map on the probability scale, sigmoid((M_c + b_c) / T), 0 to 1 on every image'
)
NIH_BOX_STYLE = {'edgecolor': 'cyan', 'linestyle': '-', 'linewidth': 2}
MODEL_BOX_STYLE = {'edgecolor': 'white', 'linestyle': '--', 'linewidth': 2}
BAND_RESAMPLES = 200  # Bootstrap resamples for the curve bands (cost: O(N) each).
GRID = np.linspace(0, 1, 101)
COLUMNS = 5


def to_png(figure, dpi=100):
  """PNG bytes of a Figure."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=dpi, bbox_inches='tight')
  return buffer.getvalue()


def save(figure, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(to_png(figure))
  return path


# ----------------------------------------------------------------------------
# Curves with patient-bootstrap bands.


class _Curve:
  """One label's predictions sorted once; weighted ROC and PR points in O(N)."""

  def __init__(self, labels, probs):
    probs = np.asarray(probs, dtype=np.float64)
    self.order = np.argsort(-probs, kind='mergesort')
    self.positive = np.asarray(labels)[self.order] > 0.5
    # One point per distinct threshold: the last position of each run of equal scores.
    self.ends = np.r_[np.flatnonzero(np.diff(probs[self.order])), len(probs) - 1]

  def points(self, weights=None):
    """(fpr, tpr, precision) at every threshold, or None if a class is absent."""
    w = np.ones(len(self.order)) if weights is None else weights[self.order]
    true_pos = np.cumsum(w * self.positive)[self.ends]
    false_pos = np.cumsum(w * ~self.positive)[self.ends]
    if true_pos[-1] == 0 or false_pos[-1] == 0:
      return None
    predicted = true_pos + false_pos
    precision = np.divide(true_pos, predicted, out=np.ones_like(true_pos), where=predicted > 0)
    return false_pos / false_pos[-1], true_pos / true_pos[-1], precision

  def on_grid(self, weights=None):
    """(TPR at GRID of FPR, precision at GRID of recall) or None."""
    points = self.points(weights)
    if points is None:
      return None
    fpr, tpr, precision = points
    roc = np.interp(GRID, np.r_[0.0, fpr], np.r_[0.0, tpr])
    # Interpolated precision: the best precision at this recall or more (PR convention).
    best = np.maximum.accumulate(precision[::-1])[::-1]
    pr = best[np.minimum(np.searchsorted(tpr, GRID, side='left'), len(best) - 1)]
    return roc, pr


def curve_bands(labels, probs, patients, names, num_resamples=BAND_RESAMPLES, seed=0):
  """{name: {'roc': (mid, low, high), 'pr': (mid, low, high)}} on GRID; 95% bands.

  Resamples patients like metrics.bootstrap_intervals; each label's curve uses only
  its known rows; labels with one class (among those) are left out.
  """
  from chexnet_jax.evaluation import metrics as metrics_lib

  labels, probs = np.asarray(labels), np.asarray(probs)
  if labels.ndim != 2 or labels.shape != probs.shape or labels.shape[1] != len(names):
    raise ValueError(
      f'chexnet_jax/report/figures.py: labels {labels.shape}, probs {probs.shape} '
      f"and {len(names)} names do not match; pass the run's label names."
    )
  rows = {name: metrics_lib.known(labels, k) for k, name in enumerate(names)}
  curves = {
    name: _Curve(labels[rows[name], k], probs[rows[name], k])
    for k, name in enumerate(names)
    if rows[name].any()
  }
  samples = {name: ([], []) for name in names}
  for weights in metrics_lib.bootstrap_weights(patients, num_resamples, seed):
    for name, curve in curves.items():
      grid = curve.on_grid(np.asarray(weights)[rows[name]])
      if grid is not None:
        samples[name][0].append(grid[0])
        samples[name][1].append(grid[1])
  bands = {}
  for name, curve in curves.items():
    mid = curve.on_grid()
    if mid is None:
      continue
    band = {}
    for i, key in enumerate(('roc', 'pr')):
      drawn = np.array(samples[name][i]) if samples[name][i] else mid[i][None]
      low, high = np.percentile(drawn, [2.5, 97.5], axis=0)
      band[key] = (mid[i], low, high)
    bands[name] = band
  return bands


def _grid_axes(count, panel=2.2):
  """One panel per label, COLUMNS a row (fewer when the run has fewer labels)."""
  columns = max(1, min(COLUMNS, count))
  rows = max(1, -(-count // columns))
  figure = figure_lib.Figure(
    figsize=(max(columns, 3) * panel, rows * panel + 0.4), layout='constrained'
  )
  axes = figure.subplots(rows, columns, squeeze=False).ravel()
  for extra in axes[count:]:
    extra.axis('off')
  return figure, axes[:count]


def _interval(values):
  low, high = values
  return '' if low is None or high is None else f' [{low:.2f}-{high:.2f}]'


def _no_curve(labels, k, what):
  """Why label k has no curve: all its labels unknown, or one class among the known."""
  if not metrics_lib.known(labels, k).any():
    return f'no {what}: every label\nis unknown in this split'
  return f'no {what}: only one class\nknown in this split'


def _empty_panel(axes, name, why):
  axes.text(
    0.5, 0.5, why, ha='center', va='center', fontsize=7, wrap=True, transform=axes.transAxes
  )
  axes.set_title(name, fontsize=8)
  axes.set_xticks([])
  axes.set_yticks([])


def _draw_band(axes, band, color):
  """A curve on GRID with its 95% band, on the unit square both figures share."""
  mid, low, high = band
  axes.fill_between(GRID, low, high, color=color, alpha=0.25, lw=0)
  axes.plot(GRID, mid, color=color, lw=1.2)
  axes.set(xlim=(0, 1), ylim=(0, 1), aspect='equal')
  axes.tick_params(labelsize=6)


def _curve_grid(labels, names, bands, curve, what, draw_panel, caption):
  """Small multiples of one kind of curve: each label's panel drawn by draw_panel(axes,
  k, name), or an empty panel saying why it has no curve; `caption` under the title."""
  figure, axes_list = _grid_axes(len(names))
  for k, (name, axes) in enumerate(zip(names, axes_list)):
    if name not in bands:
      _empty_panel(axes, name, _no_curve(labels, k, what))
      continue
    draw_panel(axes, k, name, bands[name][curve])
  figure.suptitle(caption, fontsize=9)
  return figure


def roc_figure(labels, probs, patients, report, names, title, bands=None):
  """ROC small multiples: curve, 95% band, chance line, validation-threshold point."""
  bands = bands if bands is not None else curve_bands(labels, probs, patients, names)

  def panel(axes, k, name, band):
    del k
    row = report['per_label'][name]
    _draw_band(axes, band, 'tab:blue')
    axes.plot([0, 1], [0, 1], color='grey', lw=0.8, linestyle=':')
    if row['sensitivity'] is not None and row['specificity'] is not None:
      axes.plot(1 - row['specificity'], row['sensitivity'], 'o', color='tab:red', ms=4)
    axes.set_title(f'{name}\nAUROC {row["auroc"]:.3f}{_interval(row["auroc_ci"])}', fontsize=8)

  caption = (
    f'{title}. x: false positive rate, y: sensitivity; band: 95% patient '
    'bootstrap; dot: threshold chosen on validation'
  )
  return _curve_grid(np.asarray(labels), names, bands, 'roc', 'ROC', panel, caption)


def pr_figure(labels, probs, patients, report, names, title, bands=None):
  """Precision-recall small multiples with 95% band and the prevalence (chance) line,
  the share of positives among the label's known entries."""
  bands = bands if bands is not None else curve_bands(labels, probs, patients, names)
  labels = np.asarray(labels)

  def panel(axes, k, name, band):
    row = report['per_label'][name]
    _draw_band(axes, band, 'tab:green')
    axes.axhline(
      labels[metrics_lib.known(labels, k), k].mean(), color='grey', lw=0.8, linestyle=':'
    )
    axes.set_title(f'{name}\nAUPRC {row["auprc"]:.3f}{_interval(row["auprc_ci"])}', fontsize=8)

  caption = (
    f'{title}. x: recall (sensitivity), y: precision; band: 95% patient '
    'bootstrap; dotted: prevalence'
  )
  return _curve_grid(labels, names, bands, 'pr', 'PR curve', panel, caption)


def reliability_figure(labels, probs, temperature, names, title, num_bins=calibration_lib.NUM_BINS):
  """Reliability diagrams per label: raw (blue) and temperature-scaled (orange).

  calibration.py leaves the unknown entries (label below 0) out of bins and ECE.
  """
  labels, probs = np.asarray(labels), np.asarray(probs)
  scaled = calibration_lib.apply_temperature(probs, temperature)
  figure, axes_list = _grid_axes(len(names))
  for k, (name, axes) in enumerate(zip(names, axes_list)):
    if not metrics_lib.known(labels, k).any():
      _empty_panel(axes, name, f'no reliability: every {name}\nlabel of the split is unknown')
      continue
    axes.plot([0, 1], [0, 1], color='grey', lw=0.8, linestyle=':')
    eces = []
    for values, color, marker in (
      (probs[:, k], 'tab:blue', 'o'),
      (scaled[:, k], 'tab:orange', 's'),
    ):
      bins = calibration_lib.reliability_bins(labels[:, k], values, num_bins)
      filled = bins['count'] > 0
      axes.plot(
        bins['mean_predicted'][filled],
        bins['observed'][filled],
        marker=marker,
        color=color,
        ms=3,
        lw=1,
      )
      eces.append(calibration_lib.expected_calibration_error(labels[:, k], values, num_bins))
      if color == 'tab:blue':
        _bin_counts(axes, bins, num_bins)
    axes.set_title(f'{name}\nECE {eces[0]:.3f} -> {eces[1]:.3f}', fontsize=8)
    axes.set(xlim=(0, 1), ylim=(0, 1), aspect='equal')
    axes.tick_params(labelsize=6)
  figure.legend(
    handles=[
      lines_lib.Line2D([], [], color='tab:blue', marker='o', ms=3, label='as predicted'),
      lines_lib.Line2D(
        [],
        [],
        color='tab:orange',
        marker='s',
        ms=3,
        label=f'temperature T={temperature:.2f} (fitted on validation)',
      ),
      lines_lib.Line2D([], [], color='grey', linestyle=':', label='perfect calibration'),
    ],
    loc='outside lower center',
    ncols=3,
    fontsize=7,
  )
  figure.suptitle(
    f'{title}. x: mean predicted probability in a bin of width '
    f'{1 / num_bins:.1f}, y: fraction positive; small numbers: images per bin '
    '(as predicted): a point of few images says little',
    fontsize=9,
  )
  return figure


def _bin_counts(axes, bins, num_bins):
  """Writes each bin's number of images along the panel's foot."""
  for b in np.flatnonzero(bins['count'] > 0):
    axes.text(
      (b + 0.5) / num_bins,
      0.02,
      str(int(bins['count'][b])),
      fontsize=4.5,
      ha='center',
      va='bottom',
      color='0.35',
      rotation=90,
    )


# ----------------------------------------------------------------------------
# Heatmaps.


def probability_map(cam, bias, temperature=1.0):
  """The CAM on the probability scale: sigmoid((cam + bias) / temperature)."""
  logits = (np.asarray(cam, dtype=np.float64) + float(bias)) / float(temperature)
  return (1 / (1 + np.exp(-logits))).astype(np.float32)


def heatmap_figure(
  image,
  cam,
  bias,
  *,
  finding,
  probability,
  image_name='',
  true_box=None,
  model_box=None,
  temperature=1.0,
  alpha=0.5,
):
  """The grey image, the probability-scale CAM (0-1, colour bar), both boxes, a legend."""
  image = np.asarray(image)
  image = image[..., 0] if image.ndim == 3 else image
  figure = figure_lib.Figure(figsize=(4.6, 4.4), dpi=100, layout='constrained')
  axes = figure.subplots()
  axes.imshow(image, cmap='gray', vmin=0, vmax=255)
  shown = axes.imshow(
    probability_map(cam, bias, temperature), cmap=HEATMAP_COLORMAP, alpha=alpha, vmin=0, vmax=1
  )
  colorbar = figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.02)
  colorbar.set_label('probability scale of the map (same 0-1 on every image)', fontsize=7)
  colorbar.ax.tick_params(labelsize=7)
  handles = []
  for box, style, label in (
    (true_box, NIH_BOX_STYLE, "NIH's box (annotation)"),
    (model_box, MODEL_BOX_STYLE, "model's region (map >= 50% of its range)"),
  ):
    if box is not None:
      x, y, w, h = _inside(box, image.shape)
      axes.add_patch(patches.Rectangle((x - 0.5, y - 0.5), w, h, fill=False, **style))
      handles.append(
        lines_lib.Line2D(
          [], [], color=style['edgecolor'], linestyle=style['linestyle'], lw=2, label=label
        )
      )
  if handles:
    axes.legend(
      handles=handles,
      loc='upper center',
      bbox_to_anchor=(0.5, -0.01),
      fontsize=7,
      ncols=1,
      facecolor='0.3',
      framealpha=1,
      labelcolor='white',
    )  # Dark, so the white dashes show.
  name = f'{image_name}\n' if image_name else ''
  calibrated = f', T={temperature:.2f}' if temperature != 1.0 else ''
  axes.set_title(f'{name}{finding}: p = {probability:.3f}{calibrated}', fontsize=9)
  axes.set_xticks([])
  axes.set_yticks([])
  return figure


def _inside(box, shape, inset=0.01):
  """The box pulled in from any image edge it touches by `inset` of the image, so
  its outline is drawn inside the picture (a region of the whole image too)."""
  x, y, w, h = (float(v) for v in box)
  height, width = shape[:2]
  dx, dy = max(1.0, inset * width), max(1.0, inset * height)
  left, top = max(x, dx), max(y, dy)
  right, bottom = min(x + w, width - dx), min(y + h, height - dy)
  return left, top, max(right - left, 1.0), max(bottom - top, 1.0)


def save_heatmap(path, *args, **kwargs):
  """Writes heatmap_figure(*args, **kwargs) as a PNG at path."""
  return save(heatmap_figure(*args, **kwargs), path)
