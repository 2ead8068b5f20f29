"""Config validation names the field, the value and the fix, before compiling."""
import re
import types

import pytest

from chexnet_jax import config_checks
from chexnet_jax import run_dir
from configs import cpu_smoke


def _gpu(kind, capability):
  return types.SimpleNamespace(platform='gpu', device_kind=kind,
                               compute_capability=capability)


def test_bfloat16_on_v100_is_refused_with_the_fix():
  config = cpu_smoke.get_config()
  config.dtype = 'bfloat16'
  with pytest.raises(config_checks.ConfigError,
                     match=r'Tesla V100-SXM2-32GB .*compute capability 7.0.*'
                           r'--config.dtype=float16'):
    config_checks.validate(config, devices=[_gpu('Tesla V100-SXM2-32GB', '7.0')] * 4)


def test_bfloat16_on_h100_and_float16_on_v100_are_accepted():
  config = cpu_smoke.get_config()
  config.dtype = 'bfloat16'
  config_checks.validate(config, devices=[_gpu('NVIDIA H100 80GB HBM3', '9.0')] * 4)
  config.dtype = 'float16'
  config_checks.validate(config, devices=[_gpu('Tesla V100-SXM2-32GB', '7.0')] * 4)


@pytest.mark.parametrize('field, value, message', [
    ('eval_batch_size', 66, 'config.eval_batch_size=66 does not divide over 4 devices'),
    ('dtype', 'float8', "config.dtype='float8' is not one of"),
    ('augment', 'mixup', "config.augment='mixup' is not one of"),
    ('lr_schedule', 'step', "config.lr_schedule='step' is not one of"),
    ('image_size', 64, 'config.image_size=64 is larger than the stored images'),
    ('init_from', '/nonexistent/densenet121.pth', 'is not a file'),
])
def test_each_bad_field_is_named(field, value, message):
  config = cpu_smoke.get_config()
  config[field] = value
  cpus = [types.SimpleNamespace(platform='cpu', device_kind='cpu')] * 4
  with pytest.raises(config_checks.ConfigError, match=message.replace('.', r'\.')
                     .replace('(', r'\(').replace(')', r'\)')):
    config_checks.validate(config, devices=cpus)


@pytest.mark.parametrize('blocked, reason', [
    ('workdir_under_a_file', 'Not a directory'),
    ('checkpoints_is_a_file', 'File exists'),
])
def test_unwritable_workdir_is_refused(tmp_path, blocked, reason):
  if blocked == 'workdir_under_a_file':
    (tmp_path / 'file').write_text('not a directory')
    workdir = tmp_path / 'file' / 'run'
  else:
    workdir = tmp_path / 'run'
    workdir.mkdir()
    (workdir / 'checkpoints').write_text('not a directory')
  with pytest.raises(run_dir.WorkdirError,
                     match=rf'--workdir {re.escape(str(workdir))} cannot be written \(.*'
                           rf'{reason}\); choose a writable directory'):
    run_dir.prepare_workdir(str(workdir))
