"""What a person reads while a run trains: phase lines, step lines with elapsed
time and ETA, no library noise (tests/support/console_lines.py), configs/cpu.py and the
small-crop warning."""

import ast
import json
import logging
import os
import re
import subprocess
import sys

import pytest

from chexnet_jax.runtime import console
from chexnet_jax.training import config_checks
from chexnet_jax.training import phases
from chexnet_jax.runtime import metric_logging
from chexnet_jax.runtime import progress
from chexnet_jax.runtime import stderr_guard
from chexnet_jax.training import train
from configs import cpu
from configs import cpu_smoke
from configs import default
from tests.support import console_lines
from tests.conftest import REPO
from tests.conftest import TINY_RUN_CONSOLE


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_eta_is_paced_from_after_the_compiling_first_step():
  clock = FakeClock()
  run = progress.RunClock(total_steps=21, now=clock)
  assert run.remaining(1) is None  # Nothing timed yet.
  clock.now = 100.0  # The first step compiles for 100 s.
  run.first_step_done(1)
  clock.now = 110.0  # Ten more steps, 1 s each.
  assert run.remaining(11) == pytest.approx(10.0)
  assert run.suffix(11) == '  elapsed 1 min 50 s  ETA 10 s'


@pytest.mark.parametrize(
  'seconds, text', [(0.4, '0 s'), (42, '42 s'), (185, '3 min 05 s'), (7620, '2 h 07 min')]
)
def test_durations_read_as_a_clock(seconds, text):
  assert progress.duration(seconds) == text


def test_step_averages_leave_out_an_interval_of_only_the_compile():
  timer = train.StepTimer(global_batch=32)
  timer.add(0.01)
  timer.reset()  # What the loop does after the compiling first step.
  assert timer.summary() == {}
  line = metric_logging.progress_line(1, 10, {'train_loss': 0.5, 'learning_rate': 1e-3})
  assert line == 'step 1/10  loss 0.5000  lr 1.00e-03'
  timer.add(0.002)
  summary = timer.summary()
  assert summary['images_per_second'] > 0 and summary['data_wait_ms'] == pytest.approx(2.0)


def test_validation_pass_is_announced_with_its_size(caplog):
  with caplog.at_level(logging.INFO):
    phases.validation_phase(16, 130, 64, first=True)
    phases.validation_phase(32, 130, 64, first=False)
    phases.validation_phase(48, 30, 64, first=False)
  lines = [r.getMessage() for r in caplog.records]
  assert lines[0] == (
    'step 16: validating on 130 images (3 batches of 64); '
    'the first pass compiles the evaluation step...'
  )
  assert lines[1] == 'step 32: validating on 130 images (3 batches of 64)...'
  assert lines[2] == 'step 48: validating on 30 images (1 batch of 64)...'


def test_tiny_model_is_not_told_densenet_takes_minutes(caplog):
  config = cpu_smoke.get_config()
  with caplog.at_level(logging.INFO):
    phases.state_phase(config)
    phases.compile_phase(config, 0)
  text = ' '.join(r.getMessage() for r in caplog.records)
  assert 'Building the train state (tiny, random weights)...' in text
  assert 'DenseNet' not in text and 'minute' not in text


def test_console_lines_carry_no_thread_id():
  record = logging.LogRecord('absl', logging.WARNING, '/x/train.py', 12, 'hello %s', ('you',), None)
  line = console.ConsoleFormatter().format(record)
  assert re.fullmatch(r'W\d{4} \d\d:\d\d:\d\d\.\d{3} train\.py:12\] hello you', line), line


def test_tensorboard_tags_are_sanitised_and_jsonl_keeps_names(tmp_path, caplog):
  assert metric_logging.tensorboard_tag('val_auroc/No Finding') == 'val_auroc/No_Finding'
  assert metric_logging.tensorboard_tag('val_auroc/Pleural_Thickening') == (
    'val_auroc/Pleural_Thickening'
  )
  writer = metric_logging.MetricWriter(str(tmp_path))
  with caplog.at_level(logging.DEBUG):
    writer.write_scalars(3, {'val_auroc/No Finding': 0.75, 'val_auroc/Lung (left)': 0.5})
  writer.close()
  assert not [r for r in caplog.records if 'illegal' in r.getMessage()]
  with open(tmp_path / 'metrics.jsonl') as f:
    record = json.loads(f.readline())
  assert record == {'step': 3, 'val_auroc/No Finding': 0.75, 'val_auroc/Lung (left)': 0.5}


_WRITE_METRICS = """
import sys
from chexnet_jax.runtime import metric_logging
writer = metric_logging.MetricWriter(sys.argv[1])
writer.write_scalars(1, {'train_loss': 0.5})
writer.close()
assert 'torch' not in sys.modules, 'the metric writer imported torch'
import torch  # Hidden only while tensorboardX was imported.
"""


def test_metric_writer_starts_without_importing_torch(tmp_path):
  """tensorboardX imports torch when installed (1.5-3 s at every start), only to
  accept torch tensors; the trainer writes floats."""
  pytest.importorskip('torch')
  result = subprocess.run(
    [sys.executable, '-c', _WRITE_METRICS, str(tmp_path)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.listdir(tmp_path / 'tensorboard')


XLA_BANNER = """\
I1201 09:34:28.809 train.py:347] Compiling the train step (first step, 1)...
E1201 09:36:28.000000   1234 slow_operation_alarm.cc:73]
********************************
[Compiling module jit_step] Very slow compile? If you want to file a bug, run with envvar \
XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.
********************************
E1201 09:37:40.000000   1234 slow_operation_alarm.cc:140] The operation took 3m12.85s

********************************
[Compiling module jit_step] Very slow compile? If you want to file a bug, run with envvar \
XLA_FLAGS=--xla_dump_to=/tmp/foo and attach the results.
********************************
I1201 09:37:41.809 train.py:384] step 5/40  loss 0.5

********************************
"""


def test_xla_slow_compile_banner_is_dropped_and_nothing_else():
  banner = stderr_guard.SlowCompileBanner()
  kept = [line for line in XLA_BANNER.splitlines() if not banner.is_banner(line)]
  assert kept == [
    'I1201 09:34:28.809 train.py:347] Compiling the train step (first step, 1)...',
    'I1201 09:37:41.809 train.py:384] step 5/40  loss 0.5',
    '',
    '*' * 32,  # Outside a banner: kept.
  ]


def test_small_training_crops_are_warned_of_with_the_rule():
  config = cpu_smoke.get_config()
  assert config_checks.small_crop_warning(config) is None  # 32 of 40 px: 64% of the area.
  config.dataset_image_size = 224  # cpu_smoke on 224 px records.
  message = config_checks.small_crop_warning(config)
  assert message.startswith(
    "config.augment='random_crop' trains on 32 px crops of 224 px records, 2% of each image "
    '(warned below 50%)'
  )
  assert '--config.augment=resize' in message and '\n' not in message
  config.augment = 'random_resized_crop'  # Resized to the model's size: not a small crop.
  assert config_checks.small_crop_warning(config) is None


def test_cpu_config_trains_on_whole_images_and_overrides_only_what_differs():
  config, base = cpu.get_config(), default.get_config()
  assert config.augment == config.eval_preprocess == 'resize'
  assert config.image_size == config.dataset_image_size
  assert config_checks.small_crop_warning(config) is None
  with open(os.path.join(REPO, 'configs', 'cpu.py')) as f:
    tree = ast.parse(f.read())
  assigned = [
    node.targets[0].attr
    for node in ast.walk(tree)
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
  ]
  assert assigned, 'configs/cpu.py sets no field'
  for field in assigned:
    assert config[field] != base[field], f'configs/cpu.py sets {field} to its default'


def _main(*args):
  command = [sys.executable, '-m', 'chexnet_jax.main', *args]
  return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
  'args, message',
  [
    (
      ['--config', 'configs/cpu_smoke.py', '--workdir', 'unused', '--config.batchsize=3'],
      "error: unknown config field 'batchsize'. Did you mean batch_size? Every field is "
      'declared in configs/default.py.',
    ),
    (
      ['--config', 'configs/cpu_smoke.py'],
      'error: --workdir is required; run with --helpfull for the flags',
    ),
  ],
)
def test_flag_mistakes_read_as_one_sentence(args, message):
  result = _main(*args)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert result.stderr.startswith(message), result.stderr


@pytest.mark.slow
def test_tiny_train_shows_no_library_noise(tiny_run):
  with open(os.path.join(os.path.dirname(tiny_run), TINY_RUN_CONSOLE)) as f:
    console = f.read()
  assert 'Compiling the train step' in console and 'validating on' in console
  assert re.search(r'step 48/48 .* img/s .* elapsed \d+ s  ETA 0 s', console), console[-2000:]
  assert console_lines.unexpected_lines(console) == [], console[-3000:]


def test_a_single_process_run_writes_stderr_without_the_xla_banner(tmp_path):
  # What main.py does first; then the banner as XLA writes it, to fd 2 from
  # below Python (C++ logging bypasses sys.stderr).
  script = (
    'import os, sys\n'
    'from configs import cpu_smoke\n'
    'from chexnet_jax.runtime import distributed\n'
    f'distributed.initialize(cpu_smoke.get_config(), env={{}}, workdir={str(tmp_path)!r})\n'
    'os.write(2, sys.argv[1].encode())\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', script, XLA_BANNER],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Compiling the train step' in result.stderr and 'step 5/40' in result.stderr
  assert 'Very slow compile' not in result.stderr and 'slow_operation_alarm' not in result.stderr


def test_a_resumed_run_supersedes_the_metrics_rows_past_its_step(tmp_path):
  """A run killed at step 5 after saving step 3 redoes steps 4 and 5: their rows
  are replaced, not repeated (a torn last line goes too)."""
  path = tmp_path / 'metrics.jsonl'
  rows = [json.dumps({'step': s, 'train_loss': 1.0}) for s in range(1, 6)]
  path.write_text('\n'.join(rows) + '\n{"step": 6, "train_lo')
  writer = metric_logging.MetricWriter(str(tmp_path), resumed_step=3)
  writer.write_scalars(4, {'train_loss': 0.5})
  writer.close()
  written = [json.loads(line) for line in path.read_text().splitlines()]
  assert [(r['step'], r['train_loss']) for r in written] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 0.5)]
