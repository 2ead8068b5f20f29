"""The one records builder: a plan of rows, made by an adapter, -> a TFDS ArrayRecord dataset.

An adapter (nih.py for NIH ChestX-ray14, csv_dataset.py for any CSV, with chexpert.py
for CheXpert's format) reads and checks its inputs and returns a `Plan`: one `Row`
per image (where its bytes are, the dataset's own patient ID, labels with their
mask, boxes, and the split it was given, or '' to be cut by patient). Everything a
build does after that is here, once: the patient split, the leak check, the problem
report, the metadata schema, split.json, the conversion, and writing it all
atomically (TFDS writes into a temporary directory and renames it when complete).

  plan = records.make_plan(name=..., rows=..., ...)   # in the adapter
  builder, outcome = records.write(plan, data_dir)
"""

import dataclasses
import errno
import gzip
import io
import inspect
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
import time
import types
from typing import Iterator, NamedTuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from chexnet_jax import errors
from input_pipeline import fingerprints
from input_pipeline import images

VERSION = '1.0.0'
SPLITS = ('train', 'validation', 'test')
SPLIT_FILE = 'split.json'  # Written beside the records: the exact split used.
# Version 2 adds 'kind', 'labels' and 'known' for every dataset and the 'patient'
# string to every record; readers default what version 1 (no 'schema') lacks.
SCHEMA = 2
# Tasks handed to the pool at once. Pool.imap would drain the whole task generator
# (tarball bytes included) into memory; windows keep memory flat.
_WINDOW = 512
_SKIPPED_KEPT = 100  # Skipped inputs named in the metadata; the rest are counted.
# At most this many problems are listed; the rest are counted (a partial download
# can have 100,000 missing images: a list that long helps no one).
_SHOWN = 20


# ---------------------------------------------------------------- the problem report


class Problem(NamedTuple):
  """One bad input. `image` names the image it disqualifies ('' = fatal)."""

  image: str
  message: str

  def __str__(self):
    return self.message


def _hint(problems: list[Problem]) -> str:
  per_image = sum(1 for p in problems if p.image)
  general = len(problems) - per_image
  if general and per_image:
    hint = (
      f'{general} of them concern no single image and must be fixed; the other '
      f'{per_image} can be fixed, or left out with --skip_bad (they are then '
      'counted in the dataset metadata).'
    )
  elif general:
    hint = 'Fix them and build again (--skip_bad cannot leave these out).'
  else:
    hint = (
      'Fix or remove these inputs, or build with --skip_bad to leave them out '
      '(they are then listed in the dataset metadata).'
    )
  missing = sum(1 for p in problems if 'image not found' in p.message)
  if missing > _SHOWN:
    hint += (
      f' {missing:,} listed images are not on disk: to build from part of the '
      'data, give lists (or a CSV) naming only the images you have.'
    )
  return hint


class InvalidInputError(errors.UserValueError):
  """The inputs have problems; the message lists them (the first _SHOWN, then counts)
  and says which ones --skip_bad could leave out."""

  def __init__(self, problems, where: str):
    problems = list(problems)
    lines = '\n  '.join(str(p) for p in problems[:_SHOWN])
    if len(problems) > _SHOWN:
      lines += f'\n  ... and {len(problems) - _SHOWN:,} more'
    super().__init__(f'{len(problems)} problem(s) in {where}:\n  {lines}\n{_hint(problems)}')
    self.problems = problems


class MissingInputError(errors.UserValueError):
  """A required input file is absent; the message, one sentence, names it and the fix."""


def open_text(path: str):
  """A CSV or list as text, gzipped or not. utf-8-sig: Excel writes a byte-order mark,
  which would otherwise glue itself to the first column's name."""
  if path.endswith('.gz'):
    return io.TextIOWrapper(gzip.open(path), encoding='utf-8-sig', newline='')
  return open(path, encoding='utf-8-sig', newline='')


def triage(problems: list[Problem], skip_bad: bool, where: str) -> dict[str, str]:
  """Raises InvalidInputError on fatal problems (or on any, unless skip_bad); returns
  the images left out: name -> why."""
  fatal = [p for p in problems if not p.image or not skip_bad]
  if fatal:
    raise InvalidInputError(fatal if skip_bad else problems, where)
  skipped = {}
  for p in problems:
    skipped.setdefault(p.image, p.message)
  return skipped


# ---------------------------------------------------------------- rows and the plan


class ImageRef(NamedTuple):
  """Where an image's bytes are: a file, or a member of a .tar.gz; its size in bytes
  (for the build's fingerprint)."""

  path: str
  member: str = ''
  size: int = 0

  def read(self) -> bytes:
    if not self.member:
      with open(self.path, 'rb') as f:
        return f.read()
    with tarfile.open(self.path, 'r:gz') as tar:  # Slow: tests and one-offs only.
      return tar.extractfile(self.member).read()


def iter_tar_images(tar_path: str, suffix: str = '.png') -> Iterator[tuple[str, str, bytes]]:
  """Streams (file name, member name, bytes) of a .tar.gz's images, no extraction."""
  with tarfile.open(tar_path, 'r|gz') as tar:
    for member in tar:
      if member.isfile() and member.name.endswith(suffix):
        yield os.path.basename(member.name), member.name, tar.extractfile(member).read()


class Box(NamedTuple):
  """A labelled region: x, y, w, h in the source image's pixels."""

  label: int  # Index into the dataset's label names.
  bbox: tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Row:
  """One image of a plan, as its adapter read it."""

  image: str  # Its name in the records: the path relative to the image root.
  source: ImageRef
  patient: int | str  # The dataset's own patient ID (NIH's are integers).
  labels: np.ndarray  # uint8 [C]
  mask: np.ndarray | None = None  # uint8 [C], 0 where unknown; None: all known.
  split: str = ''  # 'train', 'validation' or 'test' as given; '' = cut by patient.
  boxes: tuple[Box, ...] = ()
  age: int = 0
  sex: str = ''
  view: str = ''
  follow_up: int = 0

  @property
  def known(self) -> np.ndarray:
    return np.ones_like(self.labels) if self.mask is None else self.mask


@dataclasses.dataclass
class Plan:
  """What a build writes, every input already read and checked."""

  kind: str  # The adapter: 'chestxray14', 'csv', 'chexpert', ...
  name: str  # The dataset's directory and --config.dataset.
  config_name: str  # '<S>px' (NIH: '<S>px_val<F>_seed<N>' for another cut).
  image_size: int
  labels: tuple[str, ...]
  with_mask: bool  # Records carry 'label_mask' (some labels may be unknown).
  rows: dict[str, Row]  # The kept images by name.
  splits: dict[str, list[str]]
  split_by: str
  settings: dict  # The adapter's: fractions, seed, label_file, protocol, inputs, ...
  skipped: dict[str, str]
  fingerprint: str
  warnings: list[str] = dataclasses.field(default_factory=list)
  description: str = ''


# ---------------------------------------------------------------- the patient split


def _count(fraction: float, num_patients: int, num_cuts: int) -> int:
  # At least one patient when asked for any and some remain to train on.
  return max(round(fraction * num_patients), int(fraction > 0 and num_patients > num_cuts))


def patient_split(
  names: list[str], patient_of, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
  """{'train', 'validation', 'test'}: `names` cut by patient (`patient_of[name]`),
  reproducibly: the sorted patients are permuted by `seed`; test takes the first,
  validation the next. ValueError naming the flag for bad fractions."""
  for flag, value in (('val_fraction', val_fraction), ('test_fraction', test_fraction)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f'--{flag} must be in [0, 1), got {value}')
  if val_fraction + test_fraction >= 1.0:
    raise ValueError(
      f'--val_fraction + --test_fraction = {val_fraction + test_fraction}'
      ' leaves no patients to train on; lower them'
    )
  patients = sorted({patient_of[n] for n in names})
  order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
  cuts = int(val_fraction > 0) + int(test_fraction > 0)
  num_test = _count(test_fraction, len(patients), cuts)
  num_val = _count(val_fraction, len(patients), cuts)
  test, val = set(order[:num_test]), set(order[num_test : num_test + num_val])
  splits = {s: [] for s in SPLITS}
  for n in names:
    p = patient_of[n]
    splits['test' if p in test else 'validation' if p in val else 'train'].append(n)
  return splits


def leak_problems(splits: dict[str, list[str]], patient_of, where: str, fix: str) -> list[Problem]:
  """One problem per pair of splits that share patients (their labels would leak)."""
  first = {}  # (split, patient) -> an image of it
  for split, names in splits.items():
    for n in names:
      first.setdefault((split, patient_of[n]), n)
  problems = []
  for a, b in itertools.combinations(sorted(splits), 2):
    shared = sorted({p for s, p in first if s == a} & {p for s, p in first if s == b})
    if shared:
      p = shared[0]
      problems.append(
        Problem(
          '',
          f'{where}: {len(shared)} patient(s) in both {a} and {b}, e.g. {shared[:10]} '
          f'(patient {p!r} is in {a} and {b}: {first[a, p]}, {first[b, p]}); the split '
          f"must be by patient, a patient's images all in one split: {fix}",
        )
      )
  return problems


def assign_splits(rows, seed, val_fraction, test_fraction, *, where, fix) -> dict:
  """Rows keep a given split; those with '' are cut by patient. InvalidInputError if
  a patient ends up in two splits or nothing is left to train on."""
  patient_of = {n: r.patient for n, r in rows.items()}
  given = {s: [n for n, r in rows.items() if r.split == s] for s in SPLITS}
  try:
    cut = patient_split(
      [n for n, r in rows.items() if not r.split], patient_of, val_fraction, test_fraction, seed
    )
  except ValueError as e:
    raise InvalidInputError([Problem('', str(e))], where) from None
  splits = {s: given[s] + cut[s] for s in SPLITS}
  if leaks := leak_problems(splits, patient_of, where, fix):
    raise InvalidInputError(leaks, where)
  if not splits['train']:
    raise InvalidInputError([Problem('', 'the train split is empty')], where)
  return splits


def make_plan(
  *,
  name: str,
  rows: dict[str, Row],
  labels: tuple[str, ...],
  image_size: int,
  val_fraction: float,
  test_fraction: float,
  split_seed: int,
  inputs: tuple[str, ...] = (),
  settings: dict | None = None,
  skipped: dict[str, str] | None = None,
) -> Plan:
  """A new adapter's plan: its checked rows split (given splits kept, the rest cut by
  patient) and fingerprinted (the `inputs` files' bytes, the settings, each image's
  name and size)."""
  splits = assign_splits(
    rows, split_seed, val_fraction, test_fraction, where=name, fix='fix the given splits'
  )
  settings = {
    'val_fraction': val_fraction,
    'test_fraction': test_fraction,
    'split_seed': split_seed,
    'label_file': ', '.join(os.path.basename(p) for p in inputs) or 'not recorded',
    'protocol': f'given splits kept; the rest cut by patient (seed {split_seed})',
    **(settings or {}),
  }
  sizes = {n: r.source.size for n, r in rows.items()}
  return Plan(
    kind=name,
    name=name,
    config_name=f'{image_size}px',
    image_size=image_size,
    labels=tuple(labels),
    with_mask=any(r.mask is not None for r in rows.values()),
    rows=rows,
    splits=splits,
    split_by='patient',
    settings=settings,
    skipped=skipped or {},
    fingerprint=fingerprints.inputs_fingerprint(
      inputs, {**settings, 'name': name, 'image_size': image_size}, sizes
    ),
  )


# ---------------------------------------------------------------- metadata schema


def _per_split(plan: Plan, value) -> dict:
  return {
    s: np.sum([value(plan.rows[n]) for n in names], axis=0, dtype=np.int64).tolist()
    for s, names in plan.splits.items()
    if names
  }


def skipped_kept(skipped: dict[str, str]) -> dict[str, str]:
  return dict(itertools.islice(sorted(skipped.items()), _SKIPPED_KEPT))


def metadata(plan: Plan) -> dict:
  """The metadata.json of every dataset this project builds (one schema)."""
  return {
    'schema': SCHEMA,
    'kind': plan.kind,
    'labels': list(plan.labels),
    'image_size': plan.image_size,
    'resample': images.RESAMPLE.name,
    'split_by': plan.split_by,
    **plan.settings,
    'patients': {s: len({plan.rows[n].patient for n in names}) for s, names in plan.splits.items()},
    # Positives and known entries per label and split: the trainer's weighted BCE.
    'positives': _per_split(plan, lambda r: r.labels & r.known),
    'known': _per_split(plan, lambda r: r.known),
    'fingerprint': plan.fingerprint,
    'warnings': plan.warnings,
    'num_skipped': len(plan.skipped),
    'skipped': skipped_kept(plan.skipped),
  }


def split_record(plan: Plan) -> dict:
  """split.json: the image names of each split, and how they were cut."""
  keys = ('val_fraction', 'test_fraction', 'split_seed')
  return {
    'by': plan.split_by,
    **{k: plan.settings[k] for k in keys if k in plan.settings},
    'splits': plan.splits,
    'num_skipped': len(plan.skipped),
    'skipped': skipped_kept(plan.skipped),
  }


def record_features(size: int, num_labels: int, with_label_mask: bool = False):
  """The record of every dataset this project builds."""
  labels = {'labels': tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8)}
  if with_label_mask:  # 0 where a label is unknown (CheXpert's uncertain under U-Ignore).
    labels['label_mask'] = tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8)
  return tfds.features.FeaturesDict(
    {
      # Raw bytes, no PNG: decoding PNG in the input pipeline is ~45x slower.
      # encoding='bytes': without it TFDS stores uint8 as an int64 list, ~10x
      # slower to parse without TensorFlow.
      'image': tfds.features.Tensor(
        shape=(size, size, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
      ),
      **labels,
      'image_name': tfds.features.Text(),  # The path relative to the image root.
      'patient': tfds.features.Text(),  # The dataset's own patient ID.
      'patient_id': tfds.features.Scalar(dtype=np.int32),  # NIH's, else a number.
      'age': tfds.features.Scalar(dtype=np.int32),
      'sex': tfds.features.Text(),
      'view_position': tfds.features.Text(),
      'follow_up': tfds.features.Scalar(dtype=np.int32),
      # Original x, y, w, h in source pixels; label is an index into the label names.
      'boxes': tfds.features.Sequence(
        {
          'label': tfds.features.Scalar(dtype=np.int32),
          'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
        }
      ),
    }
  )


def patient_numbers(rows: dict[str, Row]) -> dict:
  """Patient -> the int32 `patient_id`: NIH's own integer, else its rank."""
  patients = sorted({r.patient for r in rows.values()})
  if all(isinstance(p, int) for p in patients):
    return {p: p for p in patients}
  return {p: i for i, p in enumerate(patients)}


def _example(row: Row, image: np.ndarray, patient_id: int, with_mask: bool) -> dict:
  example = {
    'image': image,
    'labels': row.labels,
    'image_name': row.image,
    'patient': str(row.patient),
    'patient_id': patient_id,
    'age': row.age,
    'sex': row.sex,
    'view_position': row.view,
    'follow_up': row.follow_up,
    'boxes': {
      'label': np.array([b.label for b in row.boxes], np.int32),
      'bbox': np.array([b.bbox for b in row.boxes], np.float32).reshape(-1, 4),
    },
  }
  if with_mask:
    example['label_mask'] = row.known
  return example


# ---------------------------------------------------------------- conversion


def _conversion_tasks(rows: dict[str, Row], names: list[str], size: int):
  """(name, path, bytes, size): files are read by the workers; tarballs are streamed
  once each, here, in bounded windows so memory stays flat."""
  by_tar = {}
  for name in names:
    ref = rows[name].source
    if ref.member:
      by_tar.setdefault(ref.path, {})[ref.member] = name
    else:
      yield name, ref.path, b'', size
  for tar_path, wanted in sorted(by_tar.items()):
    members = ((wanted[m], d) for _, m, d in iter_tar_images(tar_path, '') if m in wanted)
    yield from ((n, '', d, size) for n, d in members)


def _convert(task) -> tuple[str, np.ndarray]:
  name, path, data, size = task
  try:
    if path:
      with open(path, 'rb') as f:
        data = f.read()
    return name, images.decode_and_resize(data, size)
  except Exception as e:
    # Passed the pre-check but fails to decode (e.g. corrupt pixel data): stop
    # the build; TFDS removes its temporary dir, so nothing reads as prepared.
    raise RuntimeError(
      f'{path or name}: cannot decode ({type(e).__name__}: {e}); '
      'the build was aborted and nothing was written.'
    ) from None


class _NoCustomConfigWarning(logging.Filter):
  """Any size but NIH's predefined ones is a 'custom data configuration' to TFDS,
  which warns about it; here it is the ordinary way to ask for a size."""

  def filter(self, record):
    return not record.getMessage().startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_NoCustomConfigWarning())


# ---------------------------------------------------------------- the TFDS builder


class Records(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a Plan. `builder_class(name)` names one; chestxray14.Chestxray14 is NIH's."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Raw uint8 images, patient-wise splits, boxes.'}
  # What a builder made without a plan (to read its info) describes.
  LABELS: tuple[str, ...] = ()
  WITH_MASK = True
  HOMEPAGE = CITATION = None

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's own lookup needs the `importlib_resources` backport for builders that
    # live in a package; the file path is all it needs (for checksums.tsv).
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, plan: Plan | None = None, num_workers: int | None = None, **kwargs):
    self._plan = plan
    self._num_workers = num_workers or os.cpu_count()
    if plan is not None and 'config' not in kwargs:
      kwargs['config'] = tfds.core.BuilderConfig(
        name=plan.config_name, description=f'{plan.image_size}x{plan.image_size} grey uint8'
      )
    super().__init__(**kwargs)

  def _log_download_bytes(self):
    # TFDS's line ('Downloading and preparing dataset Unknown size') is wrong
    # here: nothing downloads, the inputs are converted.
    print(f'Converting {self.name}/{self.builder_config.name} into {self.data_dir}')

  def _log_download_done(self):
    pass  # input_pipeline.build prints a summary of what it wrote.

  def _info(self) -> tfds.core.DatasetInfo:
    plan = self._plan
    size = plan.image_size if plan else self.builder_config.image_size
    labels, with_mask = (plan.labels, plan.with_mask) if plan else (self.LABELS, self.WITH_MASK)
    return self.dataset_info_from_configs(
      features=record_features(size, len(labels), with_mask),
      metadata=tfds.core.MetadataDict(),
      description=plan.description if plan else None,
      homepage=self.HOMEPAGE,
      citation=self.CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing downloads: the plan says what to convert.
    if self._plan is None:
      raise RuntimeError('build datasets with python -m input_pipeline.build')
    self.info.metadata.update(metadata(self._plan))
    # self.data_path is TFDS's temporary dir here: split.json appears atomically too.
    (self.data_path / SPLIT_FILE).write_text(json.dumps(split_record(self._plan), indent=1))
    # TFDS cannot write an empty split (e.g. val_fraction=0): such a split is absent.
    return {s: self._generate_examples(s) for s in SPLITS if self._plan.splits[s]}

  def _generate_examples(self, split: str):
    plan = self._plan
    names, numbers = plan.splits[split], patient_numbers(plan.rows)
    tasks = _conversion_tasks(plan.rows, names, plan.image_size)
    with (
      multiprocessing.Pool(self._num_workers) as pool,
      tqdm.tqdm(total=len(names), desc=f'Converting {split}', unit='img') as progress,
    ):
      while window := list(itertools.islice(tasks, _WINDOW)):
        for name, image in pool.imap_unordered(_convert, window, chunksize=4):
          progress.update()
          row = plan.rows[name]
          yield name, _example(row, image, numbers[row.patient], plan.with_mask)


def builder_class(name: str):
  """A Records subclass named `name` (TFDS takes the directory from the class)."""
  return types.new_class(
    f'Records_{name}',
    (Records,),
    {'skip_registration': True},
    lambda ns: ns.update({'name': name, '__module__': __name__}),
  )


def dataset_dir(data_dir: str, name: str, config_name: str) -> str:
  """Where a built dataset lives (records, dataset_info.json, split.json)."""
  return os.path.join(data_dir, name, config_name, VERSION)


def write(
  plan: Plan,
  data_dir: str,
  *,
  overwrite: bool = False,
  num_workers: int | None = None,
  builder=None,
  elsewhere: str = 'another --data_dir',
):
  """Writes `plan` into data_dir/<name>/<config>/1.0.0: (builder, outcome: 'built',
  'unchanged' or 'rebuilt'). A dataset built there from other inputs raises
  fingerprints.ExistingDatasetError unless `overwrite`. `builder`: the TFDS builder
  class (default: one named plan.name)."""
  mode, outcome = fingerprints.reuse_or_rebuild(
    dataset_dir(data_dir, plan.name, plan.config_name),
    plan.fingerprint,
    overwrite,
    elsewhere=elsewhere,
  )
  builder = (builder or builder_class(plan.name))(
    plan=plan, num_workers=num_workers, data_dir=data_dir, file_format='array_record'
  )
  target = dataset_dir(data_dir, plan.name, plan.config_name)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  except (OSError, RuntimeError) as error:  # TFDS removes its temporary folder.
    if why := _out_of_space(error):
      raise BuildError(
        f'{data_dir} ran out of space while the dataset was written ({why}); the '
        'partial build was removed: free space or choose another --data_dir, then '
        'build again.'
      ) from None
    if isinstance(error, FileExistsError) and os.path.isdir(target):
      raise BuildError(
        f'{target} was written by another build of the same dataset while this one '
        'ran: another build of it finished first and its dataset is kept; run this '
        'build again to check that it is the one you meant (it says unchanged if so).'
      ) from None
    raise
  _remove_interrupted_builds(os.path.dirname(target))
  return builder, outcome


class BuildError(errors.UserRuntimeError):
  """The build could not finish: out of space, or a concurrent build of the same dataset."""


_FULL = ('No space left on device', 'Disk quota exceeded', 'File too large')


def _out_of_space(error) -> str:
  """The words of `error` that say the disk (or quota, or file size limit) is full."""
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
    return error.strerror
  return next((words for words in _FULL if words in str(error)), '')


# A build's temporary folder untouched this long is an interrupted build's (a
# build in progress writes into its own every few seconds).
_ABANDONED_SECONDS = 600


def _remove_interrupted_builds(config_dir: str) -> None:
  """The incomplete.* folders that builds killed before their end left beside the
  dataset (TFDS removes its own only when the build raises)."""
  for name in os.listdir(config_dir):
    path = os.path.join(config_dir, name)
    if name.startswith('incomplete.') and os.path.isdir(path) and _untouched_for(path):
      shutil.rmtree(path, ignore_errors=True)
      logging.info('Removed %s, left by an interrupted build.', path)


def _untouched_for(path: str, seconds: float = _ABANDONED_SECONDS) -> bool:
  newest = os.stat(path).st_mtime
  for root, _, names in os.walk(path):
    for name in names:
      newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
  return time.time() - newest > seconds
