"""Checks a config against the machine before anything compiles.

Each problem stops the run with one sentence naming the field, the value and
the fix: a typo found after a 45-second compile (or a queue wait) is an hour lost.
"""
import os
import tempfile

import jax

from chexnet_jax import models
from chexnet_jax import train

# The choices come from where they are implemented, so they cannot drift.
MODELS = tuple(models.ARCHITECTURES)
DTYPES = tuple(train.DTYPES)
AUGMENTS = ('random_resized_crop', 'random_crop', 'center_crop')
SCHEDULES = ('plateau', 'warmup_cosine')
DATASETS = ('chestxray14', 'synthetic')


class ConfigError(ValueError):
  """A config field has a value this run cannot use."""


def _check_choice(config, field, choices):
  value = config[field]
  if value not in choices:
    raise ConfigError(f'config.{field}={value!r} is not one of {choices}; '
                      f'set --config.{field} to one of them.')


def _check_divisible(config, field, devices):
  value = config[field]
  if value <= 0 or value % devices:
    fix = max(devices, value - value % devices)
    raise ConfigError(
        f'config.{field}={value} does not divide over {devices} devices; '
        f'set --config.{field} to a multiple of {devices} (e.g. {fix}).')


def _check_precision(dtype, devices):
  """bfloat16 needs Ampere or newer; V100 (compute capability 7.0) lacks it."""
  if dtype != 'bfloat16':
    return
  for device in devices:
    capability = getattr(device, 'compute_capability', None)
    if device.platform == 'gpu' and capability and float(capability) < 8.0:
      raise ConfigError(
          f'config.dtype=bfloat16 but {device.device_kind} (compute capability '
          f'{capability}) has no bfloat16 tensor cores; use '
          '--config.dtype=float16 (dynamic loss scaling) or float32.')


def validate(config, devices=None):
  """Raises ConfigError for the first field this machine cannot run."""
  devices = devices if devices is not None else jax.devices()
  for field, choices in (('model', MODELS), ('dtype', DTYPES),
                         ('augment', AUGMENTS), ('lr_schedule', SCHEDULES),
                         ('dataset', DATASETS)):
    _check_choice(config, field, choices)
  for field in ('batch_size', 'eval_batch_size'):
    _check_divisible(config, field, len(devices))
  if config.image_size > config.dataset_image_size:
    raise ConfigError(
        f'config.image_size={config.image_size} is larger than the stored '
        f'images (config.dataset_image_size={config.dataset_image_size}); crop '
        'smaller or build the dataset at a larger --image_size.')
  if config.init_from and not os.path.isfile(config.init_from):
    raise ConfigError(f'config.init_from={config.init_from!r} is not a file; '
                      'give the path of a .pth, .h5, .weights.h5 or .keras file.')
  _check_precision(config.dtype, devices)


class WorkdirError(ConfigError):
  """The workdir cannot be written: not a directory, read-only or full."""


def prepare_workdir(workdir):
  """Creates the workdir and proves it is writable, before any long work.

  Its checkpoints/ subdirectory too: orbax meets an unwritable one only at
  the first save, and then waits 5 minutes before failing.
  """
  for path in (workdir, os.path.join(workdir, 'checkpoints')):
    try:
      os.makedirs(path, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=path) as probe:
        probe.write(b'x')  # A byte, flushed: a full disk fails here, not later.
        probe.flush()
        os.fsync(probe.fileno())
    except OSError as error:
      raise WorkdirError(
          f'--workdir {workdir} cannot be written ({path}: {error.strerror}); '
          'choose a writable directory with free space.') from error
