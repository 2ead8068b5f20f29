"""Per-process grain input pipelines: uint8 batches for training and evaluation.

Training: one stream of GLOBAL batches, a function of (seed, global step) alone.
Global batch k holds the examples at positions k*B .. (k+1)*B-1 of the stream
(B = config.batch_size); the stream is the train split reshuffled every epoch,
`train_steps_per_epoch` global batches an epoch (the remainder, a different one
each epoch, is dropped). Process p of P reads rows p*B/P .. (p+1)*B/P-1 of each
global batch, the rows its devices hold in the global array. So the data a run
sees does not depend on the number of processes or devices, and a resumed run
needs only the global step to continue exactly (`start_step`), on any topology.
Crops and flips are drawn from (seed, stream position): restoring is exact.
Evaluation: one pass, padded to whole global batches; padding has mask False and
index -1, so each example is scored exactly once.
"""

import math

from absl import flags
import grain
import numpy as np

from input_pipeline import batching
from input_pipeline import images as images_lib
from input_pipeline import sources
from input_pipeline import workers

# Inception-style random_resized_crop aspect ratios and attempts.
_ASPECT_RANGE = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10

# The read side (input_pipeline/sources.py), for the trainer and the tools.


# ---------------------------------------------------------------- sharding


def train_steps_per_epoch(config, num_train_examples: int, process_count: int = 1) -> int:
  """Global batches per epoch: num_train_examples // batch_size, on any topology
  (`process_count` only checks that the batch divides over the processes)."""
  batching.split_batch(config.batch_size, process_count)
  steps = num_train_examples // config.batch_size
  if steps < 1:
    raise sources.DatasetError(
      f'The train split has {num_train_examples} examples, which '
      f'cannot fill one batch of {config.batch_size}; lower '
      'config.batch_size or use a larger split.'
    )
  return steps


# ---------------------------------------------------------------- augmentation


def _crop_window(rng, height, width, min_area):
  """Inception-style random_resized_crop window (top, left, h, w)."""
  for _ in range(_CROP_ATTEMPTS):
    area = height * width * rng.uniform(min_area, 1.0)
    ratio = math.exp(rng.uniform(*np.log(_ASPECT_RANGE)))
    h, w = round(math.sqrt(area / ratio)), round(math.sqrt(area * ratio))
    if 0 < h <= height and 0 < w <= width:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  side = min(height, width)  # Fallback: the central square.
  return (height - side) // 2, (width - side) // 2, side, side


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 1] -> [size, size, 1], resampled as the dataset builder does."""
  return images_lib.resize_square(image[:, :, 0], size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Central size x size crop, or a resize when the image is smaller than that."""
  height, width = image.shape[:2]
  if height < size or width < size:
    return _resize(image, size)
  top, left = (height - size) // 2, (width - size) // 2
  return image[top : top + size, left : left + size]


def _random_crop(rng, image: np.ndarray, config) -> np.ndarray:
  size = config.image_size
  height, width = image.shape[:2]
  if height < size or width < size:
    return _resize(image, size)
  top, left = rng.integers(0, height - size + 1), rng.integers(0, width - size + 1)
  return image[top : top + size, left : left + size]


EVAL_PREPROCESS = ('resize', 'center_crop')


def eval_image(image: np.ndarray, size: int, mode: str = 'resize') -> np.ndarray:
  """The evaluation view of a stored image: 'resize' (CheXNet: the whole image,
  resized to size) or 'center_crop' (its central size x size square)."""
  if mode == 'resize':
    return _resize(image, size)
  if mode == 'center_crop':
    return center_crop(image, size)
  raise ValueError(f'config.eval_preprocess must be one of {EVAL_PREPROCESS}, got {mode!r}')


def _whole_image(rng, image: np.ndarray, config) -> np.ndarray:
  del rng  # CheXNet: the whole image, resized; only the flip is random.
  return _resize(image, config.image_size)


def _random_resized_crop(rng, image: np.ndarray, config) -> np.ndarray:
  top, left, h, w = _crop_window(rng, *image.shape[:2], config.min_crop_area)
  return _resize(image[top : top + h, left : left + w], config.image_size)


def _center_crop(rng, image: np.ndarray, config) -> np.ndarray:
  del rng  # The same crop every time.
  return center_crop(image, config.image_size)


# config.augment -> (rng, uint8 [H, W, 1], config) -> uint8 [S, S, 1].
AUGMENTS = {
  'resize': _whole_image,
  'random_resized_crop': _random_resized_crop,
  'random_crop': _random_crop,
  'center_crop': _center_crop,
}


def augment(image: np.ndarray, rng: np.random.Generator, config) -> np.ndarray:
  """uint8 [H, W, 1] -> uint8 [S, S, 1]: config.augment crop, then maybe a flip."""
  if config.augment not in AUGMENTS:
    raise ValueError(f'config.augment must be one of {tuple(AUGMENTS)}, got {config.augment!r}')
  image = AUGMENTS[config.augment](rng, image, config)
  if config.random_flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return np.ascontiguousarray(image)


# ---------------------------------------------------------------- datasets


def _element(image, labels, index: int, real: bool = True) -> dict:
  return {
    'image': image,
    'labels': np.asarray(labels, np.float32),
    'mask': np.bool_(real),
    'index': np.int32(index),
  }


class _TrainExample:
  """Index i of this process's element stream -> augmented element.

  i -> global step k = start_step + i // b and row r = p*b + i % b of that global
  batch (b = B / P) -> stream position g = k*B + r -> (epoch, position in it) ->
  split index via the epoch's shuffle. A class, so it pickles (grain workers).
  """

  def __init__(self, source, config, order, per_epoch, start_step, process_index, process_count):
    self._source, self._config, self._order = source, config, order
    self._per_epoch, self._start_step = per_epoch, start_step
    self._global_batch = config.batch_size
    self._local_batch = batching.split_batch(config.batch_size, process_count)
    self._first_row = process_index * self._local_batch

  def position(self, i: int) -> int:
    """The stream position of this process's i-th element."""
    step = self._start_step + i // self._local_batch
    return step * self._global_batch + self._first_row + i % self._local_batch

  def __call__(self, i, _):
    position = self.position(i)
    epoch, j = divmod(position, self._per_epoch)
    index = self._order[epoch * len(self._order) + j]  # grain reshuffles per epoch.
    # Randomness from (seed, stream position): the same on any topology.
    rng = np.random.default_rng((self._config.seed, position))
    example = self._source[int(index)]
    return _element(augment(example['image'], rng, self._config), sources.labels_of(example), index)


def _shuffle_seed(seed: int) -> int:
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _train_dataset(config, source, process_index, process_count, start_step=0) -> grain.MapDataset:
  """Infinite MapDataset of this process's rows of global batches start_step, ..."""
  batch = batching.split_batch(config.batch_size, process_count)
  per_epoch = train_steps_per_epoch(config, len(source), process_count) * config.batch_size
  order = grain.MapDataset.range(len(source)).shuffle(_shuffle_seed(config.seed))
  ds = grain.MapDataset.range(batch).repeat(None)  # Elements: only their index counts.
  ds = ds.map_with_index(
    _TrainExample(source, config, order, per_epoch, start_step, process_index, process_count)
  )
  return ds.batch(batch, drop_remainder=True)


def _to_iter_dataset(config, ds: grain.MapDataset) -> grain.IterDataset:
  """Threads/prefetch per config; worker processes if config.grain_workers > 0. Memory
  stays bounded: at most prefetch_buffer batches per process or worker."""
  buffer = config.prefetch_buffer
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=buffer, prefetch_buffer_size=buffer))
  if config.grain_workers > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks) they
    # are unparsed, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
  return workers.prefetch(config, ds)


def create_train_iterator(config, *, process_index: int, process_count: int, start_step: int = 0):
  """Infinite grain DatasetIterator over this process's rows of the global batches
  of steps start_step+1, start_step+2, ...:
  {'image' uint8 [b,S,S,1], 'labels' float32 [b,14], 'mask' bool [b], 'index' int32 [b]}
  with b = config.batch_size // process_count."""
  source = sources.get_source(config, 'train')
  ds = _train_dataset(config, source, process_index, process_count, start_step)
  return iter(_to_iter_dataset(config, ds))


class _EvalExample:
  """Padded position -> element; positions past the split are masked padding."""

  def __init__(self, source, config):
    self._source, self._size = source, config.image_size
    self._mode = config.eval_preprocess
    self._num_classes = len(sources.get_label_names(config))

  def __call__(self, position):
    position = int(position)
    if position >= len(self._source):
      blank = np.zeros((self._size, self._size, 1), np.uint8)
      return _element(blank, np.zeros(self._num_classes, np.float32), -1, real=False)
    example = self._source[position]
    image = eval_image(example['image'], self._size, self._mode)
    return _element(image, sources.labels_of(example), position)


def global_eval_batch(config, device_count: int) -> int:
  """config.eval_batch_size rounded up to a multiple of `device_count`, so that
  evaluation runs on any number of processes and devices (the extra rows are
  masked padding)."""
  if config.eval_batch_size < 1:
    raise batching.BatchSizeError(
      f'config.eval_batch_size={config.eval_batch_size} must be at least 1.'
    )
  return -(-config.eval_batch_size // device_count) * device_count


def eval_batches_per_process(
  config, num_examples: int, process_count: int, device_count: int | None = None
) -> int:
  """Batches every process yields in one evaluation pass (the same on all)."""
  return math.ceil(num_examples / global_eval_batch(config, device_count or process_count))


def create_eval_iterator(
  config, split: str, *, process_index: int, process_count: int, device_count: int | None = None
):
  """Iterable over one pass of `split` for this process (iterate it again for another
  pass). Padded to whole global batches; padding has mask False and index -1.
  `device_count` (default: process_count) is that of the whole job: the global
  batch is config.eval_batch_size rounded up to a multiple of it."""
  source = sources.get_source(config, split)
  device_count = device_count or process_count
  batch = batching.split_batch(
    global_eval_batch(config, device_count), process_count, field='eval_batch_size'
  )
  per_process = eval_batches_per_process(config, len(source), process_count, device_count) * batch
  start = process_index * per_process
  ds = grain.MapDataset.range(start, start + per_process).map(_EvalExample(source, config))
  return workers.OnePass(config, _to_iter_dataset(config, ds.batch(batch)))
