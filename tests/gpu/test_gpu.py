"""The trainer on a real GPU agrees with the CPU backend.

Run by benchmarks/device_check.sh on a GPU machine; skipped elsewhere. The
model is the tiny DenseNet (the same layers, two blocks of two): equivalences
need no DenseNet121 compile, so the tests finish in about a minute; DenseNet121
itself is timed by the benchmark parts of the script.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from input_pipeline import labels as labels_lib
from chexnet_jax.runtime import sharding
from chexnet_jax.training import train_state
from chexnet_jax.training import train_step
from configs import default
from tests.conftest import REPO

IMAGE_SIZE = 64
BATCH = 8


def _config(dtype='float32', **overrides):
  config = default.get_config()
  config.model = 'tiny'
  config.dataset = 'synthetic'
  config.dataset_image_size = config.image_size = IMAGE_SIZE
  config.batch_size = BATCH
  config.lr_base_batch_size = BATCH
  config.dtype = dtype
  config.init_from = ''
  config.num_classes = len(labels_lib.LABELS)
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _mesh(platform):
  return jax.sharding.Mesh(np.array(jax.devices(platform)[:1]), ('data',))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 1), np.uint8),
    'labels': rng.integers(0, 2, (BATCH, 14)).astype(np.float32),
    'mask': np.ones((BATCH,), bool),
    'index': np.arange(BATCH, dtype=np.int32),
  }


class _Trainer:
  """State and compiled train step for one config on one platform's mesh."""

  def __init__(self, config, platform, initial_state=None):
    self.mesh = _mesh(platform)
    model = train_state.build_model(config, for_training=True)
    tx, schedule = train_state.create_optimizer(config, steps_per_epoch=1, total_steps=100)
    state = initial_state
    if state is None:
      state = train_state.create_train_state(config, model, _mesh('cpu'), tx, labels_lib.LABELS)
    self.state = jax.device_put(jax.device_get(state), sharding.replicated(self.mesh))
    self.step_fn = train_step.make_train_step(config, model, self.mesh, tx, schedule)

  def step(self, batch):
    self.state, metrics = self.step_fn(self.state, sharding.to_global(batch, self.mesh))
    return float(metrics['train_loss'])


def _relative(a, b):
  a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)]) for t in (a, b))
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_float32_train_step_matches_cpu():
  """Same params, same batch: one step on the GPU = the step on the CPU.

  Adam's first step is lr * g / (|g| + eps), a sign for small eps, which
  turns rounding in a near-zero gradient into a full +-lr difference. With
  eps >> |g| (and lr = eps) the step is exactly the gradient, so the new
  parameters compare the gradients themselves. Matrix products run at
  'highest' precision on both: the GPU default would use TF32.
  """
  config = _config(adam_eps=1e3, learning_rate=1e3)
  with jax.default_matmul_precision('highest'):
    cpu = _Trainer(config, 'cpu')
    gpu = _Trainer(config, 'gpu', initial_state=cpu.state)
    before = jax.device_get(cpu.state.params)
    batch = _batch()
    cpu_loss, gpu_loss = cpu.step(batch), gpu.step(batch)
  cpu_delta = jax.tree.map(np.subtract, jax.device_get(cpu.state.params), before)
  gpu_delta = jax.tree.map(np.subtract, jax.device_get(gpu.state.params), before)
  delta_error = _relative(gpu_delta, cpu_delta)
  stats_error = _relative(
    jax.device_get(gpu.state.batch_stats), jax.device_get(cpu.state.batch_stats)
  )
  print(
    f'float32 step GPU vs CPU: loss {gpu_loss:.7f} vs {cpu_loss:.7f}; relative '
    f'error of the update {delta_error:.2e}, of the BN statistics {stats_error:.2e}'
  )
  assert abs(gpu_loss - cpu_loss) <= 1e-5 * abs(cpu_loss)
  assert delta_error < 1e-4
  assert stats_error < 1e-5


# Stated tolerances for 20 steps of training on one repeated batch (the loss
# falls from ~0.69): every loss finite, and each step's loss within this
# fraction of float32's.
LOW_PRECISION_LOSS_TOLERANCE = {'bfloat16': 0.05, 'float16': 0.02}


@pytest.mark.parametrize('dtype', ['bfloat16', 'float16'])
def test_low_precision_tracks_float32_for_20_steps(dtype):
  batch = _batch(seed=1)
  reference = _Trainer(_config('float32'), 'gpu')
  low = _Trainer(_config(dtype), 'gpu', initial_state=None)
  ref_losses = [reference.step(batch) for _ in range(20)]
  losses = [low.step(batch) for _ in range(20)]
  worst = max(abs(a - b) / b for a, b in zip(losses, ref_losses))
  print(
    f'{dtype} vs float32, 20 steps: losses {losses[0]:.4f}->{losses[-1]:.4f} vs '
    f'{ref_losses[0]:.4f}->{ref_losses[-1]:.4f}; worst relative gap {worst:.4f}'
  )
  assert np.all(np.isfinite(losses))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(low.state.params)))
  assert losses[-1] < losses[0]  # It trains.
  assert worst <= LOW_PRECISION_LOSS_TOLERANCE[dtype]


# ------------------------------------------------------------------ end to end --


def _run(command, env_overrides=None, timeout=400):
  env = dict(os.environ, **(env_overrides or {}))
  result = subprocess.run(
    [sys.executable, '-m', *command],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope='module')
def demo_records(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('demo_tfds'))
  _run(
    [
      'input_pipeline.build',
      '--manual_dir',
      'demo_data',
      '--data_dir',
      data_dir,
      '--image_size',
      '128',
      '--allow_subset',
    ]
  )
  return data_dir


@pytest.fixture(scope='module')
def gpu_run(demo_records, tmp_path_factory):
  """`chexnet_jax.main`, 30 steps of the tiny model on the GPU, on the demo records."""
  workdir = str(tmp_path_factory.mktemp('gpu_run') / 'run')
  _run(
    [
      'chexnet_jax.main',
      '--config',
      'configs/demo.py',
      '--workdir',
      workdir,
      f'--config.data_dir={demo_records}',
      '--config.model=tiny',
      '--config.num_train_steps=30',
      '--config.log_every_steps=10',
      '--config.checkpoint_every_steps=30',
    ]
  )
  return workdir


def test_main_runs_30_steps_on_the_gpu(gpu_run):
  with open(os.path.join(gpu_run, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  losses = [r['train_loss'] for r in records if 'train_loss' in r]
  assert [r['step'] for r in records if 'train_loss' in r] == [10, 20, 30]
  assert np.all(np.isfinite(losses))
  assert any('val_mean_auroc' in r for r in records)


def _auroc_table(workdir, platforms):
  _run(
    [
      'chexnet_jax.evaluate',
      '--workdir',
      workdir,
      '--split',
      'test',
      '--bootstrap',
      '20',
      '--gallery',
      '0',
    ],
    {'JAX_PLATFORMS': platforms},
  )
  with open(os.path.join(workdir, 'eval', 'test', 'auroc.csv')) as f:
    rows = [line.strip().split(',') for line in f][1:]
  return {row[0]: float(row[1]) for row in rows if row[1] not in ('', 'nan')}


def test_evaluate_on_gpu_gives_the_cpu_aurocs(gpu_run):
  gpu = _auroc_table(gpu_run, 'cuda,cpu')
  cpu = _auroc_table(gpu_run, 'cpu')
  print('test AUROC GPU vs CPU:', {k: (round(gpu[k], 4), round(cpu[k], 4)) for k in cpu})
  assert gpu.keys() == cpu.keys() and len(cpu) >= 5
  for label in cpu:
    assert abs(gpu[label] - cpu[label]) <= 1e-3, label
