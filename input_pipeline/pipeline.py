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

import contextlib
import functools
import glob
import math
import os
import types

from absl import flags
import grain
import numpy as np

from input_pipeline import batching
from input_pipeline import chestxray14
from input_pipeline import csv_dataset
from input_pipeline import images as images_lib
from input_pipeline import labels as labels_lib
from input_pipeline import synthetic
from input_pipeline import workers

# Inception-style random_resized_crop aspect ratios and attempts.
_ASPECT_RANGE = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


# ---------------------------------------------------------------- sources


class DatasetError(ValueError):
  """The configured dataset is missing or does not match the config."""


def _is_own(config) -> bool:
  """A dataset built from the user's CSV (input_pipeline.csv_dataset)."""
  return config.dataset not in ('chestxray14', 'synthetic')


def _dataset_dir(config) -> str:
  if _is_own(config):
    return csv_dataset.dataset_dir(config.data_dir, config.dataset, config.dataset_image_size)
  return chestxray14.dataset_dir(
    config.data_dir, config.dataset_image_size, config.val_fraction, config.split_seed
  )


def _missing_own_dataset_error(config) -> DatasetError:
  parent = os.path.join(config.data_dir, config.dataset)
  built = (
    sorted(b for b in os.listdir(parent) if not b.startswith('.')) if os.path.isdir(parent) else []
  )
  others = (
    sorted(d for d in os.listdir(config.data_dir) if not d.startswith('.'))
    if (os.path.isdir(config.data_dir))
    else []
  )
  return DatasetError(
    f'No complete dataset {config.dataset!r} at {config.dataset_image_size}px in data_dir '
    f'{config.data_dir!r} (sizes built: {built or "none"}; datasets there: '
    f'{others or "none"}). Build it with: python -m input_pipeline.build --csv FILE '
    f'--image_root DIR --labels A,B,C --patient_column COL --name {config.dataset} '
    f'--data_dir {config.data_dir} --image_size {config.dataset_image_size}, or set '
    '--config.dataset / --config.dataset_image_size to a built one (chestxray14 for NIH).'
  )


def _missing_dataset_error(config) -> DatasetError:
  if _is_own(config):
    return _missing_own_dataset_error(config)
  parent = os.path.join(config.data_dir, 'chestxray14')
  built = sorted(os.listdir(parent)) if os.path.isdir(parent) else []
  built = [b for b in built if not b.startswith('.')]
  return DatasetError(
    f'No complete chestxray14 dataset at {config.dataset_image_size}px (val_fraction '
    f'{config.val_fraction}, split_seed {config.split_seed}) in data_dir '
    f'{config.data_dir!r} (built there: {built or "none"}). Build it with: python -m '
    f'input_pipeline.build --manual_dir NIH_DIR --data_dir {config.data_dir} '
    f'--image_size {config.dataset_image_size} --val_fraction {config.val_fraction} '
    f'--split_seed {config.split_seed}, or change the config to match a built one. '
    'A run trained elsewhere: pass --data_dir (evaluate, the notebook: '
    'CHEXNET_DATA_DIR) with the data_dir that holds its dataset here.'
  )


@functools.lru_cache(maxsize=8)
def _builder(data_dir: str, image_size: int, dataset_dir: str):
  del data_dir, image_size  # Part of the cache key only.
  import tensorflow_datasets as tfds  # Heavy; synthetic runs never need it.

  return tfds.builder_from_directory(dataset_dir)


def _tfds_builder(config):
  # dataset_info.json is written last, on the rename: present <=> complete.
  if not os.path.isfile(os.path.join(_dataset_dir(config), 'dataset_info.json')):
    raise _missing_dataset_error(config)
  return _builder(config.data_dir, config.dataset_image_size, _dataset_dir(config))


def _chestxray14_source(config, split: str):
  builder = _tfds_builder(config)
  if split not in builder.info.splits:
    raise DatasetError(
      f'No split {split!r} in {_dataset_dir(config)}; it has {sorted(builder.info.splits)}'
    )
  return builder.as_data_source(split=split)


# config.dataset -> (config, split) -> random-access source; any other name is a
# dataset built from the user's CSV, read like chestxray14.
DATASETS = {'chestxray14': _chestxray14_source, 'synthetic': synthetic.source}


def get_source(config, split: str):
  """Random-access source of `split` (dicts like the TFDS features)."""
  return DATASETS.get(config.dataset, _chestxray14_source)(config, split)


def get_label_names(config) -> tuple[str, ...]:
  """The dataset's label names, in the order of its label vectors: NIH's 14 for
  chestxray14 and synthetic, the recorded ones for a dataset built from a CSV."""
  if not _is_own(config):
    return labels_lib.LABELS
  return tuple((_tfds_builder(config).info.metadata or {})['labels'])


def get_dataset_info(config) -> dict:
  """{'name', 'version', 'dataset_image_size', 'splits': {split: n},
  'train_positive_fraction': [14 floats], 'label_file': which Data_Entry CSV
  (2017 or the v2020 revision) the labels came from}; DatasetError if the dataset is missing,
  or built at another size or with another validation cut."""
  if config.dataset == 'synthetic':
    return {
      'name': 'synthetic',
      'version': '1.0.0',
      'dataset_image_size': config.dataset_image_size,
      'splits': synthetic.split_sizes(config),
      'train_positive_fraction': [synthetic.PRESENT_PROBABILITY] * labels_lib.NUM_CLASSES,
      'label_file': 'synthetic (input_pipeline/synthetic.py)',
    }
  builder = _tfds_builder(config)
  metadata = builder.info.metadata or {}
  if not _is_own(config):  # Their split is fixed by the build (split.json).
    _check_split_matches(config, metadata)  # Belt and braces.
  splits = {s: info.num_examples for s, info in builder.info.splits.items()}
  positives = np.asarray(metadata['positives']['train'], np.float64)
  if 'known' in metadata:  # Labels masked out (CheXpert's U-Ignore) are not counted.
    known = np.maximum(np.asarray(metadata['known']['train'], np.float64), 1)
    return {
      'name': builder.info.name,
      'version': str(builder.info.version),
      'dataset_image_size': config.dataset_image_size,
      'splits': splits,
      'train_positive_fraction': (positives / known).tolist(),
      'label_file': metadata.get('label_file', 'not recorded'),
    }
  # Datasets built before 'label_file' was recorded still name the file.
  label_file = metadata.get('label_file') or metadata.get('inputs', {}).get(
    'data_entry', 'not recorded'
  )
  return {
    'name': builder.info.name,
    'version': str(builder.info.version),
    'dataset_image_size': config.dataset_image_size,
    'splits': splits,
    'train_positive_fraction': (positives / splits['train']).tolist(),
    'label_file': label_file,
  }


def split_file(config):
  """The dataset's split.json (image names per split, seed, fraction), or None
  for synthetic data. The trainer copies it beside every run."""
  if config.dataset == 'synthetic':
    return None
  return os.path.join(_dataset_dir(config), chestxray14.SPLIT_FILE)  # Same name in both.


def _check_split_matches(config, metadata):
  built = (metadata.get('val_fraction'), metadata.get('split_seed'))
  if built != (config.val_fraction, config.split_seed):
    raise DatasetError(
      f'{_dataset_dir(config)} was built with val_fraction, split_seed = {built}, but '
      f'the config says ({config.val_fraction}, {config.split_seed}). Change the config '
      'or rebuild into another data_dir with --val_fraction/--split_seed.'
    )


def _shard_is_readable(path: str) -> bool:
  from array_record.python import array_record_module  # Only on this error path.

  try:
    reader = array_record_module.ArrayRecordReader(path)
    for start in range(0, reader.num_records(), 256):  # Bounded memory.
      reader.read(list(range(start, min(start + 256, reader.num_records()))))
    reader.close()
    return True
  except RuntimeError:
    return False


@contextlib.contextmanager
def reading(config, split: str):
  """Turns a corrupt record met while reading `split` into one DatasetError that
  names the damaged shard(s) (found by reading each shard of the split once) and
  the fix. Records carry checksums, so corruption is always detected."""
  try:
    yield
  except RuntimeError as error:
    if died := workers.died_error(config, error):
      raise died from None
    if 'Corrupted' not in str(error) or config.dataset == 'synthetic':
      raise
    pattern = os.path.join(_dataset_dir(config), f'*-{split}.array_record*')
    bad = [os.path.basename(p) for p in sorted(glob.glob(pattern)) if not _shard_is_readable(p)]
    rebuild = (
      f'--csv FILE ... --name {config.dataset}'
      if _is_own(config)
      else f'--manual_dir NIH_DIR --val_fraction {config.val_fraction} '
      f'--split_seed {config.split_seed}'
    )
    raise DatasetError(
      f'Corrupt records in {", ".join(bad) or "a shard of the " + split + " split"} '
      f'in {_dataset_dir(config)}. Delete that directory and rebuild it: python -m '
      f'input_pipeline.build {rebuild} --data_dir {config.data_dir} '
      f'--image_size {config.dataset_image_size}'
    ) from None


# The config fields a source depends on (a ConfigDict is not hashable, so not a key).
_SOURCE_FIELDS = (
  'dataset',
  'data_dir',
  'dataset_image_size',
  'val_fraction',
  'split_seed',
  'synthetic_train_size',
  'synthetic_eval_size',
)


@functools.lru_cache(maxsize=8)
def _cached_metadata(source_fields: tuple, split: str) -> tuple:
  config = types.SimpleNamespace(**dict(zip(_SOURCE_FIELDS, source_fields)))
  return tuple(_metadata_of(example) for example in _iterate(get_source(config, split)))


def _iterate(source):
  return (source[i] for i in range(len(source)))


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _metadata_of(example: dict) -> dict:
  boxes = example['boxes']
  return {
    'image_name': _text(example['image_name']),
    'patient_id': int(example['patient_id']),
    'age': int(example['age']),
    'sex': _text(example['sex']),
    'view_position': _text(example['view_position']),
    'follow_up': int(example['follow_up']),
    'labels': labels_of(example),
    'boxes': [
      {'label': int(k), 'bbox': [float(v) for v in b]}
      for k, b in zip(boxes['label'], boxes['bbox'])
    ],
  }


def split_metadata(config, split: str) -> list[dict]:
  """Per example of `split`, indexed like batches' 'index': image_name, patient_id,
  age, sex, view_position, follow_up, labels (float32[14]) and boxes ([{'label',
  'bbox': [x, y, w, h] in original 1024 pixels}])."""
  return list(_cached_metadata(tuple(config[f] for f in _SOURCE_FIELDS), split))


# ---------------------------------------------------------------- sharding


def train_steps_per_epoch(config, num_train_examples: int, process_count: int = 1) -> int:
  """Global batches per epoch: num_train_examples // batch_size, on any topology
  (`process_count` only checks that the batch divides over the processes)."""
  batching.split_batch(config.batch_size, process_count)
  steps = num_train_examples // config.batch_size
  if steps < 1:
    raise DatasetError(
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


def labels_of(example: dict) -> np.ndarray:
  """float32 [C]: the example's labels, -1 where its label_mask says unknown
  (CheXpert's uncertain under U-Ignore); the loss and the metrics leave those out."""
  labels = np.asarray(example['labels'], np.float32)
  if 'label_mask' in example:
    labels = np.where(np.asarray(example['label_mask']) > 0, labels, np.float32(-1))
  return labels


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
    return _element(augment(example['image'], rng, self._config), labels_of(example), index)


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
  source = get_source(config, 'train')
  ds = _train_dataset(config, source, process_index, process_count, start_step)
  return iter(_to_iter_dataset(config, ds))


class _EvalExample:
  """Padded position -> element; positions past the split are masked padding."""

  def __init__(self, source, config):
    self._source, self._size = source, config.image_size
    self._mode = config.get('eval_preprocess', 'center_crop')  # Older runs cropped.
    self._num_classes = labels_lib.num_classes_of(config)

  def __call__(self, position):
    position = int(position)
    if position >= len(self._source):
      blank = np.zeros((self._size, self._size, 1), np.uint8)
      return _element(blank, np.zeros(self._num_classes, np.float32), -1, real=False)
    example = self._source[position]
    image = eval_image(example['image'], self._size, self._mode)
    return _element(image, labels_of(example), position)


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
  source = get_source(config, split)
  device_count = device_count or process_count
  batch = batching.split_batch(
    global_eval_batch(config, device_count), process_count, field='eval_batch_size'
  )
  per_process = eval_batches_per_process(config, len(source), process_count, device_count) * batch
  start = process_index * per_process
  ds = grain.MapDataset.range(start, start + per_process).map(_EvalExample(source, config))
  return workers.OnePass(config, _to_iter_dataset(config, ds.batch(batch)))
