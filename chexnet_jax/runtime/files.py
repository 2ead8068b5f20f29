"""Files written whole, and the one file name both the runtime and run/ use.

Every file a command writes for someone else to read (a config, checksums, a
temperature, a summary) goes through write_atomically: a temporary file of its
own in the same folder, then a rename, so a reader sees the old file or the new
one, never half of one, and two writers never mix their bytes.
"""

import contextlib
import json
import os
import tempfile

# WORKDIR/run.lock: taken by run/workdir_lock.py, released by stderr_guard.py
# when its trainer is aborted by a lost peer.
LOCK_FILE = 'run.lock'


def write_atomically(path, data, *, durable=False):
  """Writes `data` (str or bytes) to `path` whole; `durable` fsyncs it before the rename."""
  mode = 'wb' if isinstance(data, bytes) else 'w'
  directory = os.path.dirname(os.path.abspath(path))
  fd, staging = tempfile.mkstemp(prefix=staging_prefix(os.path.basename(path)), dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      f.write(data)
      if durable:
        f.flush()
        os.fsync(f.fileno())
    os.chmod(staging, 0o666 & ~umask())  # mkstemp makes 0600; follow the umask.
    os.replace(staging, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(staging)
    raise


def staging_prefix(name):
  """The start of the hidden name a file `name` has while write_atomically writes it."""
  return f'.{name}.'


def staging_dir(parent, prefix):
  """A new folder in `parent` to build an output in before it is renamed into place;
  its mode follows the umask (mkdtemp's 0700 would stay on the renamed folder, which
  a shared group could then not read)."""
  path = tempfile.mkdtemp(prefix=prefix, dir=parent)
  os.chmod(path, 0o777 & ~umask())
  return path


def write_json_atomically(path, obj, *, sort_keys=False, durable=False):
  """An indented JSON file, written whole; keys in the order given unless sort_keys."""
  write_atomically(path, json.dumps(obj, indent=2, sort_keys=sort_keys), durable=durable)


def umask():
  """The process's umask (reading it means setting it: set back at once)."""
  mask = os.umask(0)
  os.umask(mask)
  return mask
