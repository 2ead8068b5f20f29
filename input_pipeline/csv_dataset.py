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
import multiprocessing
import os
import re

import numpy as np
import tqdm

from input_pipeline import chexpert
from input_pipeline import fingerprints
from input_pipeline import images
from input_pipeline import labels as labels_lib
from input_pipeline import records
from input_pipeline.records import InvalidInputError, Problem

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
DEFAULT_TEST_FRACTION = 0.2  # Of the patients, when no column or path gives the split.


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
  test_fraction: float = DEFAULT_TEST_FRACTION
  split_seed: int = 0

  def resolved(self) -> 'Spec':
    """The format's columns and labels where not given."""
    return FORMATS[self.format].resolved(self)


class GenericFormat:
  """Label columns of 1 or 0; the patient and split come from columns only."""

  name, kind = 'generic', 'csv'
  split_by_paths = 'given'
  patients_from_paths = has_uncertain = False

  def resolved(self, spec):
    return spec

  def required_columns(self, spec) -> list[str]:
    return []

  def left_out(self, row: dict, spec) -> bool:
    return False

  def labels(self, row: dict, spec) -> tuple[np.ndarray, None]:
    values = [(row.get(name) or '').strip() for name in spec.labels]
    bad = [n for n, v in zip(spec.labels, values) if v not in ('0', '1', '0.0', '1.0')]
    if bad:
      raise ValueError(
        f'column {bad[0]!r} holds {row.get(bad[0])!r}; label columns hold '
        '1 or 0 (CheXpert-style -1/blank: --format chexpert)'
      )
    return np.array([int(float(v)) for v in values], np.uint8), None

  def patient(self, rel: str) -> str:
    return rel  # Each image its own patient (the user said they are independent).

  def split(self, rel: str) -> str:
    return ''

  def extras(self, row: dict) -> dict:
    return {}

  def protocol(self, spec, split_by: str) -> str:
    if split_by == 'given':
      return f'split column {spec.split_column!r} as given'
    return (
      f'cut by {split_by}: validation {spec.val_fraction:g}, test {spec.test_fraction:g} '
      f'of the patients, seed {spec.split_seed}'
    )


FORMATS = {'generic': GenericFormat(), 'chexpert': chexpert.FORMAT}


# ---------------------------------------------------------------- reading the CSV


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
  needed = [spec.path_column, *spec.labels, *FORMATS[spec.format].required_columns(spec)]
  needed += [c for c in (spec.patient_column, spec.split_column) if c]
  missing = [c for c in needed if c not in header]
  if not missing:
    return []
  return [
    f'{path} line 1: no column {", ".join(map(repr, missing))}; the header has '
    f'{header}. Name the columns with --path_column, --labels, --patient_column '
    'and --split_column.'
  ]


def _given_split(row: dict, spec: Spec, rel: str) -> str:
  if not spec.split_column:
    return FORMATS[spec.format].split(rel)
  text = (row.get(spec.split_column) or '').strip().lower()
  if text not in _SPLIT_VALUES:
    raise ValueError(
      f'split column {spec.split_column!r} holds {text!r}; use train, validation or test'
    )
  return _SPLIT_VALUES[text]


def _patient(row: dict, spec: Spec, rel: str) -> str:
  if not spec.patient_column:
    return FORMATS[spec.format].patient(rel)
  if not (patient := (row.get(spec.patient_column) or '').strip()):
    raise ValueError(f'empty patient column {spec.patient_column!r}')
  return patient


def _parse_row(row: dict, spec: Spec) -> records.Row:
  """One CSV row -> Row (its size still unknown); ValueError naming the wrong field."""
  rel = (row.get(spec.path_column) or '').strip()
  if why := _relative_problem(rel):
    raise ValueError(why)
  fmt = FORMATS[spec.format]
  labels, mask = fmt.labels(row, spec)
  return records.Row(
    image=rel,
    source=records.ImageRef(os.path.join(spec.image_root, rel)),
    patient=_patient(row, spec, rel),
    labels=labels,
    mask=mask,
    split=_given_split(row, spec, rel),
    **fmt.extras(row),
  )


def _read_csv(path: str, spec: Spec, rows: dict, problems: list) -> int:
  """Adds one CSV's rows and problems; returns the rows left out as lateral."""
  laterals = 0
  with records.open_text(path) as f:
    reader = csv.DictReader(f)
    reader.fieldnames = header = [h.strip() for h in (reader.fieldnames or [])]
    if header_problems := _header_problems(path, header, spec):
      problems.extend(Problem('', m) for m in header_problems)
      return 0
    first_line = {}
    for line, row in enumerate(reader, start=2):
      rel = (row.get(spec.path_column) or '').strip()
      where = f'{path} line {line} ({rel or "no path"})'
      if FORMATS[spec.format].left_out(row, spec):
        laterals += 1
        continue
      try:
        parsed = _parse_row(row, spec)
      except ValueError as e:
        problems.append(Problem(rel or f'{path}:{line}', f'{where}: {e}'))
        continue
      if rel in rows:  # Which row's labels hold is unknowable: the image, both rows, is bad.
        also = first_line.get(rel, 'in an earlier CSV')
        problems.append(Problem(rel, f'{where}: {rel} appears twice (also {also}): both rows'))
        continue
      rows[rel], first_line[rel] = parsed, f'line {line}'
  return laterals


def read_rows(spec: Spec) -> tuple[dict[str, records.Row], list[Problem], int]:
  """Reads every CSV: (rows by image path, problems, rows left out as lateral)."""
  rows, problems, laterals = {}, [], 0
  for path in spec.csv_paths:
    try:
      laterals += _read_csv(path, spec, rows, problems)
    except OSError as e:
      problems.append(Problem('', f'{path}: cannot be opened ({e.strerror}); check --csv.'))
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
  why = images.problem(data)
  return rel, f'{path}: {why}' if why else '', len(data)


def scan_images(rows: dict[str, records.Row], num_workers: int):
  """Checks every image (in parallel): (problems, sizes by name)."""
  problems, sizes = [], {}
  tasks = [(n, rows[n].source.path) for n in sorted(rows)]
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


# ---------------------------------------------------------------- plan


def fingerprint(spec: Spec, image_size: int, sizes: dict[str, int]) -> str:
  """The CSVs' bytes, every option, and each image's name and size (the rule:
  input_pipeline/fingerprints.py, shared with the NIH builder)."""
  options = dataclasses.asdict(spec)
  options.pop('csv_paths'), options.pop('image_root')  # Where they are does not matter.
  return fingerprints.inputs_fingerprint(
    spec.csv_paths, {'options': options, 'image_size': image_size}, sizes
  )


def _spec_problems(spec: Spec) -> list[Problem]:
  problems = [Problem('', f'--labels: {m}') for m in labels_lib.check_names(list(spec.labels))]
  if spec.format not in FORMATS:
    problems.append(Problem('', f'--format {spec.format!r} is not one of {tuple(FORMATS)}'))
  elif not (_has_patients(spec) or spec.images_are_independent):
    problems.append(
      Problem(
        '',
        'no --patient_column: images of one patient could land in two splits and leak '
        'labels. Name the column that identifies the patient, or pass '
        '--no_patient_column_images_are_independent if every image is of a different '
        'patient',
      )
    )
  return problems


def _has_patients(spec: Spec) -> bool:
  """A column or the paths name each image's patient."""
  return bool(spec.patient_column) or FORMATS[spec.format].patients_from_paths


def _split_by(spec: Spec, rows: dict[str, records.Row]) -> str:
  if any(r.split for r in rows.values()):
    return 'given' if spec.split_column else FORMATS[spec.format].split_by_paths
  return 'patient' if _has_patients(spec) else 'image (no patient column)'


def _checked_rows(spec: Spec, skip_bad: bool, num_workers: int, warnings: list):
  """Every row read and every image checked: (kept rows with their sizes, skipped)."""
  where = ', '.join(spec.csv_paths)
  rows, problems, laterals = read_rows(spec)
  if laterals:
    warnings.append(f'{laterals} lateral image(s) left out (--frontal_only).')
  sizes = {}
  if not any(p.image == '' for p in problems):
    image_problems, sizes = scan_images(rows, num_workers)
    problems += image_problems
  skipped = records.triage(problems, skip_bad, where)
  kept = {
    n: dataclasses.replace(r, source=records.ImageRef(r.source.path, '', sizes[n]))
    for n, r in sorted(rows.items())
    if n not in skipped
  }
  if not kept:
    raise InvalidInputError([Problem('', 'no usable rows are left')], where)
  return kept, skipped, sizes


def plan_build(
  spec: Spec, *, name: str, image_size: int, skip_bad: bool, num_workers: int
) -> records.Plan:
  """Reads and checks ALL inputs, then splits; raises InvalidInputError listing every
  problem before anything is written."""
  spec = spec.resolved() if spec.format in FORMATS else spec
  where = ', '.join(spec.csv_paths)
  if problems := _spec_problems(spec):
    raise InvalidInputError(problems, where)
  warnings = []
  if not _has_patients(spec):
    warnings.append(
      'No patient column: each image is treated as its own patient, so if '
      'a patient has several images the split may leak.'
    )
  rows, skipped, sizes = _checked_rows(spec, skip_bad, num_workers, warnings)
  # Rows without a split are cut by patient, into test too only when no row is given
  # to test (CheXpert: valid.csv is test, train/ is cut into train and validation).
  test_fraction = 0.0 if any(r.split == 'test' for r in rows.values()) else spec.test_fraction
  splits = records.assign_splits(
    rows, spec.split_seed, spec.val_fraction, test_fraction, where=where, fix='fix the split column'
  )
  split_by = _split_by(spec, rows)
  return records.Plan(
    kind=FORMATS[spec.format].kind,
    name=name,
    config_name=config_name(image_size),
    image_size=image_size,
    labels=tuple(spec.labels),
    with_mask=True,
    rows=rows,
    splits=splits,
    split_by=split_by,
    settings={
      'format': spec.format,
      'uncertainty': spec.uncertainty if FORMATS[spec.format].has_uncertain else None,
      'frontal_only': spec.frontal_only,
      'val_fraction': spec.val_fraction,
      'test_fraction': spec.test_fraction,
      'split_seed': spec.split_seed,
      'label_file': ', '.join(os.path.basename(p) for p in spec.csv_paths),
      'protocol': FORMATS[spec.format].protocol(spec, split_by),
    },
    skipped=skipped,
    fingerprint=fingerprint(spec, image_size, sizes),
    warnings=warnings,
    description=f'Built from {", ".join(os.path.basename(p) for p in spec.csv_paths)}',
  )


# ---------------------------------------------------------------- building


def config_name(image_size: int) -> str:
  return f'{image_size}px'


def dataset_dir(data_dir: str, name: str, image_size: int) -> str:
  """Where a built dataset lives (records, dataset_info.json, split.json)."""
  return records.dataset_dir(data_dir, name, config_name(image_size))


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
    spec,
    name=name,
    image_size=image_size,
    skip_bad=skip_bad,
    num_workers=num_workers or os.cpu_count(),
  )
  return records.write(
    plan,
    data_dir,
    overwrite=overwrite,
    num_workers=num_workers,
    elsewhere='another --name or --data_dir',
  )
