"""The 14 ChestX-ray14 pathologies in CheXNet's canonical order, and label encoding."""

import numpy as np

LABELS = (
  'Atelectasis',
  'Cardiomegaly',
  'Effusion',
  'Infiltration',
  'Mass',
  'Nodule',
  'Pneumonia',
  'Pneumothorax',
  'Consolidation',
  'Edema',
  'Emphysema',
  'Fibrosis',
  'Pleural_Thickening',
  'Hernia',
)
NUM_CLASSES = len(LABELS)
NO_FINDING = 'No Finding'
# BBox_List_2017.csv spells one label differently from Data_Entry_2017.csv.
ALIASES = {'Infiltrate': 'Infiltration'}

_INDEX = {name: i for i, name in enumerate(LABELS)}


def label_index(name: str) -> int:
  """Index of a pathology name (aliases accepted); KeyError if unknown."""
  return _INDEX[ALIASES.get(name, name)]


def unknown_labels(finding_labels: str) -> list[str]:
  """Names in a '|'-joined Finding Labels field that are not pathologies."""
  names = finding_labels.split('|')
  if names == [NO_FINDING]:
    return []
  return [n for n in names if ALIASES.get(n, n) not in _INDEX]


def encode(finding_labels: str) -> np.ndarray:
  """'Cardiomegaly|Effusion' -> uint8[14] multi-hot; 'No Finding' -> all zeros."""
  bad = unknown_labels(finding_labels)
  if bad:
    raise ValueError(f'Unknown label(s) {bad} in {finding_labels!r}; known: {LABELS}')
  vector = np.zeros(NUM_CLASSES, np.uint8)
  if finding_labels != NO_FINDING:
    vector[[label_index(n) for n in finding_labels.split('|')]] = 1
  return vector


# ---------------------------------------------------------------- label sets
# A run's label set is its dataset's: NIH's 14, or the names a built dataset
# records (input_pipeline.csv_dataset). The trainer records them in the run's
# run.json ('labels'); evaluate, predict and the notebook read them from there
# (run_dir.label_names) without the dataset.


def check_names(names) -> list[str]:
  """Problems with a list of label names (empty, duplicated, a comma inside)."""
  problems = []
  if not names:
    problems.append('no labels given')
  for name in names:
    if not name or name != name.strip():
      problems.append(f'label {name!r} is empty or has surrounding spaces')
    elif ',' in name:
      problems.append(f'label {name!r} contains a comma')
  duplicates = sorted({n for n in names if list(names).count(n) > 1})
  if duplicates:
    problems.append(f'labels {duplicates} are given twice')
  return problems
