"""What a checkpoint directory holds on disk, checked without orbax: the
checksums of a step (N/checksums.json) and the metrics files orbax reads.

One rule for both users: checkpoints.py (which sets a bad step of its own run
aside) and run_weights.py (which refuses a bad step of the run it fine-tunes
from, leaving that run untouched). A leaf of the module graph: the standard
library only, so that both can import it.
"""

import glob
import hashlib
import json
import os

CHECKSUM_FILE = 'checksums.json'
UNVERIFIED = 'unverified'


def file_digests(path):
  """{relative path: sha256} of every file under `path` but the checksum file."""
  digests = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      relative = os.path.relpath(full, path)
      if relative == CHECKSUM_FILE:
        continue
      with open(full, 'rb') as f:
        digests[relative] = hashlib.file_digest(f, 'sha256').hexdigest()
  return digests


def verify(path):
  """None if step directory `path` matches its checksums; UNVERIFIED when it
  has none; else a short reason (which file differs)."""
  checksum_path = os.path.join(path, CHECKSUM_FILE)
  try:
    with open(checksum_path) as f:
      expected = json.load(f)['sha256']
  except FileNotFoundError:
    return UNVERIFIED
  except (OSError, ValueError, KeyError, TypeError) as error:
    return f'{CHECKSUM_FILE} unreadable: {type(error).__name__}'
  try:
    actual = file_digests(path)
  except OSError as error:
    return f'a file unreadable: {error.strerror}'
  for name in sorted(set(expected) | set(actual)):
    if name not in actual:
      return f'{name} missing'
    if name not in expected:
      return f'{name} not in {CHECKSUM_FILE}'
    if actual[name] != expected[name]:
      return f'{name} does not match its checksum'
  return None


def torn_metrics(directory):
  """[(step, reason)] of the steps under checkpoint `directory` whose metrics
  file is not JSON. orbax reads every step's metrics when it opens the
  directory: one torn file stops it with a JSONDecodeError."""
  torn = []
  for path in sorted(glob.glob(os.path.join(directory, '*', 'metrics', 'metrics'))):
    step = os.path.basename(os.path.dirname(os.path.dirname(path)))
    if not step.isdigit():
      continue
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError) as error:
      torn.append((int(step), f'metrics: {type(error).__name__}'))
  return sorted(torn)


def first_line(error):
  """The first line of an exception's message (at most 200 characters)."""
  text = str(error).strip()
  return text.splitlines()[0][:200] if text else ''
