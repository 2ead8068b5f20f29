"""Box geometry: (x, y, w, h) boxes in pixels, as in NIH's BBox_List_2017.csv.

IoU, and IoBB = intersection over the area of the *detected* box (Wang et al.
2017, ChestX-ray8); masks to boxes and back; and the mapping of a box on the
original image into the model input's pixels, following the eval preprocessing.
"""

import numpy as np


def box_area(box):
  _, _, w, h = box
  return max(float(w), 0.0) * max(float(h), 0.0)


def box_intersection(box_a, box_b):
  ax, ay, aw, ah = box_a
  bx, by, bw, bh = box_b
  overlap_w = min(ax + aw, bx + bw) - max(ax, bx)
  overlap_h = min(ay + ah, by + bh) - max(ay, by)
  return max(overlap_w, 0.0) * max(overlap_h, 0.0)


def iou(predicted_box, true_box):
  """Intersection over union of two (x, y, w, h) boxes."""
  inter = box_intersection(predicted_box, true_box)
  union = box_area(predicted_box) + box_area(true_box) - inter
  return inter / union if union > 0 else 0.0


def iobb(predicted_box, true_box):
  """Intersection over the detected (predicted) box's area, Wang et al. 2017."""
  area = box_area(predicted_box)
  return box_intersection(predicted_box, true_box) / area if area > 0 else 0.0


def box_to_mask(box, shape):
  """Boolean [H, W] mask of the pixels whose centres lie inside the box."""
  x, y, w, h = box
  rows = np.arange(shape[0])[:, None] + 0.5
  cols = np.arange(shape[1])[None, :] + 0.5
  return (cols >= x) & (cols < x + w) & (rows >= y) & (rows < y + h)


def mask_to_box(mask):
  """Tight (x, y, w, h) box around a boolean mask (None if empty)."""
  rows, cols = np.nonzero(mask)
  if rows.size == 0:
    return None
  return (
    int(cols.min()),
    int(rows.min()),
    int(cols.max() - cols.min() + 1),
    int(rows.max() - rows.min() + 1),
  )


def center_crop_offset(size, crop):
  return (size - crop) // 2


def original_box_to_input(
  box, original_size, dataset_image_size, image_size, eval_preprocess='center_crop'
):
  """Maps an (x, y, w, h) box on the original image into model-input pixels.

  Follows the eval preprocessing: resize the shorter side to dataset_image_size,
  centre-crop a dataset_image_size square, then centre-crop image_size
  (eval_preprocess 'center_crop') or resize it to image_size ('resize').
  Returns None when the box falls entirely outside the crop.
  """
  width, height = original_size
  scale = dataset_image_size / min(width, height)
  resized_w, resized_h = round(width * scale), round(height * scale)
  left = center_crop_offset(resized_w, dataset_image_size)
  top = center_crop_offset(resized_h, dataset_image_size)
  inner = center_crop_offset(dataset_image_size, image_size)
  if eval_preprocess == 'resize':
    inner, zoom = 0, image_size / dataset_image_size
    left, top, scale = left * zoom, top * zoom, scale * zoom
  x0 = box[0] * scale - left - inner
  y0 = box[1] * scale - top - inner
  x1, y1 = x0 + box[2] * scale, y0 + box[3] * scale
  x0, y0 = max(x0, 0.0), max(y0, 0.0)
  x1, y1 = min(x1, float(image_size)), min(y1, float(image_size))
  if x1 <= x0 or y1 <= y0:
    return None
  return (x0, y0, x1 - x0, y1 - y0)
