"""Checks a config against the machine before anything compiles or is written.

Each problem stops the run with one sentence naming the field, the value and
the fix: a typo found after a 45-second compile (or a queue wait) is an hour lost.
Every field's range, type and format is one entry of FIELDS, one table;
`check_fields` needs only the config (main.py runs it before JAX starts),
`validate` the devices and file system too, `check_splits` the dataset's split
sizes. train.py calls all three before the workdir is touched.
"""

import dataclasses
import math
import os
from typing import Any, Callable

from absl import logging
import jax

from chexnet_jax.run import run_reader
from chexnet_jax import errors
from chexnet_jax.model import imagenet_weights
from chexnet_jax.model import losses
from chexnet_jax.training import lr_scaling
from chexnet_jax.model import densenet
from chexnet_jax.run import run_dir
from chexnet_jax.run import run_weights
from chexnet_jax.training import train_step
from input_pipeline import batching
from input_pipeline import csv_dataset
from input_pipeline import pipeline

# The choices come from where they are implemented, so they cannot drift.
CHOICES = {
  'model': tuple(densenet.ARCHITECTURES),
  'dtype': tuple(densenet.DTYPES),
  'augment': tuple(pipeline.AUGMENTS),
  'eval_preprocess': tuple(pipeline.EVAL_PREPROCESS),
  'lr_schedule': lr_scaling.SCHEDULES,
  'lr_scaling': lr_scaling.RULES,
  'pos_weight': tuple(losses.POS_WEIGHTS),
  'best_metric': tuple(run_reader.BEST_METRICS),
}
# Fields a resumed run changes only when config.allow_changes names them.
CHANGE_NEEDS_CONSENT = tuple(run_dir.CHANGE_NEEDS_CONSENT)


class ConfigError(errors.UserValueError):
  """A config field has a value this run cannot use."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a field's value must be: `ok(value, config)`, and `wanted`, the words
  the error gives (a string, or a function of the config)."""

  ok: Callable[[Any, Any], bool]
  wanted: Any


def _is_int(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
  return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _whole(low, high=None, also=(), unit=''):
  def ok(value, _):
    return _is_int(value) and (value in also or (low <= value and (high is None or value <= high)))

  words = (
    f'a whole number{unit} >= {low}' if high is None else f'a whole number from {low} to {high}'
  )
  return Rule(ok, words + ''.join(f', or {a}' for a in also))


def _real(low, high=math.inf, *, low_open=False, high_open=True, words=None):
  def ok(value, _):
    if not _is_number(value):
      return False
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    return above and below

  if words is None:
    interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
    words = f'a number in {interval}'
  return Rule(ok, words)


def _choice(field):
  return Rule(lambda value, _: value in CHOICES[field], f'one of {CHOICES[field]}')


def _flag():
  return Rule(lambda value, _: isinstance(value, bool), 'True or False')


def _text(test, words):
  return Rule(
    lambda value, config: isinstance(value, str) and '\0' not in value and test(value, config),
    words,
  )


def _address(value):
  """'' or host:port, the port a number from 1 to 65535."""
  if value == '':
    return True
  host, _, port = value.rpartition(':')
  return bool(host) and port.isdigit() and 1 <= int(port) <= 65535


def _distinct_names(value):
  names = [n.strip() for n in value.split(',')]
  return value == '' or (all(names) and len(set(names)) == len(names))


def _command_buffer_kinds(value, _):
  return value == '' or all(k in train_step.COMMAND_BUFFER_KINDS for k in value.split(','))


def _field_names(value):
  names = [n.strip() for n in value.split(',') if n.strip()]
  return all(n in CHANGE_NEEDS_CONSENT for n in names)


def _epochs_ok(value, config):
  return (_is_int(config.num_train_steps) and config.num_train_steps > 0) or (
    _is_number(value) and value > 0
  )


def _processes_ok(value, config):
  if not config.coordinator_address:
    return _is_int(value) and (value == -1 or value >= 1)
  return _is_int(value) and value >= 1


def _process_id_ok(value, config):
  if not config.coordinator_address:
    return _is_int(value) and value >= -1
  return _is_int(value) and _is_int(config.num_processes) and 0 <= value < config.num_processes


def _process_id_wanted(config):
  if not config.coordinator_address:
    return '-1 (set by the launcher) or a process index >= 0'
  return (
    f'from 0 to config.num_processes-1 ({config.num_processes}-1): a distinct id for each process'
  )


# The compute dtypes the fused dense layer is tested in (float16 runs with loss scaling,
# on V100s, which its Triton kernels are not built for); float32 on the CPU only
# (_check_fused_dense_layer).
FUSED_DENSE_LAYER_DTYPES = ('bfloat16', 'float32')


def _fused_dense_layer_ok(value, config):
  return isinstance(value, bool) and (not value or config.dtype in FUSED_DENSE_LAYER_DTYPES)


def _fused_dense_layer_wanted(config):
  if not isinstance(config.fused_dense_layer, bool):
    return 'True or False'
  return (
    f'False with config.dtype={config.dtype!r} (its kernel is tested in '
    f'{" and ".join(FUSED_DENSE_LAYER_DTYPES)} only)'
  )


def _any(value, config):
  """Any text (_text refuses a NUL byte: these are paths)."""
  del value, config
  return True


_POSITIVE = 'a positive number'

# Every field of configs/default.py, and what its value must be. check_fields()
# refuses a config with a field missing from here (a typo in a config file
# adds one), and tests/unit/test_config_checks.py gives each field a bad value.
FIELDS = {
  # Data.
  'dataset': _text(
    lambda v, _: v in csv_dataset.RESERVED_NAMES or not csv_dataset.check_name(v),
    "'chestxray14', 'synthetic', or the --name of a dataset built with "
    'input_pipeline.build (lower-case letters, digits and _)',
  ),
  'data_dir': _text(lambda v, _: bool(v), 'a directory (the TFDS data_dir of the built dataset)'),
  'dataset_image_size': _whole(1, unit=' of pixels'),
  'image_size': _whole(1, unit=' of pixels'),
  'augment': _choice('augment'),
  'random_flip': _flag(),
  'min_crop_area': _real(0, 1, low_open=True, high_open=False, words='a fraction in (0, 1]'),
  'eval_preprocess': _choice('eval_preprocess'),
  'val_fraction': _real(0, 1, low_open=True, words='a fraction in (0, 1)'),
  'split_seed': _whole(0),
  'grain_workers': _whole(0),
  'prefetch_buffer': _whole(0),
  'synthetic_train_size': _whole(1),
  'synthetic_eval_size': _whole(1),
  # Model.
  'model': _choice('model'),
  'num_classes': _whole(1, also=(-1,)),
  'dtype': _choice('dtype'),
  'bn_sync': _flag(),
  'gpu_command_buffers': _text(
    _command_buffer_kinds,
    f"'' (XLA's default) or a comma list of {', '.join(train_step.COMMAND_BUFFER_KINDS)}",
  ),
  'fused_optimizer': _flag(),
  'fused_dense_layer': Rule(_fused_dense_layer_ok, _fused_dense_layer_wanted),
  'init_from': _text(_any, "'imagenet', '' (from scratch), a weights file or a run directory"),
  'imagenet_weights_url': _text(
    lambda v, _: v.startswith(('https://', 'http://', 'file://')),
    'an https://, http:// or file:// URL',
  ),
  'weights_cache_dir': _text(_any, "a directory, or '' for $XDG_CACHE_HOME/chexnet_jax"),
  # Optimisation.
  'batch_size': _whole(1),
  'eval_batch_size': _whole(1),
  'learning_rate': _real(0, low_open=True, words=f'{_POSITIVE} (e.g. 1e-3)'),
  'lr_base_batch_size': _whole(1),
  'lr_scaling': _choice('lr_scaling'),
  'b1': _real(0, 1),
  'b2': _real(0, 1),
  'adam_eps': _real(0, low_open=True, words=f'{_POSITIVE} (e.g. 1e-8)'),
  'weight_decay': _real(0, words='0 or more'),
  'lr_schedule': _choice('lr_schedule'),
  'warmup_epochs': _real(0, words='0 or more'),
  'plateau_factor': _real(0, 1, low_open=True, words='a fraction in (0, 1) (e.g. 0.1)'),
  'plateau_patience': _whole(0),
  'pos_weight': _choice('pos_weight'),
  'best_metric': _choice('best_metric'),
  'num_epochs': Rule(
    _epochs_ok,
    'a positive number of epochs (or set --config.num_train_steps=N > 0 instead)',
  ),
  'num_train_steps': Rule(
    lambda v, _: _is_int(v) and (v == -1 or v > 0), '> 0, or -1 to train config.num_epochs'
  ),
  # Bookkeeping.
  'seed': _whole(0, 2**31 - 1),
  'log_every_steps': _whole(1, unit=' of steps'),
  'eval_every_epochs': _real(0, low_open=True, words=f'{_POSITIVE} of epochs (e.g. 1)'),
  'checkpoint_every_steps': _whole(1, unit=' of steps'),
  'keep_checkpoints': _whole(1),
  'debug_nan_at_step': _whole(0, also=(-1,)),
  'allow_changes': _text(
    lambda v, _: _field_names(v),
    f"'' or comma-separated names from {CHANGE_NEEDS_CONSENT} (fields changed on resume)",
  ),
  # Distributed.
  'coordinator_address': _text(
    lambda v, _: _address(v),
    "'' (one process, or srun) or 'host:port' with the host of process 0, e.g. 'node001:12345'",
  ),
  'num_processes': Rule(
    _processes_ok,
    lambda c: (
      'the number of processes (>= 1), since config.coordinator_address is set'
      if c.coordinator_address
      else '-1 (set by the launcher) or >= 1'
    ),
  ),
  'process_id': Rule(_process_id_ok, _process_id_wanted),
  'heartbeat_timeout_seconds': Rule(
    lambda v, _: _is_int(v) and v >= 1,
    'a whole number of seconds >= 1: it bounds how long live processes wait for a dead '
    'peer (e.g. 60)',
  ),
  'step_timeout_factor': _real(1, low_open=True, words='more than 1 (e.g. 20)'),
  'step_timeout_min_seconds': _real(0, words='0 (no watchdog) or more'),
}


def field_error(config, field):
  """The one-sentence error for config[field], or None if its value is fine."""
  rule, value = FIELDS[field], config[field]
  if rule.ok(value, config):
    return None
  wanted = rule.wanted(config) if callable(rule.wanted) else rule.wanted
  return f'config.{field}={value!r} must be {wanted}; set --config.{field} to one.'


def check_fields(config, fields=None):
  """Raises ConfigError for the first field (of `fields`, default all) whose
  value is out of range, of the wrong type or format, or not a field at all.
  Needs nothing but the config: main runs it before JAX starts."""
  unknown = sorted(set(config) - set(FIELDS)) if fields is None else []
  if unknown:
    raise ConfigError(
      f'config.{unknown[0]} is not a config field (a typo in the config file?); '
      'every field is declared in configs/default.py.'
    )
  for field in FIELDS if fields is None else fields:
    if field in config and (error := field_error(config, field)):
      raise ConfigError(error)
  if fields is None and config.image_size > config.dataset_image_size:
    raise ConfigError(
      f'config.image_size={config.image_size} is larger than the stored '
      f'images (config.dataset_image_size={config.dataset_image_size}); crop '
      'smaller or build the dataset at a larger --image_size.'
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


def _check_fused_dense_layer(fused, dtype, devices):
  """The fused dense layer's Pallas kernels run through Triton on GPUs, in bfloat16 (which
  _check_precision allows from compute capability 8.0), and in interpret mode on the CPU;
  nowhere else. Their float32 products on a GPU would be full float32 where XLA's
  convolutions use TF32 there: other numbers (and no tensor cores)."""
  if not fused:
    return
  for device in devices:
    if device.platform not in ('cpu', 'gpu'):
      raise ConfigError(
        f'config.fused_dense_layer=True but {device.device_kind} ({device.platform}) cannot '
        'run its Pallas kernels, written for Triton on GPUs (or the CPU, interpreted); set '
        '--config.fused_dense_layer=False.'
      )
    if device.platform == 'gpu' and dtype == 'float32':
      raise ConfigError(
        f"config.fused_dense_layer=True with config.dtype='float32' on {device.device_kind}: "
        "its kernels' float32 products would be full float32 where XLA's convolutions use "
        'TF32 (other numbers); set --config.dtype=bfloat16 or --config.fused_dense_layer=False.'
      )


def validate(config, devices=None):
  """Raises ConfigError for the first field this machine cannot run: every
  field against FIELDS, then what needs the devices or the file system."""
  check_fields(config)
  devices = devices if devices is not None else jax.devices()
  try:
    lr_scaling.adam_hyperparameters(config)  # sqrt_adam: b2 must stay in (0, 1).
  except ValueError as error:
    raise ConfigError(str(error)) from None
  _check_divisible(config, 'batch_size', len(devices))
  # config.eval_batch_size is rounded up to a multiple of the device count
  # (pipeline.global_eval_batch): any number of processes evaluates.
  _check_init_from(config)
  _check_precision(config.dtype, devices)
  _check_fused_dense_layer(config.fused_dense_layer, config.dtype, devices)


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
    if config.model not in densenet.ARCHITECTURES or config.model == 'tiny':
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


# Training crops that keep less than this fraction of the stored image's area
# train on a small part of each record: a config meant for other records (e.g.
# cpu_smoke's 32 px crops of 224 px records), not a choice.
SMALL_CROP_AREA = 0.5
_CROPPING_AUGMENTS = ('random_crop', 'center_crop')


def small_crop_warning(config):
  """One sentence when training crops a small part of each stored image, or None.

  The rule: 'random_crop' and 'center_crop' keep (image_size / dataset_image_size)^2
  of the stored image's area; below SMALL_CROP_AREA it is named.
  """
  if config.augment not in _CROPPING_AUGMENTS or config.dataset_image_size <= 0:
    return None
  fraction = (config.image_size / config.dataset_image_size) ** 2
  if fraction >= SMALL_CROP_AREA:
    return None
  return (
    f'config.augment={config.augment!r} trains on {config.image_size} px crops of '
    f'{config.dataset_image_size} px records, {fraction:.0%} of each image '
    f'(warned below {SMALL_CROP_AREA:.0%}); to train on whole images set '
    '--config.augment=resize --config.eval_preprocess=resize (the defaults, as in '
    "configs/cpu.py), or build the records at the model's --image_size."
  )


def warn_if_small_crop(config):
  message = small_crop_warning(config)
  if message and jax.process_index() == 0:
    logging.warning('%s', message)
