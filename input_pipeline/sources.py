"""The read side: one dataset-source interface, its implementations registered by name.

`config.dataset` picks the source: a registered name ('chestxray14', 'synthetic', or
one a module registers with `@register('name')`), else a dataset built by
input_pipeline.records under that name (your CSV, CheXpert, any adapter's plan).
A source says where its dataset lives, its label names, its info (split sizes,
positive fractions, label file, protocol), the random-access source of a split, and
the command that rebuilds it; input_pipeline.pipeline only samples, augments and
batches what a source gives, whatever its kind.

Records (dicts) hold 'image' uint8 [S, S, 1], 'labels' uint8 [C] (and 'label_mask'
where some are unknown), 'image_name' (the path relative to the image root; NIH's
Image Index), 'patient' (the dataset's own patient ID, a string), 'patient_id'
(int32), 'age', 'sex', 'view_position', 'follow_up' and 'boxes'.
"""

import contextlib
import difflib
import functools
import glob
import os
import types

import numpy as np

from chexnet_jax import errors
from input_pipeline import chestxray14
from input_pipeline import labels as labels_lib
from input_pipeline import records
from input_pipeline import synthetic
from input_pipeline import workers


class DatasetError(errors.UserValueError):
  """The configured dataset is missing or does not match the config."""


_REGISTRY = {}


def register(name: str):
  """Class decorator: config.dataset == name reads through this Source subclass."""

  def add(cls):
    _REGISTRY[name] = cls
    return cls

  return add


def for_config(config) -> 'Source':
  """The source of config.dataset (a records dataset under that name if none is registered)."""
  return _REGISTRY.get(config.dataset, Source)(config)


def _complete(directory: str) -> list[str]:
  """The folders in `directory` that hold a complete built dataset somewhere below
  (its dataset_info.json, written last); an interrupted build's are not listed."""
  if not os.path.isdir(directory):
    return []
  return sorted(
    d
    for d in os.listdir(directory)
    if not d.startswith('.')
    and any(
      'incomplete.' not in path
      for path in glob.glob(os.path.join(directory, d, '**', 'dataset_info.json'), recursive=True)
    )
  )


class _Damaged(Exception):
  """A built dataset whose files contradict each other (why: the message)."""


def _shard_lengths(builder, dataset_dir: str) -> str | None:
  """What differs between dataset_info.json's record counts and the records the
  ArrayRecord shards hold (each shard's footer: cheap), or None."""
  from array_record.python import array_record_module

  for name, split in builder.info.splits.items():
    pattern = os.path.join(dataset_dir, f'*-{name}.array_record-*')
    held = []
    for path in sorted(glob.glob(pattern)):
      reader = array_record_module.ArrayRecordReader(path)
      held.append(reader.num_records())
      reader.close()
    if held != [int(n) for n in split.shard_lengths]:
      return (
        f'dataset_info.json says the {name} split has {split.num_examples} records, '
        f'its shards hold {sum(held)}'
      )
  return None


# TFDS keeps its downloads beside the datasets in a data_dir: not a dataset.
TFDS_DOWNLOADS = 'downloads'


def datasets_in(data_dir: str) -> list[str]:
  """The datasets' folders in a data_dir (TFDS's downloads folder and files left out)."""
  return [d for d in _complete(data_dir) if d != TFDS_DOWNLOADS]


def did_you_mean(name: str, data_dir: str) -> str:
  """' Did you mean X?' for the built dataset closest to `name`, or ''."""
  close = difflib.get_close_matches(name, datasets_in(data_dir), n=1)
  return f' Did you mean --config.dataset={close[0]}?' if close and close[0] != name else ''


@functools.lru_cache(maxsize=8)
def _builder(dataset_dir: str):
  """The dataset's tfds builder, once its dataset_info.json is read and its record
  counts are those of its shards (an edited or torn file is refused before use)."""
  import tensorflow_datasets as tfds  # Heavy; synthetic runs never need it.

  try:
    builder = tfds.builder_from_directory(dataset_dir)
  except Exception as error:  # pylint: disable=broad-except
    # protobuf's ParseError, JSONDecodeError, ...: a torn or edited file.
    raise _Damaged(
      f'its dataset_info.json cannot be read ({type(error).__name__}: '
      f'{str(error).splitlines()[0][:120] if str(error) else "empty"})'
    ) from None
  try:
    mismatch = _shard_lengths(builder, dataset_dir)
  except RuntimeError as error:  # A shard without a readable footer.
    mismatch = f'a shard cannot be opened ({str(error).splitlines()[0][:120]})'
  if mismatch:
    raise _Damaged(mismatch)
  return builder


def upgraded_metadata(info) -> dict:
  """A built dataset's metadata in today's schema (records.metadata); datasets built
  before schema 2 lack 'kind', 'labels', 'known', 'num_skipped' and 'protocol'."""
  metadata = dict(info.metadata or {})
  if metadata.get('schema', 1) >= records.SCHEMA:
    return metadata
  nih = info.name == chestxray14.NAME
  kind = chestxray14.NAME if nih else 'chexpert' if metadata.get('format') == 'chexpert' else 'csv'
  labels = metadata.get('labels') or list(labels_lib.LABELS)
  sizes = {s: split.num_examples for s, split in info.splits.items()}
  inputs = metadata.get('inputs', {})
  protocol = (
    'valid.csv as validation, test cut by patient from train (built before valid.csv '
    'became the test split; rebuild for that)'
    if kind == 'chexpert'
    else 'not recorded (built before protocols were recorded)'
  )
  return {
    'split_by': 'patient',
    'label_file': inputs.get('data_entry', 'not recorded'),
    **metadata,
    'schema': records.SCHEMA,
    'kind': kind,
    'labels': labels,
    'known': metadata.get('known') or {s: [n] * len(labels) for s, n in sizes.items()},
    'num_skipped': metadata.get('num_skipped', len(metadata.get('skipped') or {})),
    'protocol': protocol,
  }


class Source:
  """A dataset built by input_pipeline.records, under config.dataset; the interface
  every source implements (subclasses override what differs)."""

  def __init__(self, config):
    self.config = config

  def directory(self) -> str | None:
    """Where the dataset lives (None: nowhere, it is made in memory)."""
    c = self.config
    return records.dataset_dir(c.data_dir, c.dataset, f'{c.dataset_image_size}px')

  def rebuild_hint(self) -> str:
    """The build command's dataset-specific arguments."""
    name = self.config.dataset
    return f'--csv FILE --image_root DIR --labels A,B,C --patient_column COL --name {name}'

  def described(self) -> str:
    """What is missing and what is there, for missing_error."""
    c = self.config
    return (
      f'dataset {c.dataset!r} at {c.dataset_image_size}px in data_dir {c.data_dir!r} '
      f'(sizes built: {_complete(os.path.join(c.data_dir, c.dataset)) or "none"}; '
      f'datasets there: {datasets_in(c.data_dir) or "none"})'
    )

  def other_fix(self) -> str:
    return (
      'or set --config.dataset / --config.dataset_image_size to a built one (chestxray14 for NIH).'
    )

  def build_command(self) -> str:
    c = self.config
    return (
      f'python -m input_pipeline.build {self.rebuild_hint()} --data_dir {c.data_dir} '
      f'--image_size {c.dataset_image_size}'
    )

  def missing_error(self) -> DatasetError:
    c = self.config
    return DatasetError(
      f'No complete {self.described()}.{did_you_mean(c.dataset, c.data_dir)} '
      f'Build it with: {self.build_command()}, {self.other_fix()}'
    )

  def builder(self):
    # dataset_info.json is written last, on the rename: present <=> complete.
    if not os.path.isfile(os.path.join(self.directory(), 'dataset_info.json')):
      raise self.missing_error()
    try:
      return _builder(self.directory())
    except _Damaged as why:
      raise DatasetError(
        f'{self.directory()} is damaged: {why}; delete that directory and rebuild it: '
        f'{self.build_command()}'
      ) from None

  def metadata(self) -> dict:
    return upgraded_metadata(self.builder().info)

  def label_names(self) -> tuple[str, ...]:
    """The label names, in the order of the label vectors."""
    return tuple(self.metadata()['labels'])

  def info(self) -> dict:
    """{'name', 'version', 'kind', 'dataset_image_size', 'splits': {split: n},
    'train_positive_fraction': [C floats], 'label_file', 'protocol'}."""
    builder, metadata = self.builder(), self.metadata()
    positives = np.asarray(metadata['positives']['train'], np.float64)
    # Labels masked out (CheXpert's U-Ignore) are not counted.
    known = np.maximum(np.asarray(metadata['known']['train'], np.float64), 1)
    return {
      'name': builder.info.name,
      'version': str(builder.info.version),
      'kind': metadata['kind'],
      'dataset_image_size': self.config.dataset_image_size,
      'splits': {s: info.num_examples for s, info in builder.info.splits.items()},
      'train_positive_fraction': (positives / known).tolist(),
      'label_file': metadata['label_file'],
      'protocol': metadata['protocol'],
    }

  def source(self, split: str):
    """Random-access source of `split` (len, getitem -> record dict)."""
    builder = self.builder()
    if split not in builder.info.splits:
      raise DatasetError(
        f'No split {split!r} in {self.directory()}; it has {sorted(builder.info.splits)}'
      )
    return builder.as_data_source(split=split)

  def split_file(self) -> str | None:
    """The dataset's split.json (None where there is none)."""
    return os.path.join(self.directory(), records.SPLIT_FILE)


@register(chestxray14.NAME)
class Chestxray14Source(Source):
  """NIH ChestX-ray14: its directory names the validation cut too."""

  def directory(self) -> str:
    c = self.config
    return chestxray14.dataset_dir(c.data_dir, c.dataset_image_size, c.val_fraction, c.split_seed)

  def rebuild_hint(self) -> str:
    c = self.config
    return f'--manual_dir NIH_DIR --val_fraction {c.val_fraction} --split_seed {c.split_seed}'

  def described(self) -> str:
    c = self.config
    return (
      f'chestxray14 dataset at {c.dataset_image_size}px (val_fraction {c.val_fraction}, '
      f'split_seed {c.split_seed}) in data_dir {c.data_dir!r} (built there: '
      f'{_complete(os.path.join(c.data_dir, chestxray14.NAME)) or "none"})'
    )

  def other_fix(self) -> str:
    return (
      'or change the config to match a built one. A run trained elsewhere: pass '
      '--data_dir (evaluate, the notebook: CHEXNET_DATA_DIR) with the data_dir that '
      'holds its dataset here.'
    )

  def metadata(self) -> dict:
    metadata, c = super().metadata(), self.config
    built = (metadata.get('val_fraction'), metadata.get('split_seed'))
    if built != (c.val_fraction, c.split_seed):  # Belt and braces: the directory says it.
      raise DatasetError(
        f'{self.directory()} was built with val_fraction, split_seed = {built}, but '
        f'the config says ({c.val_fraction}, {c.split_seed}). Change the config '
        'or rebuild into another data_dir with --val_fraction/--split_seed.'
      )
    return metadata


@register('synthetic')
class SyntheticSource(Source):
  """input_pipeline/synthetic.py's learnable stand-in, made in memory."""

  def directory(self):
    return None

  def rebuild_hint(self) -> str:
    return ''

  def label_names(self) -> tuple[str, ...]:
    return labels_lib.LABELS

  def info(self) -> dict:
    return {
      'name': 'synthetic',
      'version': '1.0.0',
      'kind': 'synthetic',
      'dataset_image_size': self.config.dataset_image_size,
      'splits': synthetic.split_sizes(self.config),
      'train_positive_fraction': [synthetic.PRESENT_PROBABILITY] * labels_lib.NUM_CLASSES,
      'label_file': 'synthetic (input_pipeline/synthetic.py)',
      'protocol': 'synthetic: every image its own patient',
    }

  def source(self, split: str):
    return synthetic.source(self.config, split)

  def split_file(self):
    return None


# ---------------------------------------------------------------- public functions


def get_source(config, split: str):
  """Random-access source of `split` (dicts like the records)."""
  return for_config(config).source(split)


def get_label_names(config) -> tuple[str, ...]:
  """The dataset's label names, in the order of its label vectors."""
  return for_config(config).label_names()


def get_dataset_info(config) -> dict:
  """Source.info(); DatasetError if the dataset is missing, or built at another size
  or with another validation cut."""
  return for_config(config).info()


def split_file(config) -> str | None:
  """The dataset's split.json (image names per split, seed, fraction), or None for
  synthetic data. The trainer copies it beside every run."""
  return for_config(config).split_file()


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
    if died := workers.died_error(config, error):  # A grain worker, e.g. /dev/shm full.
      raise died from None
    source = for_config(config)
    if 'Corrupted' not in str(error) or source.directory() is None:
      raise
    pattern = os.path.join(source.directory(), f'*-{split}.array_record*')
    bad = [os.path.basename(p) for p in sorted(glob.glob(pattern)) if not _shard_is_readable(p)]
    raise DatasetError(
      f'Corrupt records in {", ".join(bad) or "a shard of the " + split + " split"} '
      f'in {source.directory()}. Delete that directory and rebuild it: python -m '
      f'input_pipeline.build {source.rebuild_hint()} --data_dir {config.data_dir} '
      f'--image_size {config.dataset_image_size}'
    ) from None


def labels_of(example: dict) -> np.ndarray:
  """float32 [C]: the example's labels, -1 where its label_mask says unknown
  (CheXpert's uncertain under U-Ignore); the loss and the metrics leave those out."""
  labels = np.asarray(example['labels'], np.float32)
  if 'label_mask' in example:
    labels = np.where(np.asarray(example['label_mask']) > 0, labels, np.float32(-1))
  return labels


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def record_metadata(example: dict) -> dict:
  """One record's identifiers and annotations (all but the image), plain Python."""
  boxes = example['boxes']
  # Records built before schema 2 have no 'patient': their number is all there is.
  patient = example['patient'] if 'patient' in example else example['patient_id']
  return {
    'image_name': _text(example['image_name']),
    'patient': _text(patient),
    'patient_recorded': 'patient' in example,  # False: 'patient' is the builder's number.
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
  source = get_source(config, split)
  return tuple(record_metadata(source[i]) for i in range(len(source)))


def split_metadata(config, split: str) -> list[dict]:
  """Per example of `split`, indexed like batches' 'index': record_metadata's fields:
  image_name (the path relative to the image root), patient (the dataset's own ID),
  patient_id, age, sex, view_position, follow_up, labels (float32[C]) and boxes
  ([{'label', 'bbox': [x, y, w, h] in source pixels}])."""
  return list(_cached_metadata(tuple(config[f] for f in _SOURCE_FIELDS), split))
