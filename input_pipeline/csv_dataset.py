"""Your own labelled chest X-rays: any CSV of image paths and label columns -> a dataset.

  python -m input_pipeline.build --csv FILE --image_root DIR --labels A,B,C \\
      --patient_column COL --name NAME --data_dir D --image_size S
      [--path_column path --split_column COL --val_fraction F --test_fraction F
       --split_seed N --format generic|chexpert --uncertainty ignore|zeros|ones
       --frontal_only --skip_bad --overwrite]

Images (PNG, JPEG or DICOM) are named by a column (default `path`) relative to
--image_root. Label columns hold 1 or 0 (CheXpert's format also -1 and blank,
input_pipeline.chexpert). Splits: a split column's train/validation/test as given,
else cut BY PATIENT (--val_fraction, --test_fraction, --split_seed). Without a
patient column the build refuses unless --no_patient_column_images_are_independent,
and then warns that the split may leak.

The same guarantees as the NIH builder: every input is checked before anything is
written and every bad row or file is named in one error (--skip_bad leaves them out
and counts them in the metadata); the dataset appears in D/NAME/<S>px/1.0.0 only when
complete, with split.json beside it. Its metadata holds the label names (the
trainer's head, evaluate, predict and the notebook use them) and a fingerprint of
the inputs: rebuilding with other inputs is refused unless --overwrite.
"""

import csv
import dataclasses
import inspect
import itertools
import json
import logging
import multiprocessing
import os
import re
import types

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from input_pipeline import chestxray14
from input_pipeline import chexpert
from input_pipeline import dicom
from input_pipeline import fingerprints
from input_pipeline import images
from input_pipeline import labels as labels_lib
from input_pipeline import nih

VERSION = '1.0.0'
SPLITS = ('train', 'validation', 'test')
SPLIT_FILE = 'split.json'
FORMATS = ('generic', 'chexpert')
RESERVED_NAMES = ('chestxray14', 'synthetic')
_NAME = re.compile(r'[a-z][a-z0-9_]*')
_SPLIT_VALUES = {
  'train': 'train',
  'training': 'train',
  'validation': 'validation',
  'valid': 'validation',
  'val': 'validation',
  'test': 'test',
}
_WINDOW = 512
_SKIPPED_KEPT = 100  # Skipped inputs named in the metadata; the rest are counted.

InvalidInputError = nih.InvalidInputError
Problem = nih.Problem


@dataclasses.dataclass(frozen=True)
class Spec:
  """What to read and how: the build's inputs, all of which the fingerprint covers."""

  csv_paths: tuple[str, ...]
  image_root: str
  labels: tuple[str, ...] = ()
  path_column: str = 'path'
  patient_column: str = ''
  split_column: str = ''
  images_are_independent: bool = False
  format: str = 'generic'
  uncertainty: str = 'ignore'
  frontal_only: bool = False
  val_fraction: float = 0.1
  test_fraction: float = 0.2
  split_seed: int = 0

  def resolved(self) -> 'Spec':
    """CheXpert's preset: its columns, observations and splits unless given."""
    if self.format != 'chexpert':
      return self
    return dataclasses.replace(
      self,
      labels=self.labels or chexpert.OBSERVATIONS,
      path_column=chexpert.PATH_COLUMN if self.path_column == 'path' else self.path_column,
    )


@dataclasses.dataclass(frozen=True)
class Row:
  """One usable CSV row."""

  image: str  # The path as the CSV writes it (relative to image_root).
  patient: str
  labels: np.ndarray  # uint8 [C]
  mask: np.ndarray  # uint8 [C]: 0 where the label is unknown (U-Ignore).
  split: str  # '' when the split is cut by patient.
  sex: str = ''
  age: int = 0
  view: str = ''


@dataclasses.dataclass
class Plan:
  splits: dict[str, list[str]]
  rows: dict[str, Row]
  patient_index: dict[str, int]
  skipped: dict[str, str]
  split_by: str
  fingerprint: str
  warnings: list[str]


# ---------------------------------------------------------------- reading the CSV


def _open_csv(path: str):
  # utf-8-sig: Excel writes a byte-order mark, which would glue itself to the
  # first column's name.
  return open(path, encoding='utf-8-sig', newline='')


def _relative_problem(rel: str) -> str:
  if not rel:
    return 'empty image path'
  if os.path.isabs(rel) or rel.startswith(('/', '\\')) or re.match(r'^[A-Za-z]:', rel):
    return f'image path {rel!r} is absolute; paths must be relative to --image_root'
  parts = re.split(r'[\\/]', rel)
  if '..' in parts:
    return f'image path {rel!r} goes outside --image_root (".."); paths must stay inside it'
  return ''


def _header_problems(path, header, spec) -> list[str]:
  needed = [spec.path_column, *spec.labels]
  if spec.patient_column:
    needed.append(spec.patient_column)
  if spec.split_column:
    needed.append(spec.split_column)
  if spec.format == 'chexpert' and spec.frontal_only:
    needed.append(chexpert.FRONTAL_COLUMN)
  missing = [c for c in needed if c not in header]
  if not missing:
    return []
  return [
    f'{path} line 1: no column {", ".join(map(repr, missing))}; the header has '
    f'{header}. Name the columns with --path_column, --labels, --patient_column '
    'and --split_column.'
  ]


def _parse_row(row: dict, spec: Spec) -> Row:
  """One CSV row -> Row; ValueError naming the field that is wrong."""
  rel = (row.get(spec.path_column) or '').strip()
  if why := _relative_problem(rel):
    raise ValueError(why)
  values = [(row.get(name) or '') for name in spec.labels]
  if spec.format == 'chexpert':
    try:
      labels, mask = chexpert.encode(values, spec.uncertainty)
    except ValueError:
      bad = next(n for n, v in zip(spec.labels, values) if not _is_chexpert_value(v))
      raise ValueError(
        f'column {bad!r} holds {row.get(bad)!r}; CheXpert label columns hold 1, 0, -1 or blank'
      ) from None
  else:
    bad = [n for n, v in zip(spec.labels, values) if v.strip() not in ('0', '1', '0.0', '1.0')]
    if bad:
      raise ValueError(
        f'column {bad[0]!r} holds {row.get(bad[0])!r}; label columns hold '
        '1 or 0 (CheXpert-style -1/blank: --format chexpert)'
      )
    labels = np.array([int(float(v)) for v in values], np.uint8)
    mask = np.ones(len(values), np.uint8)
  if spec.patient_column:
    patient = (row.get(spec.patient_column) or '').strip()
    if not patient:
      raise ValueError(f'empty patient column {spec.patient_column!r}')
  elif spec.format == 'chexpert':
    patient = chexpert.patient_of(rel)
    if not patient:
      raise ValueError(f'path {rel!r} names no patientNNNNN directory')
  else:
    patient = rel  # Each image its own patient (the user said they are independent).
  split = ''
  if spec.split_column:
    text = (row.get(spec.split_column) or '').strip().lower()
    if text not in _SPLIT_VALUES:
      raise ValueError(
        f'split column {spec.split_column!r} holds {text!r}; use train, validation or test'
      )
    split = _SPLIT_VALUES[text]
  elif spec.format == 'chexpert':
    split = chexpert.split_of(rel)
  sex, age, view = '', 0, ''
  if spec.format == 'chexpert':
    sex = (row.get(chexpert.SEX_COLUMN) or '').strip()
    age_text = (row.get(chexpert.AGE_COLUMN) or '').strip()
    age = int(float(age_text)) if age_text.replace('.', '', 1).isdigit() else 0
    view = (row.get(chexpert.VIEW_COLUMN) or '').strip()
  return Row(rel, patient, labels, mask, split, sex, age, view)


def _is_chexpert_value(text: str) -> bool:
  try:
    chexpert.parse_value(text)
    return True
  except ValueError:
    return False


def read_rows(spec: Spec) -> tuple[dict[str, Row], list[Problem], int]:
  """Reads every CSV: (rows by image path, problems, rows left out as lateral)."""
  rows, problems, laterals = {}, [], 0
  for path in spec.csv_paths:
    try:
      f = _open_csv(path)
    except OSError as e:
      problems.append(Problem('', f'{path}: cannot be opened ({e.strerror}); check --csv.'))
      continue
    with f:
      try:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        if header_problems := _header_problems(path, header, spec):
          problems.extend(Problem('', m) for m in header_problems)
          continue
        for line, row in enumerate(reader, start=2):
          rel = (row.get(spec.path_column) or '').strip()
          where = f'{path} line {line} ({rel or "no path"})'
          if (
            spec.format == 'chexpert'
            and spec.frontal_only
            and (row.get(chexpert.FRONTAL_COLUMN) or '').strip() != 'Frontal'
          ):
            laterals += 1
            continue
          try:
            parsed = _parse_row(row, spec)
          except ValueError as e:
            problems.append(Problem(rel or f'{path}:{line}', f'{where}: {e}'))
            continue
          if rel in rows:
            problems.append(Problem(rel, f'{where}: {rel} appears twice'))
            continue
          rows[rel] = parsed
      except UnicodeDecodeError as e:
        problems.append(Problem('', f'{path}: not UTF-8 text ({e}); save the CSV as UTF-8.'))
  return rows, problems, laterals


# ---------------------------------------------------------------- images


def _check_image(task) -> tuple[str, str, int]:
  rel, path = task
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    return rel, f'{path}: image not found (paths are relative to --image_root)', -1
  except OSError as e:
    return rel, f'{path}: cannot be read ({e.strerror})', -1
  why = dicom.problem(data) if dicom.is_dicom(data) else nih.image_problem(data)
  return rel, f'{path}: {why}' if why else '', len(data)


def scan_images(spec: Spec, names: list[str], num_workers: int):
  """Checks every image (in parallel): (problems, sizes by name)."""
  problems, sizes = [], {}
  tasks = [(n, os.path.join(spec.image_root, n)) for n in names]
  with multiprocessing.Pool(num_workers) as pool:
    for rel, why, size in tqdm.tqdm(
      pool.imap(_check_image, tasks, chunksize=16),
      total=len(tasks),
      desc='Checking images',
      unit='file',
    ):
      if why:
        problems.append(Problem(rel, why))
      sizes[rel] = size
  return problems, sizes


# ---------------------------------------------------------------- splits


def patient_split(names, rows, val_fraction, test_fraction, seed):
  """(train, validation, test) names, cut by patient, reproducibly."""
  for label, value in (('val_fraction', val_fraction), ('test_fraction', test_fraction)):
    if not 0.0 <= value < 1.0:
      raise ValueError(f'--{label} must be in [0, 1), got {value}')
  if val_fraction + test_fraction >= 1.0:
    raise ValueError(
      f'--val_fraction + --test_fraction = {val_fraction + test_fraction}'
      ' leaves no patients to train on; lower them'
    )
  patients = sorted({rows[n].patient for n in names})
  shuffled = np.random.default_rng(seed).permutation(len(patients))
  order = [patients[i] for i in shuffled]

  def count(fraction):
    return max(round(fraction * len(patients)), int(fraction > 0 and len(patients) > 2))

  num_test, num_val = count(test_fraction), count(val_fraction)
  test_p, val_p = set(order[:num_test]), set(order[num_test : num_test + num_val])
  split_of = {
    p: 'test' if p in test_p else 'validation' if p in val_p else 'train' for p in patients
  }
  splits = {s: [] for s in SPLITS}
  for n in names:
    splits[split_of[rows[n].patient]].append(n)
  return splits


def overlap_problems(splits, rows) -> list[Problem]:
  """A problem per patient with images in two splits (their labels would leak)."""
  where = {}
  for split, names in splits.items():
    for n in names:
      where.setdefault(rows[n].patient, {}).setdefault(split, n)
  return [
    Problem(
      '',
      f'patient {p!r} is in {" and ".join(sorted(s))} (e.g. '
      f"{', '.join(s[k] for k in sorted(s))}); a patient's images must all "
      'be in one split: fix the split column',
    )
    for p, s in sorted(where.items())
    if len(s) > 1
  ]


# ---------------------------------------------------------------- plan


def fingerprint(spec: Spec, image_size: int, sizes: dict[str, int]) -> str:
  """The CSVs' bytes, every option, and each image's name and size (the rule:
  input_pipeline/fingerprints.py, shared with the NIH builder)."""
  options = dataclasses.asdict(spec)
  options.pop('csv_paths'), options.pop('image_root')  # Where they are does not matter.
  return fingerprints.inputs_fingerprint(
    spec.csv_paths, {'options': options, 'image_size': image_size}, sizes
  )


def plan_build(spec: Spec, *, image_size: int, skip_bad: bool, num_workers: int) -> Plan:
  """Reads and checks ALL inputs, then splits; raises InvalidInputError listing every
  problem before anything is written."""
  spec = spec.resolved()
  where = ', '.join(spec.csv_paths)
  if name_problems := labels_lib.check_names(list(spec.labels)):
    raise InvalidInputError([Problem('', f'--labels: {m}') for m in name_problems], where)
  if spec.format not in FORMATS:
    raise InvalidInputError(
      [Problem('', f'--format {spec.format!r} is not one of {FORMATS}')], where
    )
  if not (spec.patient_column or spec.format == 'chexpert' or spec.images_are_independent):
    raise InvalidInputError(
      [
        Problem(
          '',
          (
            'no --patient_column: images of one patient could land in two splits and leak '
            'labels. Name the column that identifies the patient, or pass '
            '--no_patient_column_images_are_independent if every image is of a different '
            'patient'
          ),
        )
      ],
      where,
    )
  warnings = []
  if not spec.patient_column and spec.format != 'chexpert':
    warnings.append(
      'No patient column: each image is treated as its own patient, so if '
      'a patient has several images the split may leak.'
    )
  rows, problems, laterals = read_rows(spec)
  if laterals:
    warnings.append(f'{laterals} lateral image(s) left out (--frontal_only).')
  if not any(p.image == '' for p in problems):
    image_problems, sizes = scan_images(spec, sorted(rows), num_workers)
    problems += image_problems
  else:
    sizes = {}
  fatal = [p for p in problems if not p.image or not skip_bad]
  if fatal:
    raise InvalidInputError(fatal if skip_bad else problems, where)
  skipped = {}
  for p in problems:
    skipped.setdefault(p.image, p.message)
  names = [n for n in sorted(rows) if n not in skipped]
  if not names:
    raise InvalidInputError([Problem('', 'no usable rows are left')], where)
  given = [n for n in names if rows[n].split]
  if given and len(given) != len(names):
    raise InvalidInputError(
      [
        Problem(
          '',
          f'{len(names) - len(given)} row(s) have no split '
          f'(e.g. {next(n for n in names if not rows[n].split)}); '
          'give every row one, or none',
        )
      ],
      where,
    )
  try:
    if given:
      splits = {s: [n for n in names if rows[n].split == s] for s in SPLITS}
      if spec.format == 'chexpert' and not splits['test'] and spec.test_fraction > 0:
        # CheXpert's public release has train and valid only: test is cut from train.
        cut = patient_split(splits['train'], rows, 0.0, spec.test_fraction, spec.split_seed)
        splits['train'], splits['test'] = cut['train'], cut['test']
      split_by = 'given' if not spec.format == 'chexpert' else 'given (CheXpert paths)'
    else:
      splits = patient_split(names, rows, spec.val_fraction, spec.test_fraction, spec.split_seed)
      split_by = 'patient' if spec.patient_column else 'image (no patient column)'
  except ValueError as e:
    raise InvalidInputError([Problem('', str(e))], where) from None
  if overlap := overlap_problems(splits, rows):
    raise InvalidInputError(overlap, where)
  if not splits['train']:
    raise InvalidInputError([Problem('', 'the train split is empty')], where)
  patients = sorted({rows[n].patient for n in names})
  return Plan(
    splits,
    rows,
    {p: i for i, p in enumerate(patients)},
    skipped,
    split_by,
    fingerprint(spec, image_size, sizes),
    warnings,
  )


# ---------------------------------------------------------------- the TFDS builder


def config_name(image_size: int) -> str:
  return f'{image_size}px'


def dataset_dir(data_dir: str, name: str, image_size: int) -> str:
  """Where a built dataset lives (records, dataset_info.json, split.json)."""
  return os.path.join(data_dir, name, config_name(image_size), VERSION)


def check_name(name: str) -> str:
  """'' if `name` can name a dataset, else why not."""
  if not _NAME.fullmatch(name or ''):
    return (
      f'--name {name!r}: use lower-case letters, digits and _, starting with a '
      'letter (it becomes a directory and --config.dataset)'
    )
  if name in RESERVED_NAMES:
    return f'--name {name!r} is taken by a built-in dataset; choose another'
  return ''


class CsvDataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A dataset built from a user's CSV; `builder_class(name)` gives it its name."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Raw uint8 images from a CSV of image paths and labels.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(inspect.getfile(CsvDataset))

  def __init__(
    self,
    *,
    plan: Plan,
    spec: Spec,
    image_size: int,
    skip_bad: bool = False,
    num_workers: int | None = None,
    **kwargs,
  ):
    self._plan, self._spec, self._skip_bad = plan, spec.resolved(), skip_bad
    self._num_workers = num_workers or os.cpu_count()
    config = tfds.core.BuilderConfig(
      name=config_name(image_size), description=f'{image_size}x{image_size} grey uint8'
    )
    self._image_size = image_size
    super().__init__(config=config, **kwargs)

  def _log_download_bytes(self):
    print(f'Converting {self.name}/{self.builder_config.name} into {self.data_dir}')

  def _log_download_done(self):
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    size, num = self._image_size, len(self._spec.labels)
    return self.dataset_info_from_configs(
      features=chestxray14.record_features(size, num, with_label_mask=True),
      metadata=tfds.core.MetadataDict(),
      description=f'Built from {", ".join(os.path.basename(p) for p in self._spec.csv_paths)}',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing downloads.
    self._record_split()
    return {s: self._generate_examples(s) for s in SPLITS if self._plan.splits[s]}

  def _record_split(self):
    plan, spec = self._plan, self._spec
    rows = plan.rows
    positives = {
      s: np.sum([rows[n].labels & rows[n].mask for n in names], axis=0, dtype=np.int64).tolist()
      for s, names in plan.splits.items()
      if names
    }
    known = {
      s: np.sum([rows[n].mask for n in names], axis=0, dtype=np.int64).tolist()
      for s, names in plan.splits.items()
      if names
    }
    skipped = dict(itertools.islice(sorted(plan.skipped.items()), _SKIPPED_KEPT))
    self.info.metadata.update(
      {
        'labels': list(spec.labels),
        'format': spec.format,
        'uncertainty': spec.uncertainty if spec.format == 'chexpert' else None,
        'frontal_only': spec.frontal_only,
        'split_by': plan.split_by,
        'val_fraction': spec.val_fraction,
        'test_fraction': spec.test_fraction,
        'split_seed': spec.split_seed,
        'image_size': self._image_size,
        'resample': images.RESAMPLE.name,
        'patients': {s: len({rows[n].patient for n in names}) for s, names in plan.splits.items()},
        'positives': positives,
        'known': known,
        'label_file': ', '.join(os.path.basename(p) for p in spec.csv_paths),
        'fingerprint': plan.fingerprint,
        'warnings': plan.warnings,
        'num_skipped': len(plan.skipped),
        'skipped': skipped,
      }
    )
    record = {
      'by': plan.split_by,
      'val_fraction': spec.val_fraction,
      'test_fraction': spec.test_fraction,
      'split_seed': spec.split_seed,
      'splits': plan.splits,
      'num_skipped': len(plan.skipped),
      'skipped': skipped,
    }
    (self.data_path / SPLIT_FILE).write_text(json.dumps(record, indent=1))

  def _generate_examples(self, split):
    names = self._plan.splits[split]
    tasks = ((n, os.path.join(self._spec.image_root, n), self._image_size) for n in names)
    with (
      multiprocessing.Pool(self._num_workers) as pool,
      tqdm.tqdm(total=len(names), desc=f'Converting {split}', unit='img') as progress,
    ):
      while window := list(itertools.islice(tasks, _WINDOW)):
        for name, image in pool.imap_unordered(_convert, window, chunksize=4):
          progress.update()
          yield name, self._example(name, image)

  def _example(self, name, image):
    row = self._plan.rows[name]
    return {
      'image': image,
      'labels': row.labels,
      'label_mask': row.mask,
      'image_name': name,
      'patient_id': self._plan.patient_index[row.patient],
      'age': row.age,
      'sex': row.sex,
      'view_position': row.view,
      'follow_up': 0,
      'boxes': {'label': np.zeros((0,), np.int32), 'bbox': np.zeros((0, 4), np.float32)},
    }


def _convert(task):
  name, path, size = task
  try:
    with open(path, 'rb') as f:
      return name, images.decode_and_resize(f.read(), size)
  except Exception as e:
    raise RuntimeError(
      f'{path}: cannot decode ({type(e).__name__}: {e}); the build was '
      'aborted and nothing was written.'
    ) from None


def builder_class(name: str):
  """A CsvDataset subclass named `name` (TFDS takes the directory from the class)."""
  return types.new_class(
    f'CsvDataset_{name}',
    (CsvDataset,),
    {'skip_registration': True},
    lambda ns: ns.update({'name': name, '__module__': __name__}),
  )


class _NoCustomConfigWarning(logging.Filter):
  def filter(self, record):
    return not record.getMessage().startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_NoCustomConfigWarning())


def built_fingerprint(data_dir: str, name: str, image_size: int) -> str | None:
  """The fingerprint of the dataset already there, None if there is none."""
  return fingerprints.built_fingerprint(dataset_dir(data_dir, name, image_size))


ExistingDatasetError = fingerprints.ExistingDatasetError


def build(
  spec: Spec,
  *,
  name: str,
  data_dir: str,
  image_size: int,
  skip_bad: bool = False,
  overwrite: bool = False,
  num_workers: int | None = None,
):
  """Builds data_dir/name/<S>px; returns (builder, what happened: 'built', 'rebuilt'
  or 'unchanged')."""
  if why := check_name(name):
    raise InvalidInputError([Problem('', why)], '--name')
  plan = plan_build(
    spec, image_size=image_size, skip_bad=skip_bad, num_workers=num_workers or os.cpu_count()
  )
  mode, outcome = fingerprints.reuse_or_rebuild(
    dataset_dir(data_dir, name, image_size),
    plan.fingerprint,
    overwrite,
    elsewhere='another --name or --data_dir',
  )
  builder = builder_class(name)(
    plan=plan,
    spec=spec,
    image_size=image_size,
    skip_bad=skip_bad,
    num_workers=num_workers,
    data_dir=data_dir,
    file_format='array_record',
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder, outcome
