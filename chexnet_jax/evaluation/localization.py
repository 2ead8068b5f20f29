"""Where the model looks: a gallery of confident true positives, and localisation.

Class activation maps (cam.py) of the examples an Evaluation (scoring.py) needs:
the most confident true positive of each label for the gallery, and every image
with a box (NIH's, or the synthetic data's) for Wang et al.'s localisation
scores. Runs on process 0 with a local copy of the weights.
"""

import dataclasses
from typing import Optional

import numpy as np

from chexnet_jax.evaluation import boxes as boxes_lib
from chexnet_jax.evaluation import cam as cam_lib

from chexnet_jax.model import losses
from chexnet_jax.model import densenet
from input_pipeline import pipeline

# NIH's boxes (and the synthetic ones) are in the frame of the 1024 x 1024 release.
BOX_FRAME = (1024, 1024)


def boxes_in_input(record, config):
  """[(label index, (x, y, w, h) in model-input pixels)] of a split_metadata row.

  Boxes wholly cut away by the centre crop are left out.
  """
  found = []
  for box in record.get('boxes', ()):
    mapped = boxes_lib.original_box_to_input(
      box['bbox'],
      BOX_FRAME,
      config.dataset_image_size,
      config.image_size,
      config.eval_preprocess,
    )
    if mapped is not None:
      found.append((int(box['label']), mapped))
  return found


def true_positive_rows(evaluation, k):
  """Rows that are true positives of label k: positive, and scored at or above the
  label's threshold chosen on validation (none without a threshold)."""
  probs, labels = evaluation.predictions.probs, evaluation.predictions.labels
  name = evaluation.label_names[k]
  threshold = evaluation.report['per_label'][name].get('threshold')
  if threshold is None:
    return []
  return [int(row) for row in np.flatnonzero((labels[:, k] > 0) & (probs[:, k] >= threshold))]


def gallery_choices(evaluation, size):
  """[(row, label index)]: the most confident true positive of each of the run's labels.

  A true positive is a positive image the validation threshold calls positive
  (true_positive_rows); a label with none has no entry. One per label (an unknown
  label, -1, is never a positive), most confident first; an example with a box for
  that label is preferred, so the gallery shows the dataset's annotation (NIH's
  boxes) where it can.
  """
  probs = evaluation.predictions.probs
  boxed = {
    (row, k)
    for row, record in enumerate(evaluation.records)
    for k, _ in boxes_in_input(record, evaluation.config)
  }
  best = []
  for k in range(len(evaluation.label_names)):
    positives = true_positive_rows(evaluation, k)
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
  cam_fn = cam_lib.make_cam_fn(run.model, densenet.DTYPES[run.config.dtype])
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


@dataclasses.dataclass(frozen=True)
class GalleryMap:
  """One gallery entry: an image, its label's CAM and what is drawn on it."""

  record: dict
  label: str
  image: np.ndarray
  cam: np.ndarray
  bias: float  # The head's bias of the label: puts the CAM on the probability scale.
  probability: float
  true_box: Optional[tuple]  # The dataset's box in the input's frame, if it has one.
  model_box: Optional[tuple]  # The box around the CAM's peak region.


def heatmaps_and_localization(run, evaluation, gallery_size=8, cam_threshold=0.5):
  """The gallery's maps and the localisation scores: (list of GalleryMap, localization).

  Localisation: every box of the split against the CAM of its label, scored as
  IoU and IoBB of the box around the map's peak region (Wang et al. 2017). A box
  whose label is unknown (-1) for its image is not scored, like every other number.
  """
  gallery = gallery_choices(evaluation, gallery_size)
  names = run.label_names
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
      if k >= labels.shape[1] or not losses.is_known(labels[row, k]):
        continue
      result = cam_lib.localize(maps[k], box, cam_threshold=cam_threshold)
      scores.setdefault(names[k], {'iou': [], 'iobb': []})
      scores[names[k]]['iou'].append(result['iou'])
      scores[names[k]]['iobb'].append(result['iobb'])
    for gallery_row, k in gallery:
      if gallery_row == row:
        gallery_maps[(row, k)] = (image, maps[k])
  maps = [
    _gallery_map(evaluation, row, k, *gallery_maps[(row, k)], bias[k], cam_threshold)
    for row, k in gallery
  ]
  return maps, _localization(scores, cam_threshold)


def _gallery_map(evaluation, row, k, image, heat, bias, cam_threshold):
  record = evaluation.records[row]
  true_box = next(
    (box for label, box in boxes_in_input(record, evaluation.config) if label == k), None
  )
  return GalleryMap(
    record=record,
    label=evaluation.label_names[k],
    image=image,
    cam=heat,
    bias=float(bias),
    probability=float(evaluation.predictions.probs[row, k]),
    true_box=true_box,
    model_box=cam_lib.cam_to_box(heat, cam_threshold),
  )


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
