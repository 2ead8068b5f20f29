"""Config validation names the field, the value and the fix, before compiling."""

import re
import types

import pytest

from chexnet_jax import config_checks
from chexnet_jax import run_dir
from configs import cpu_smoke


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
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0 must be at least 1'),
    ('eval_batch_size', 0, 'config.eval_batch_size=0 must be at least 1'),
    ('dtype', 'float8', "config.dtype='float8' is not one of"),
    ('augment', 'mixup', "config.augment='mixup' is not one of"),
    ('lr_schedule', 'step', "config.lr_schedule='step' is not one of"),
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
