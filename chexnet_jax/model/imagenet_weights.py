"""ImageNet weights for `config.init_from='imagenet'`: download once, verify, cache.

torchvision's DenseNet files (config.imagenet_weights_url) carry the first hex
digits of their sha256 in their name ('densenet121-a639ec97.pth'); like
torch.hub, the download is checked against them. The file is cached in
`config.weights_cache_dir`, or `$XDG_CACHE_HOME/chexnet_jax` (default
~/.cache/chexnet_jax), and written atomically: it is downloaded to a unique
temporary name beside its final one and renamed only once verified, so a partial
or tampered download never sits under the final name.

Many processes (Slurm: one per GPU, several per node) may ask at once: an
exclusive lock on '<file>.lock' lets the first download while the others wait,
then find the verified file. A cache on a shared file system without working
locks still ends right: each process then downloads to its own temporary file and
the renames are atomic.

The URL lives in configs/default.py (imagenet_weights_url) only. Nothing here
imports torch: the file is read later by chexnet_jax.model.weights, without torch
(chexnet_jax.model.torch_pickle).
"""

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request

from absl import logging

from chexnet_jax import errors

# torch.hub's rule: the hex digits after the last '-' of the file name.
_HASH_IN_NAME = re.compile(r'-([a-f0-9]{8,64})\.[^.]+$')
_TIMEOUT_SECONDS = 60
_NO_INIT = ('', 'none')
# config.init_from values that name no file (not made absolute in a run's config).
NOT_PATHS = _NO_INIT + ('imagenet',)


class WeightsDownloadError(errors.UserRuntimeError):
  """The ImageNet file could not be downloaded or failed verification."""


def cache_dir(config=None):
  """config.weights_cache_dir, else $XDG_CACHE_HOME/chexnet_jax, else ~/.cache/..."""
  configured = config.weights_cache_dir if config is not None else ''
  if configured:
    return os.path.expanduser(configured)
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'chexnet_jax')


def expected_hash_prefix(url):
  """The sha256 prefix named in the URL's file name, or None."""
  match = _HASH_IN_NAME.search(os.path.basename(url))
  return match.group(1) if match else None


def init_path(config):
  """The weights file `config.init_from` means, downloading it if needed.

  '' or 'none': None (train from scratch). 'imagenet': torchvision's ImageNet
  file from config.imagenet_weights_url, cached and verified. Anything else is
  a path, returned as is: a weights file, or a run directory to fine-tune from.
  """
  init_from = config.init_from
  if init_from.lower() in _NO_INIT:
    return None
  if init_from.lower() == 'imagenet':
    return fetch(config.imagenet_weights_url, cache_dir(config))
  return init_from


def fetch(url, directory, *, timeout=_TIMEOUT_SECONDS):
  """Path of the verified file of `url` in `directory`, downloaded if absent."""
  expected = expected_hash_prefix(url)
  if expected is None:
    raise WeightsDownloadError(
      f'{url} has no sha256 prefix in its file name (like densenet121-a639ec97'
      '.pth), so its download cannot be verified; download it yourself and '
      'set config.init_from to its path.'
    )
  path = os.path.join(directory, os.path.basename(url))
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as error:
    raise WeightsDownloadError(
      f'Cannot create the weights cache {directory} ({error.strerror}); set '
      'config.weights_cache_dir (or XDG_CACHE_HOME) to a writable directory.'
    ) from None
  with _exclusive(path + '.lock'):
    if os.path.exists(path):
      if sha256_of(path).startswith(expected):
        return path
      logging.warning(
        '%s does not match the sha256 prefix %s of its name; downloading it again.', path, expected
      )
      os.remove(path)
    _download_verified(url, path, expected, timeout)
  return path


def _download_verified(url, path, expected, timeout):
  logging.info('Downloading %s to %s.', url, path)
  fd, partial = tempfile.mkstemp(
    dir=os.path.dirname(path), prefix=os.path.basename(path) + '.', suffix='.partial'
  )
  try:
    with os.fdopen(fd, 'wb') as out:
      try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
          shutil.copyfileobj(response, out, 1 << 20)
      except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, 'reason', None) or error
        raise WeightsDownloadError(
          f'Could not download {url} ({reason}); with no network, put that '
          f'file at {path} by hand (or set config.init_from to a local '
          "weights file, or '' to train from scratch)."
        ) from None
    digest = sha256_of(partial)
    if not digest.startswith(expected):
      raise WeightsDownloadError(
        f'The download of {url} has sha256 {digest[:16]}..., not the prefix '
        f'{expected} its name promises (corrupted or tampered with); it was '
        f'deleted. Try again, or put the genuine file at {path} by hand.'
      )
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


@contextlib.contextmanager
def _exclusive(lock_path, poll_seconds=0.5):
  """An exclusive lock on `lock_path`, waited for (flock; a no-op where the file
  system refuses locks, which atomic renames make safe)."""
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError:
    yield
    return
  try:
    waited = False
    while True:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if not waited:
          logging.info('Waiting for another process to download %s.', lock_path[: -len('.lock')])
          waited = True
        time.sleep(poll_seconds)
      except OSError:  # Locks unsupported here.
        break
    yield
  finally:
    os.close(fd)  # Releases the lock.


def sha256_of(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
