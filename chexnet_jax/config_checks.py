"""Checks a config against the machine before anything compiles.

Each problem stops the run with one sentence naming the field, the value and
the fix: a typo found after a 45-second compile (or a queue wait) is an hour lost.
"""
import os

import jax

from chexnet_jax import checkpoints
from chexnet_jax import imagenet_weights
from chexnet_jax import losses
from chexnet_jax import lr_scaling
from chexnet_jax import models
from chexnet_jax import run_weights
from input_pipeline import batching
from input_pipeline import pipeline

# The choices come from where they are implemented, so they cannot drift.
CHOICES = {'model': tuple(models.ARCHITECTURES),
           'dtype': tuple(models.DTYPES),
           'augment': tuple(pipeline.AUGMENTS),
           'eval_preprocess': tuple(pipeline.EVAL_PREPROCESS),
           'lr_schedule': lr_scaling.SCHEDULES,
           'lr_scaling': lr_scaling.RULES,
           'pos_weight': tuple(losses.POS_WEIGHTS),
           'best_metric': tuple(checkpoints.BEST_METRICS)}
# config.dataset is not a choice: any other name is a dataset built from a CSV
# (a missing one stops with the built ones and the build command, pipeline.py).


class ConfigError(ValueError):
  """A config field has a value this run cannot use."""


def _check_choice(config, field, choices):
  value = config[field]
  if value not in choices:
    raise ConfigError(f'config.{field}={value!r} is not one of {choices}; '
                      f'set --config.{field} to one of them.')


def _check_divisible(config, field, devices):
  try:
    batching.split_batch(config[field], devices, field=field, unit='devices')
  except batching.BatchSizeError as error:
    raise ConfigError(str(error)) from None


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
  for field, choices in CHOICES.items():
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
  if os.path.isdir(init_from):  # A trained run, to fine-tune.
    try:
      run_weights.check_source(init_from, config.model)
    except run_weights.FineTuneError as error:
      raise ConfigError(str(error)) from None
    return
  if not os.path.isfile(init_from):
    raise ConfigError(f'config.init_from={init_from!r} is not a file; give the '
                      "path of a .pth, .h5, .weights.h5 or .keras file, a run "
                      "directory (fine-tuning), 'imagenet' or '' (from scratch).")

