"""CheXpert's adapter (Irvin et al. 2019): its CSV format for csv_dataset.py's builder.

  Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Support Devices
  CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,...

Each observation holds 1 (positive), 0 (negative), -1 (uncertain) or blank (not
mentioned, read as negative, as the CheXpert authors do). Uncertain labels follow
a policy (the paper's names):
  ignore  U-Ignore: masked out of the loss and of the metrics
  zeros   U-Zeros: read as negative
  ones    U-Ones: read as positive

Splits (the usual protocol, where CheXpert models are compared): valid.csv's images
(valid/, labelled by radiologists) are the test split; validation is cut by patient
from train/ (labelled by the CheXpert labeler). The patient is the path's
patientNNNNN. COMPETITION_LABELS are the 5 the CheXpert competition scores.
"""

import dataclasses
import re

import numpy as np

OBSERVATIONS = (
  'No Finding',
  'Enlarged Cardiomediastinum',
  'Cardiomegaly',
  'Lung Opacity',
  'Lung Lesion',
  'Edema',
  'Consolidation',
  'Pneumonia',
  'Atelectasis',
  'Pneumothorax',
  'Pleural Effusion',
  'Pleural Other',
  'Fracture',
  'Support Devices',
)
# The 5 observations the CheXpert competition ranks models by (Irvin et al. 2019).
COMPETITION_LABELS = ('Atelectasis', 'Cardiomegaly', 'Consolidation', 'Edema', 'Pleural Effusion')
PATH_COLUMN = 'Path'
FRONTAL_COLUMN = 'Frontal/Lateral'
VIEW_COLUMN = 'AP/PA'
SEX_COLUMN = 'Sex'
AGE_COLUMN = 'Age'
UNCERTAINTY_POLICIES = ('ignore', 'zeros', 'ones')
_PATIENT = re.compile(r'(?:^|/)(patient\d+)/')
# The directory of a path that names its split in CheXpert's release: valid/ (and
# test/, CheXpert's later test set) are test; train/ ('') is cut by patient into
# train and validation.
SPLIT_DIRS = {'train': '', 'valid': 'test', 'test': 'test'}

_POSITIVE, _NEGATIVE, _UNCERTAIN = 1.0, 0.0, -1.0


def patient_of(path: str) -> str:
  """'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg' -> 'patient00001'
  ('' when the path names no patient)."""
  match = _PATIENT.search(path.replace('\\', '/'))
  return match.group(1) if match else ''


def split_of(path: str) -> str:
  """The split a CheXpert path names: 'valid/' (or 'test/') -> 'test'; '' (cut by
  patient) for 'train/' or a path that names none."""
  parts = path.replace('\\', '/').split('/')
  return next((SPLIT_DIRS[p] for p in parts if p in SPLIT_DIRS), '')


def parse_value(text: str) -> float:
  """'1', '1.0', '0', '-1', '' (blank = not mentioned = 0.0) -> float; ValueError else."""
  text = text.strip()
  if not text:
    return _NEGATIVE
  value = float(text)
  if value not in (_POSITIVE, _NEGATIVE, _UNCERTAIN):
    raise ValueError(text)
  return value


def apply_policy(value: float, policy: str) -> tuple[int, int]:
  """One observation -> (label, mask) under an uncertainty policy."""
  if value != _UNCERTAIN:
    return int(value), 1
  if policy == 'ignore':
    return 0, 0
  if policy == 'zeros':
    return 0, 1
  if policy == 'ones':
    return 1, 1
  raise ValueError(f'uncertainty policy {policy!r} is not one of {UNCERTAINTY_POLICIES}')


def encode(values: list[str], policy: str) -> tuple[np.ndarray, np.ndarray]:
  """Observation strings -> (labels uint8[C], mask uint8[C]); ValueError naming the
  first value that is not 1, 0, -1 or blank."""
  pairs = [apply_policy(parse_value(v), policy) for v in values]
  return (np.array([p[0] for p in pairs], np.uint8), np.array([p[1] for p in pairs], np.uint8))


def _label_problem(row: dict, names) -> str:
  bad = next(n for n in names if not _is_value(row.get(n) or ''))
  return f'column {bad!r} holds {row.get(bad)!r}; CheXpert label columns hold 1, 0, -1 or blank'


def _is_value(text: str) -> bool:
  try:
    parse_value(text)
    return True
  except ValueError:
    return False


def _age(text: str) -> int:
  text = text.strip()
  return int(float(text)) if text.replace('.', '', 1).isdigit() else 0


class Format:
  """CheXpert's columns, values, patients and splits, for csv_dataset's reader (the
  generic format there has the same methods)."""

  name = kind = 'chexpert'
  split_by_paths = 'given (CheXpert paths)'
  patients_from_paths = has_uncertain = True

  def resolved(self, spec):
    """Its columns and observations unless given."""
    path_column = PATH_COLUMN if spec.path_column == 'path' else spec.path_column
    return dataclasses.replace(spec, labels=spec.labels or OBSERVATIONS, path_column=path_column)

  def required_columns(self, spec) -> list[str]:
    return [FRONTAL_COLUMN] if spec.frontal_only else []

  def left_out(self, row: dict, spec) -> bool:
    """A lateral view, under --frontal_only."""
    return spec.frontal_only and (row.get(FRONTAL_COLUMN) or '').strip() != 'Frontal'

  def labels(self, row: dict, spec) -> tuple[np.ndarray, np.ndarray]:
    try:
      return encode([row.get(n) or '' for n in spec.labels], spec.uncertainty)
    except ValueError:
      raise ValueError(_label_problem(row, spec.labels)) from None

  def patient(self, rel: str) -> str:
    if not (patient := patient_of(rel)):
      raise ValueError(f'path {rel!r} names no patientNNNNN directory')
    return patient

  def split(self, rel: str) -> str:
    return split_of(rel)

  def extras(self, row: dict) -> dict:
    return {
      'sex': (row.get(SEX_COLUMN) or '').strip(),
      'age': _age(row.get(AGE_COLUMN) or ''),
      'view': (row.get(VIEW_COLUMN) or '').strip(),
    }

  def protocol(self, spec, split_by: str) -> str:
    if split_by != self.split_by_paths:
      return f'CheXpert format, split by {split_by}; uncertain labels: {spec.uncertainty}'
    return (
      'CheXpert: valid.csv (valid/, radiologist-labelled) is the test split; validation '
      f'is cut by patient from train/ ({spec.val_fraction:g} of its patients, seed '
      f'{spec.split_seed}); uncertain labels: {spec.uncertainty}; competition labels: '
      f'{", ".join(COMPETITION_LABELS)}'
    )


FORMAT = Format()
