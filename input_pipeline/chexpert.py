"""CheXpert's CSV format (Irvin et al. 2019): columns, uncertain labels, patients, splits.

  Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Support Devices
  CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,...

Each observation holds 1 (positive), 0 (negative), -1 (uncertain) or blank (not
mentioned, read as negative, as the CheXpert authors do). Uncertain labels follow
a policy (the paper's names):
  ignore  U-Ignore: masked out of the loss and of the metrics
  zeros   U-Zeros: read as negative
  ones    U-Ones: read as positive
"""

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
PATH_COLUMN = 'Path'
FRONTAL_COLUMN = 'Frontal/Lateral'
VIEW_COLUMN = 'AP/PA'
SEX_COLUMN = 'Sex'
AGE_COLUMN = 'Age'
UNCERTAINTY_POLICIES = ('ignore', 'zeros', 'ones')
_PATIENT = re.compile(r'(?:^|/)(patient\d+)/')
# The directory of a path that names its split in CheXpert's release.
SPLIT_DIRS = {'train': 'train', 'valid': 'validation', 'test': 'test'}

_POSITIVE, _NEGATIVE, _UNCERTAIN = 1.0, 0.0, -1.0


def patient_of(path: str) -> str:
  """'CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg' -> 'patient00001'
  ('' when the path names no patient)."""
  match = _PATIENT.search(path.replace('\\', '/'))
  return match.group(1) if match else ''


def split_of(path: str) -> str:
  """The split a CheXpert path names ('train/' -> 'train', 'valid/' -> 'validation');
  '' if none."""
  for part in path.replace('\\', '/').split('/'):
    if part in SPLIT_DIRS:
      return SPLIT_DIRS[part]
  return ''


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
