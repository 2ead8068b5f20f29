"""Checks a config against the machine before anything compiles or is written.

Each problem stops the run with one sentence naming the field, the value and
the fix: a typo found after a 45-second compile (or a queue wait) is an hour lost.
`validate` needs only the config and the devices; `check_splits` the dataset's
split sizes too. train.py calls both before the workdir is touched.
"""

import math
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
CHOICES = {
  'model': tuple(models.ARCHITECTURES),
  'dtype': tuple(models.DTYPES),
  'augment': tuple(pipeline.AUGMENTS),
  'eval_preprocess': tuple(pipeline.EVAL_PREPROCESS),
  'lr_schedule': lr_scaling.SCHEDULES,
  'lr_scaling': lr_scaling.RULES,
  'pos_weight': tuple(losses.POS_WEIGHTS),
  'best_metric': tuple(checkpoints.BEST_METRICS),
}
# config.dataset is not a choice: any other name is a dataset built from a CSV
# (a missing one stops with the built ones and the build command, pipeline.py).


class ConfigError(ValueError):
  """A config field has a value this run cannot use."""


def _check_choice(config, field, choices):
  value = config[field]
  if value not in choices:
    raise ConfigError(
      f'config.{field}={value!r} is not one of {choices}; set --config.{field} to one of them.'
    )


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
        '--config.dtype=float16 (dynamic loss scaling) or float32.'
      )


def validate(config, devices=None):
  """Raises ConfigError for the first field this machine cannot run."""
  devices = devices if devices is not None else jax.devices()
  for field, choices in CHOICES.items():
    _check_choice(config, field, choices)
  _check_numbers(config)
  try:
    lr_scaling.adam_hyperparameters(config)  # sqrt_adam: b2 must stay in (0, 1).
  except ValueError as error:
    raise ConfigError(str(error)) from None
  _check_divisible(config, 'batch_size', len(devices))
  # config.eval_batch_size is rounded up to a multiple of the device count
  # (pipeline.global_eval_batch): any number of processes evaluates.
  if config.image_size > config.dataset_image_size:
    raise ConfigError(
      f'config.image_size={config.image_size} is larger than the stored '
      f'images (config.dataset_image_size={config.dataset_image_size}); crop '
      'smaller or build the dataset at a larger --image_size.'
    )
  _check_init_from(config)
  _check_precision(config.dtype, devices)


# field -> (test, what it must be). Durations and intervals: a zero or negative
# one trained one step and exited 0, or divided by zero after the workdir was written.
_NUMBERS = {
  'learning_rate': (lambda v: v > 0, 'a positive number (e.g. 1e-3)'),
  'eval_every_epochs': (lambda v: v > 0, 'a positive number of epochs (e.g. 1)'),
  'checkpoint_every_steps': (lambda v: v >= 1, 'a whole number of steps >= 1'),
  'log_every_steps': (lambda v: v >= 1, 'a whole number of steps >= 1'),
  'keep_checkpoints': (lambda v: v >= 1, 'at least 1'),
  'batch_size': (lambda v: v >= 1, 'at least 1'),
  'eval_batch_size': (lambda v: v >= 1, 'at least 1'),
  'warmup_epochs': (lambda v: v >= 0, '0 or more'),
  'prefetch_buffer': (lambda v: v >= 0, '0 or more'),
  'grain_workers': (lambda v: v >= 0, '0 or more'),
  'step_timeout_factor': (lambda v: v > 1, 'more than 1 (e.g. 20)'),
  'step_timeout_min_seconds': (lambda v: v >= 0, '0 (no watchdog) or more'),
}


def _check_numbers(config):
  for field, (ok, wanted) in _NUMBERS.items():
    if field not in config:
      continue
    value = config[field]
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
      raise ConfigError(f'config.{field}={value!r} must be {wanted}; set --config.{field} to one.')
  if config.num_train_steps > 0:
    return  # It overrides num_epochs.
  if config.num_train_steps != -1 and config.num_train_steps != 0:
    raise ConfigError(
      f'config.num_train_steps={config.num_train_steps} must be > 0, or -1 to '
      'train config.num_epochs; set --config.num_train_steps to one.'
    )
  epochs = config.num_epochs
  if not isinstance(epochs, (int, float)) or not math.isfinite(epochs) or epochs <= 0:
    raise ConfigError(
      f'config.num_epochs={epochs!r} must be a positive number of epochs (or '
      'set --config.num_train_steps=N > 0 instead); set --config.num_epochs to one.'
    )


def check_splits(config, dataset_info):
  """Each split must hold what a run needs: the train split one global batch,
  validation and test at least one example each."""
  splits = dataset_info['splits']
  train = splits.get('train', 0)
  if train < config.batch_size:
    where = 'config.synthetic_train_size' if config.dataset == 'synthetic' else 'the dataset'
    raise ConfigError(
      f'The train split has {train} examples, fewer than one global batch '
      f'(config.batch_size={config.batch_size}); lower config.batch_size or '
      f'enlarge {where}.'
    )
  if splits.get('validation', 0) < 1:
    raise ConfigError(
      'The validation split is empty; validation runs every '
      'config.eval_every_epochs, so give it examples '
      '(config.val_fraction, or config.synthetic_eval_size).'
    )


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
        "ImageNet weights; set --config.init_from='' to train it from scratch."
      )
    if imagenet_weights.expected_hash_prefix(url) is None:
      raise ConfigError(
        f'config.imagenet_weights_url={url!r} has no sha256 prefix in its file '
        'name (like densenet121-a639ec97.pth), so the download could not be '
        'verified; download it yourself and set config.init_from to its path.'
      )
    if not name.startswith(config.model + '-'):
      raise ConfigError(
        f'config.imagenet_weights_url names {name}, not {config.model} weights; '
        "set it to torchvision's file for the model (e.g. https://download."
        f'pytorch.org/models/{config.model}-<hash>.pth) or change config.model.'
      )
    return
  if os.path.isdir(init_from):  # A trained run, to fine-tune.
    try:
      run_weights.check_source(init_from, config.model)
    except run_weights.FineTuneError as error:
      raise ConfigError(str(error)) from None
    return
  if not os.path.isfile(init_from):
    raise ConfigError(
      f'config.init_from={init_from!r} is not a file; give the '
      'path of a .pth, .h5, .weights.h5 or .keras file, a run '
      "directory (fine-tuning), 'imagenet' or '' (from scratch)."
    )
