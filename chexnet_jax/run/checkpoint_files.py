"""What a checkpoint directory holds on disk, checked without orbax: the
checksums of a step (N/checksums.json) and the metrics files orbax reads.

One rule for both users: checkpoints.py (which sets a bad step of its own run
aside) and run_weights.py (which refuses a bad step of the run it fine-tunes
from, leaving that run untouched). It needs no orbax, so both can import it.
"""

import glob
import hashlib
import json
import os

from chexnet_jax.runtime import files

CHECKSUM_FILE = 'checksums.json'
# A step without checksums that predates checksums-at-save (saved by a
# chexnet_jax that wrote them at the next save): restorable, unverified.
UNVERIFIED = 'unverified'
# Checksums written as part of the save, inside orbax's temporary directory
# before it is renamed into a step (checkpoints.py); the step's input position
# ('data' item) carries MARKER, so a complete step without them is damaged.
AT_SAVE = 'at_save'
MARKER = {'checksums': AT_SAVE}
DATA_FILE = os.path.join('data', 'metadata')  # orbax's JSON of the 'data' item.
STEP_METADATA_FILE = '_CHECKPOINT_METADATA'
# What orbax still writes after the checksums, when it renames the step:
# commit_success.txt (a fixed sentence) and the commit time in its metadata.
_COMMIT_FILE = 'commit_success.txt'
_COMMIT_TIME = 'commit_timestamp_nsecs'


def file_digests(path, rule=None):
  """{relative path: sha256} of every file under `path` but the checksum file.

  rule AT_SAVE: without what orbax writes once the checksums exist (above).
  """
  digests = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      relative = os.path.relpath(full, path)
      if relative == CHECKSUM_FILE or (rule == AT_SAVE and relative == _COMMIT_FILE):
        continue
      with open(full, 'rb') as f:
        data = f.read()
      if rule == AT_SAVE and relative == STEP_METADATA_FILE:
        data = _without_commit_time(data)
      digests[relative] = hashlib.sha256(data).hexdigest()
  return digests


def _without_commit_time(data):
  """orbax's step metadata as canonical JSON without its commit time; bytes
  that are not JSON stay as they are (and so fail their checksum)."""
  try:
    metadata = json.loads(data)
  except ValueError:
    return data
  if not isinstance(metadata, dict):
    return data
  metadata.pop(_COMMIT_TIME, None)
  return json.dumps(metadata, sort_keys=True).encode()


def write_checksums(path):
  """Writes `path`/checksums.json (atomically) for the files now under `path`."""
  target = os.path.join(path, CHECKSUM_FILE)
  checksums = {'rule': AT_SAVE, 'sha256': file_digests(path, AT_SAVE)}
  files.write_json_atomically(target, checksums, durable=True)


def _without_checksums(path):
  """A step without checksums: UNVERIFIED if it predates checksums at save
  (its input position lacks MARKER), else why it counts as damaged."""
  try:
    with open(os.path.join(path, DATA_FILE)) as f:
      data = json.load(f)
  except FileNotFoundError:
    return UNVERIFIED  # Saved before the input position was stored.
  except (OSError, ValueError) as error:
    return f'no {CHECKSUM_FILE} and {DATA_FILE} unreadable: {type(error).__name__}'
  if isinstance(data, dict) and data.get('checksums') == AT_SAVE:
    return f'{CHECKSUM_FILE} missing, though the step was saved with it'
  return UNVERIFIED


def verify(path):
  """None if step directory `path` matches its checksums; UNVERIFIED when it
  has none and predates checksums at save; else a short reason (which file
  differs, or that the checksums of a step saved with them are missing)."""
  checksum_path = os.path.join(path, CHECKSUM_FILE)
  try:
    with open(checksum_path) as f:
      saved = json.load(f)
    expected, rule = saved['sha256'], saved.get('rule')
  except FileNotFoundError:
    return _without_checksums(path)
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
    return f'{CHECKSUM_FILE} unreadable: {type(error).__name__}'
  try:
    actual = file_digests(path, rule)
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


def finished_steps(directory):
  """The steps whose save finished, ascending: orbax writes a step under a temporary
  name (N.orbax-checkpoint-tmp-*) and renames it to N when it is complete."""
  try:
    names = os.listdir(directory)
  except OSError:  # No checkpoint yet, or the directory vanished.
    return []
  return sorted(int(name) for name in names if name.isdigit())


def checkpoint_dir(workdir):
  """WORKDIR/checkpoints: where orbax keeps a run's steps."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')
