"""What a dataset was built from, and what building into it again does.

Both builders (csv_dataset.py for your own CSVs, chestxray14.py for NIH) record a
fingerprint of their inputs in the dataset's metadata.json: the sha256 of the input
files' bytes (CSVs, lists), the build's settings, and each image's name and size.
Building again into the same directory keeps a dataset built from the same inputs
('unchanged'), refuses one built from other inputs (ExistingDatasetError), or, with
--overwrite, rebuilds it ('rebuilt'). One rule, here, for both.
"""

from chexnet_jax import errors

import hashlib
import json
import os

import tensorflow_datasets as tfds

METADATA_FILE = 'metadata.json'


class ExistingDatasetError(errors.UserValueError):
  """A dataset built from other inputs is already there."""


def inputs_fingerprint(files, settings: dict, sizes: dict[str, int]) -> str:
  """sha256 of the files' bytes, the settings, and each image's name and size."""
  digest = hashlib.sha256()
  for path in files:
    with open(path, 'rb') as f:
      digest.update(f.read())
  digest.update(json.dumps({**settings, 'images': sorted(sizes.items())}, sort_keys=True).encode())
  return digest.hexdigest()


def built_fingerprint(dataset_dir: str) -> str | None:
  """The fingerprint of the dataset in `dataset_dir`: None if there is none, ''
  if it was built before fingerprints were recorded."""
  if not os.path.isfile(os.path.join(dataset_dir, 'dataset_info.json')):
    return None  # Written last, on the rename: present <=> complete.
  try:
    with open(os.path.join(dataset_dir, METADATA_FILE)) as f:
      return json.load(f).get('fingerprint', '')
  except (OSError, ValueError):
    return ''


def reuse_or_rebuild(
  dataset_dir: str, fingerprint: str, overwrite: bool, *, elsewhere: str = 'another --data_dir'
):
  """(TFDS download mode, outcome: 'built', 'unchanged' or 'rebuilt') for building
  `fingerprint` into `dataset_dir`; ExistingDatasetError, in one sentence, when
  other inputs built it and `overwrite` is not set."""
  existing = built_fingerprint(dataset_dir)
  if existing is None:
    return tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS, 'built'
  if existing == fingerprint:
    return tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS, 'unchanged'
  if overwrite:
    return tfds.download.GenerateMode.FORCE_REDOWNLOAD, 'rebuilt'
  why = (
    'built from other inputs (its fingerprint differs: other files, options or images)'
    if existing
    else 'built before input fingerprints were recorded, so whether its inputs were '
    'the same is unknown'
  )
  raise ExistingDatasetError(
    f'{dataset_dir} holds a dataset {why}; it was kept. Pass --overwrite to '
    f'replace it, or choose {elsewhere}.'
  )
