"""The gallery of an evaluation: one heatmap PNG per confident true positive.

The maps come from evaluation/localization.py; this module only draws them and
lists what it drew (the page and the notebook show the list).
"""

import os
import shutil

from chexnet_jax.report import eval_outputs
from chexnet_jax.report import figures


def write_gallery(out_dir, gallery_maps):
  """Draws each localization.GalleryMap into OUT_DIR/gallery/; returns the entries."""
  shutil.rmtree(os.path.join(out_dir, 'gallery'), ignore_errors=True)  # No stale maps.
  return [_draw(out_dir, entry) for entry in gallery_maps]


def _draw(out_dir, entry):
  image_name = str(entry.record['image_name'])  # The dataset's own path: unique in the split.
  stem = eval_outputs.safe_file_name(os.path.splitext(image_name)[0])
  path = os.path.join(out_dir, 'gallery', f'{stem}_{eval_outputs.safe_file_name(entry.label)}.png')
  figures.save_heatmap(
    path,
    entry.image,
    entry.cam,
    entry.bias,
    finding=entry.label,
    probability=entry.probability,
    image_name=image_name,
    true_box=entry.true_box,
    model_box=entry.model_box,
  )
  return {
    'image': image_name,
    'label': entry.label,
    'probability': entry.probability,
    'file': os.path.relpath(path, out_dir),
    'box': entry.true_box is not None,  # The dataset's annotation drawn on it.
  }
