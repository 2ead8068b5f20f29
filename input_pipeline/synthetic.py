"""A learnable stand-in for ChestX-ray14: pure numpy, random access, same element spec.

Pathology k is present <=> a bright square is drawn in grid cell k (a 4x4 grid, cells
0..13 row by row) on a noisy background. Each class's square carries its own texture
(stripes of one orientation and period, or a checkerboard): a convolutional network
with global pooling sees what is drawn, not where, so the texture is what makes the
labels learnable in a few hundred steps. `patch_box(k, size)` says where, so class-
activation-map tests can check localisation. Every example is a pure function of
(split, index): no files, no state, picklable for grain workers.
"""

import numpy as np

from input_pipeline import labels as labels_lib

SPLITS = ('train', 'validation', 'test')
_GRID = 4  # 4x4 cells; the first 14 hold the 14 classes.
_PATCH_FRACTION = 0.75  # Patch side as a fraction of the cell side.
# Class k's texture: stripes along one of 4 directions with period 2, 4 or 6
# pixels (12 classes), then checkerboards of cell 2 and 3 (2 classes).
_DIRECTIONS = ((1, 0), (0, 1), (1, 1), (1, -1))
_PERIODS = (3, 4, 6)
PRESENT_PROBABILITY = 0.25
_BOX_FRAME = 1024  # Boxes use NIH's original 1024-pixel frame, like the real data.


def patch_box(class_index: int, image_size: int) -> tuple[int, int, int, int]:
  """(x, y, w, h) in pixels of class `class_index`'s patch in a size x size image."""
  if not 0 <= class_index < labels_lib.NUM_CLASSES:
    raise ValueError(f'class_index must be in [0, {labels_lib.NUM_CLASSES}), got {class_index}')
  cell = image_size / _GRID
  side = max(1, round(cell * _PATCH_FRACTION))
  row, col = divmod(class_index, _GRID)
  x = round(col * cell + (cell - side) / 2)
  y = round(row * cell + (cell - side) / 2)
  return x, y, side, side


def texture(class_index: int, height: int, width: int) -> np.ndarray:
  """Class `class_index`'s pattern: uint8 values 140 or 255, shape (h, w)."""
  y, x = np.mgrid[:height, :width]
  if class_index < len(_DIRECTIONS) * len(_PERIODS):
    period = _PERIODS[class_index // len(_DIRECTIONS)]
    dx, dy = _DIRECTIONS[class_index % len(_DIRECTIONS)]
    on = ((dx * x + dy * y) % period) < period // 2
  else:
    cell = class_index - len(_DIRECTIONS) * len(_PERIODS) + 2
    on = ((x // cell) + (y // cell)) % 2 == 0
  return np.where(on, 255, 140).astype(np.uint8)


def split_sizes(config) -> dict[str, int]:
  return {
    'train': config.synthetic_train_size,
    'validation': config.synthetic_eval_size,
    'test': config.synthetic_eval_size,
  }


class SyntheticSplit:
  """One synthetic split, random access (len, getitem), yielding what a TFDS split yields."""

  def __init__(self, split: str, size: int, image_size: int, seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f'Unknown split {split!r}; synthetic splits are {SPLITS}')
    self._split, self._size, self._image_size = split, size, image_size
    self._seed = (seed, SPLITS.index(split))

  def __len__(self) -> int:
    return self._size

  def __repr__(self):
    return f'SyntheticSplit({self._split!r}, size={self._size}, image_size={self._image_size})'

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._size:
      raise IndexError(f'index {index} out of range for {self!r}')
    rng = np.random.default_rng((*self._seed, index))
    labels = (rng.random(labels_lib.NUM_CLASSES) < PRESENT_PROBABILITY).astype(np.uint8)
    present = np.flatnonzero(labels)
    # One patient per image, distinct across splits (no patient overlap).
    patient = SPLITS.index(self._split) * 10_000_000 + index
    return {
      'image': self._draw(rng, present),
      'labels': labels,
      'image_name': f'synthetic_{self._split}_{index:06d}.png'.encode(),
      'patient': str(patient).encode(),
      'patient_id': patient,
      'age': int(rng.integers(20, 90)),
      'sex': b'MF'[index % 2 : index % 2 + 1],
      'view_position': b'PA',
      'follow_up': 0,
      'boxes': {
        'label': [np.int32(k) for k in present],
        'bbox': [np.array(patch_box(k, _BOX_FRAME), np.float32) for k in present],
      },
    }

  def _draw(self, rng: np.random.Generator, present: np.ndarray) -> np.ndarray:
    size = self._image_size
    image = rng.integers(0, 90, (size, size), dtype=np.uint8)
    for k in present:
      x, y, w, h = patch_box(int(k), size)
      image[y : y + h, x : x + w] = texture(int(k), h, w) - rng.integers(
        0, 20, (h, w), dtype=np.uint8
      )
    return image[:, :, None]


def source(config, split: str) -> SyntheticSplit:
  """The synthetic split at config.dataset_image_size (the pipeline crops it). The
  data do not depend on config.seed: changing the training seed keeps the dataset."""
  return SyntheticSplit(split, split_sizes(config)[split], config.dataset_image_size)
