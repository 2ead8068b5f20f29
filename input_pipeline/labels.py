"""The 14 ChestX-ray14 pathologies in CheXNet's canonical order, and label encoding."""
import numpy as np

LABELS = (
    'Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule',
    'Pneumonia', 'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis',
    'Pleural_Thickening', 'Hernia')
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
