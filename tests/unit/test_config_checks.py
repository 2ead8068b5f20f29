"""Config validation names the field, the value and the fix, before compiling."""

import glob
import importlib
import os
import re
import types

import ml_collections
import pytest

from chexnet_jax.training import config_checks
from chexnet_jax.run import run_dir
from configs import cpu_smoke
from configs import default
from tests.support import runs
from tests.conftest import REPO

# A bad value for every field of configs/default.py, chosen here, apart from the
# table it tests: a field added without a rule, or a rule that lets its bad
# value through, fails test_every_field_refuses_a_bad_value_in_one_sentence.
BAD_VALUES = {
  'dataset': 'My Data!',
  'data_dir': '',
  'dataset_image_size': -1,
  'image_size': 0,
  'augment': 'mixup',
  'random_flip': 'yes',
  'min_crop_area': 5.0,
  'eval_preprocess': 'crop',
  'val_fraction': 1.0,
  'split_seed': -1,
  'grain_workers': -1,
  'prefetch_buffer': 1.5,
  'synthetic_train_size': 0,
  'synthetic_eval_size': -3,
  'model': 'resnet50',
  'num_classes': 0,
  'dtype': 'float8',
  'bn_sync': 1,
  'gpu_command_buffers': 'FUSION,WARP',
  'fused_optimizer': 'yes',
  'fused_dense_layer': 1,
  'init_from': 'weights\0.pth',
  'imagenet_weights_url': 'densenet121-a639ec97.pth',
  'weights_cache_dir': 3,
  'batch_size': 0,
  'eval_batch_size': -1,
  'learning_rate': 0.0,
  'lr_base_batch_size': 0,
  'lr_scaling': 'cube',
  'b1': 1.0,
  'b2': -0.1,
  'adam_eps': 0.0,
  'weight_decay': -1e-4,
  'lr_schedule': 'step',
  'warmup_epochs': -1.0,
  'plateau_factor': -1.0,
  'plateau_patience': -1,
  'pos_weight': 'balanced',
  'best_metric': 'accuracy',
  'num_epochs': 0.0,
  'num_train_steps': -5,
  'seed': -1,
  'log_every_steps': 0,
  'eval_every_epochs': float('nan'),
  'checkpoint_every_steps': 0,
  'keep_checkpoints': 0,
  'debug_nan_at_step': -2,
  'allow_changes': 'model',
  'coordinator_address': 'localhost',
  'num_processes': 0,
  'process_id': -2,
  'heartbeat_timeout_seconds': 0,
  'step_timeout_factor': 1.0,
  'step_timeout_min_seconds': -1.0,
}


def _with(config, **values):
  """A config as a config file or config.json can make it: any type, any value
  (ConfigDict's type lock applies to overrides only)."""
  return ml_collections.ConfigDict(dict(config.to_dict(), **values))


def test_bad_values_cover_every_field():
  assert sorted(BAD_VALUES) == sorted(default.get_config())


@pytest.mark.parametrize('field', sorted(BAD_VALUES))
def test_every_field_refuses_a_bad_value_in_one_sentence(field):
  config = _with(default.get_config(), **{field: BAD_VALUES[field]})
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.check_fields(config)
  message = str(error.value)
  assert message.startswith(f'config.{field}={BAD_VALUES[field]!r} must be '), message
  assert message.endswith(f'set --config.{field} to one.') and '\n' not in message, message


@pytest.mark.parametrize(
  'values, message',
  [
    (
      dict(coordinator_address='localhost', num_processes=2, process_id=0),
      "config.coordinator_address='localhost' must be '' (one process, or srun) or 'host:port'",
    ),
    (
      dict(coordinator_address='node001:12345', num_processes=2, process_id=5),
      'config.process_id=5 must be from 0 to config.num_processes-1 (2-1)',
    ),
    (
      dict(coordinator_address='node001:12345', num_processes=-1, process_id=0),
      'config.num_processes=-1 must be the number of processes (>= 1), since',
    ),
    (dict(coordinator_address='node001:99999'), "config.coordinator_address='node001:99999'"),
    (dict(heartbeat_timeout_seconds=0), 'config.heartbeat_timeout_seconds=0 must be a whole'),
    (dict(image_size=0), 'config.image_size=0 must be a whole number of pixels >= 1'),
    (dict(dataset_image_size=-1), 'config.dataset_image_size=-1 must be a whole number'),
    (dict(plateau_factor=-1.0), 'config.plateau_factor=-1.0 must be a fraction in (0, 1)'),
    (dict(min_crop_area=5.0), 'config.min_crop_area=5.0 must be a fraction in (0, 1]'),
    (dict(batchsize=64), 'config.batchsize is not a config field (a typo in the config file?)'),
  ],
)
def test_issue_cases_are_named(values, message):
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.check_fields(_with(default.get_config(), **values))
  assert str(error.value).startswith(message), str(error.value)


def test_num_epochs_is_free_when_steps_are_given():
  config_checks.check_fields(_with(default.get_config(), num_epochs=0.0, num_train_steps=10))


_SHIPPED = sorted(
  os.path.basename(p)[:-3]
  for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
  if not p.endswith('__init__.py')
)


@pytest.mark.parametrize('name', _SHIPPED)
def test_shipped_configs_pass(name):
  config_checks.check_fields(importlib.import_module(f'configs.{name}').get_config())


@pytest.mark.parametrize(
  'text, reason',
  [
    ('def get_config(:\n  pass\n', '(SyntaxError, line 1: invalid syntax)'),
    ('raise RuntimeError("no such cluster")\n', '(RuntimeError: no such cluster)'),
  ],
)
def test_config_file_that_does_not_load_is_one_sentence(tmp_path, text, reason):
  path = tmp_path / 'broken.py'
  path.write_text(text)
  result = runs.run_trainer(
    tmp_path / 'run', config=str(path), env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120
  )
  assert result.returncode == 1
  assert result.stderr.strip() == (
    f'error: --config {path} could not be loaded {reason}; fix the file and run again.'
  )
  assert not (tmp_path / 'run').exists()


def test_bad_value_on_the_command_line_stops_before_jax_starts(tmp_path):
  """The CLI path: process_id out of range is one line (JAX never starts, the
  workdir never exists)."""
  result = runs.run_trainer(
    tmp_path / 'run',
    'coordinator_address=localhost:1234',
    'num_processes=2',
    'process_id=5',
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    timeout=120,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
    'error: config.process_id=5 must be from 0 to config.num_processes-1 (2-1): a distinct '
    'id for each process; set --config.process_id to one.'
  ]
  assert not (tmp_path / 'run').exists()


def _gpu(kind, capability):
  return types.SimpleNamespace(platform='gpu', device_kind=kind, compute_capability=capability)


def test_bfloat16_on_v100_is_refused_with_the_fix():
  config = cpu_smoke.get_config()
  config.dtype = 'bfloat16'
  with pytest.raises(
    config_checks.ConfigError,
    match=r'Tesla V100-SXM2-32GB .*compute capability 7.0.*'
    r'--config.dtype=float16',
  ):
    config_checks.validate(config, devices=[_gpu('Tesla V100-SXM2-32GB', '7.0')] * 4)


def test_bfloat16_on_h100_and_float16_on_v100_are_accepted():
  config = cpu_smoke.get_config()
  config.dtype = 'bfloat16'
  config_checks.validate(config, devices=[_gpu('NVIDIA H100 80GB HBM3', '9.0')] * 4)
  config.dtype = 'float16'
  config_checks.validate(config, devices=[_gpu('Tesla V100-SXM2-32GB', '7.0')] * 4)


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('batch_size', 66, 'config.batch_size=66 does not divide over 4 devices'),
    ('learning_rate', -0.01, 'config.learning_rate=-0.01 must be a positive number'),
    ('learning_rate', float('nan'), 'config.learning_rate=nan must be a positive'),
    ('num_epochs', 0.0, 'config.num_epochs=0.0 must be a positive number of epochs'),
    ('num_epochs', -3.0, 'config.num_epochs=-3.0 must be a positive number of epochs'),
    ('num_train_steps', -5, 'config.num_train_steps=-5 must be > 0, or -1'),
    ('checkpoint_every_steps', 0, 'config.checkpoint_every_steps=0 must be a whole'),
    ('log_every_steps', 0, 'config.log_every_steps=0 must be a whole number'),
    ('eval_every_epochs', 0.0, 'config.eval_every_epochs=0.0 must be a positive'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0 must be a whole number >= 1'),
    ('eval_batch_size', 0, 'config.eval_batch_size=0 must be a whole number >= 1'),
    ('dtype', 'float8', "config.dtype='float8' must be one of"),
    ('augment', 'mixup', "config.augment='mixup' must be one of"),
    ('lr_schedule', 'step', "config.lr_schedule='step' must be one of"),
    ('image_size', 64, 'config.image_size=64 is larger than the stored images'),
    ('init_from', '/nonexistent/densenet121.pth', 'is not a file'),
  ],
)
def test_each_bad_field_is_named(field, value, message):
  config = cpu_smoke.get_config()
  config[field] = value
  cpus = [types.SimpleNamespace(platform='cpu', device_kind='cpu')] * 4
  with pytest.raises(
    config_checks.ConfigError,
    match=message.replace('.', r'\.').replace('(', r'\(').replace(')', r'\)'),
  ):
    config_checks.validate(config, devices=cpus)


def test_eval_batch_need_not_divide_the_devices():
  config = cpu_smoke.get_config()
  config.eval_batch_size = 66  # Rounded up to 68 for 4 devices: padding.
  config_checks.validate(
    config, devices=[types.SimpleNamespace(platform='cpu', device_kind='cpu')] * 4
  )


def test_train_split_smaller_than_one_batch_is_refused():
  config = cpu_smoke.get_config()
  info = {'splits': {'train': 16, 'validation': 128, 'test': 128}}
  with pytest.raises(
    config_checks.ConfigError,
    match=r'The train split has 16 examples, fewer than one global '
    r'batch \(config.batch_size=32\).*synthetic_train_size',
  ):
    config_checks.check_splits(config, info)
  info['splits']['train'] = 32
  config_checks.check_splits(config, info)


@pytest.mark.parametrize(
  'blocked, reason',
  [
    ('workdir_under_a_file', 'Not a directory'),
    ('checkpoints_is_a_file', 'File exists'),
  ],
)
def test_unwritable_workdir_is_refused(tmp_path, blocked, reason):
  if blocked == 'workdir_under_a_file':
    (tmp_path / 'file').write_text('not a directory')
    workdir = tmp_path / 'file' / 'run'
  else:
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'checkpoints').write_text('not a directory')
  with pytest.raises(
    run_dir.WorkdirError,
    match=rf'--workdir {re.escape(str(workdir))} cannot be written \(.*'
    rf'{reason}\); choose a writable directory',
  ):
    run_dir.prepare_workdir(str(workdir))
