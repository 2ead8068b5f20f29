"""Checks a config against the machine before anything compiles.

Each problem stops the run with one sentence naming the field, the value and
the fix: a typo found after a 45-second compile (or a queue wait) is an hour lost.
"""
import os
import tempfile

import jax

from chexnet_jax import imagenet_weights
from chexnet_jax import losses
from chexnet_jax import lr_scaling
from chexnet_jax import models
from chexnet_jax import train

# The choices come from where they are implemented, so they cannot drift.
MODELS = tuple(models.ARCHITECTURES)
DTYPES = tuple(train.DTYPES)
AUGMENTS = ('resize', 'random_resized_crop', 'random_crop', 'center_crop')
EVAL_PREPROCESS = ('resize', 'center_crop')
BEST_METRICS = ('val_loss', 'val_mean_auroc')
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
                         ('dataset', DATASETS),
                         ('eval_preprocess', EVAL_PREPROCESS),
                         ('lr_scaling', lr_scaling.RULES),
                         ('pos_weight', losses.POS_WEIGHTS),
                         ('best_metric', BEST_METRICS)):
    _check_choice(config, field, choices)
  for field in ('batch_size', 'eval_batch_size'):
    _check_divisible(config, field, len(devices))
  if config.image_size > config.dataset_image_size:
    raise ConfigError(
        f'config.image_size={config.image_size} is larger than the stored '
        f'images (config.dataset_image_size={config.dataset_image_size}); crop '
        'smaller or build the dataset at a larger --image_size.')
  _check_init_from(config)
  _check_precision(config.dtype, devices)


def _check_init_from(config):
  init_from = config.init_from
  if init_from.lower() in ('', 'none'):
    return
  if init_from.lower() == 'imagenet':
    url = config.imagenet_weights_url
    name = os.path.basename(url)
    if config.model not in models.ARCHITECTURES or config.model == 'tiny':
      raise ConfigError(
          f"config.init_from='imagenet' but config.model={config.model!r} has no "
          "ImageNet weights; set --config.init_from='' to train it from scratch.")
    if imagenet_weights.expected_hash_prefix(url) is None:
      raise ConfigError(
          f'config.imagenet_weights_url={url!r} has no sha256 prefix in its file '
          'name (like densenet121-a639ec97.pth), so the download could not be '
          'verified; download it yourself and set config.init_from to its path.')
    if not name.startswith(config.model + '-'):
      raise ConfigError(
          f'config.imagenet_weights_url names {name}, not {config.model} weights; '
          'set it to torchvision\'s file for the model (e.g. https://download.'
          f'pytorch.org/models/{config.model}-<hash>.pth) or change config.model.')
    return
  if not os.path.isfile(init_from):
    raise ConfigError(f'config.init_from={init_from!r} is not a file; give the '
                      "path of a .pth, .h5, .weights.h5 or .keras file, 'imagenet' "
                      "or '' (from scratch).")


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
