"""The sharded train step: sync-BN equivalence across device counts, the
per-device BN switch, float16 loss scaling and the non-finite loss guard."""

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from input_pipeline import labels as labels_lib
from chexnet_jax.training import lr_scaling
from chexnet_jax.runtime import sharding
from chexnet_jax.training import train_state
from chexnet_jax.training import train_step
from configs import cpu_smoke


def _config(**overrides):
  config = cpu_smoke.get_config()
  config.batch_size = 16
  config.num_classes = len(labels_lib.LABELS)  # The trainer fills it from the dataset.
  config.update(overrides)
  return config


def _batches(config, count, seed=0):
  rng = np.random.default_rng(seed)
  size = config.image_size
  for _ in range(count):
    yield {
      'image': rng.integers(0, 256, (config.batch_size, size, size, 1), dtype=np.uint8),
      'labels': (rng.random((config.batch_size, 14)) < 0.3).astype(np.float32),
      'mask': np.ones(config.batch_size, bool),
      'index': np.arange(config.batch_size, dtype=np.int32),
    }


def _train(config, devices, steps=3):
  """Runs `steps` steps on a mesh of `devices`; returns (params, losses)."""
  mesh = Mesh(np.array(devices), (sharding.DATA_AXIS,))
  tx, schedule = train_state.create_optimizer(config, steps, steps)
  model = train_state.build_model(config, for_training=True)
  state = train_state.create_train_state(config, model, mesh, tx, labels_lib.LABELS)
  step = train_step.make_train_step(config, model, mesh, tx, schedule)
  losses = []
  for batch in _batches(config, steps):
    state, metrics = step(state, sharding.to_global(batch, mesh))
    losses.append(float(metrics['train_loss']))
  return jax.device_get(state), losses


def _max_difference(a, b):
  return max(
    jax.tree.leaves(
      jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    )
  )


def test_sync_bn_on_4_devices_equals_1_device_with_same_global_batch():
  # Adam divides by sqrt(v) + eps: with the default eps a gradient that is
  # zero up to rounding (1e-9) gets a full-size, sign-random update. A larger
  # eps keeps the comparison about the gradients, not that amplified noise.
  config = _config(bn_sync=True, adam_eps=1e-3)
  one, losses_one = _train(config, jax.devices()[:1])
  four, losses_four = _train(config, jax.devices()[:4])
  np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
  assert _max_difference(one.params, four.params) < 1e-5
  assert _max_difference(one.batch_stats, four.batch_stats) < 1e-5
  assert int(four.step) == 3


def test_per_device_bn_uses_each_devices_own_statistics():
  # Same data, same init: only where BN statistics come from differs.
  sync, _ = _train(_config(bn_sync=True, adam_eps=1e-3), jax.devices()[:4])
  local, _ = _train(_config(bn_sync=False, adam_eps=1e-3), jax.devices()[:4])
  assert _max_difference(sync.params, local.params) > 1e-4


def test_float16_uses_dynamic_loss_scaling_and_keeps_float32_params():
  state, losses = _train(_config(dtype='float16'), jax.devices()[:2])
  assert all(np.isfinite(losses))
  assert state.dynamic_scale is not None and float(state.dynamic_scale.scale) > 0
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype('float32')}
  assert {x.dtype for x in jax.tree.leaves(state.batch_stats)} == {np.dtype('float32')}


def test_fused_optimizer_takes_the_same_steps_with_one_buffer_per_statistic():
  # A larger eps, as above: the comparison is of the update, not of rounding noise amplified.
  per_leaf, losses = _train(_config(adam_eps=1e-3), jax.devices()[:2])
  fused, fused_losses = _train(_config(adam_eps=1e-3, fused_optimizer=True), jax.devices()[:2])
  np.testing.assert_allclose(fused_losses, losses, rtol=1e-6)
  assert _max_difference(per_leaf.params, fused.params) < 1e-6
  count = len(jax.tree.leaves(per_leaf.params))
  # adamw's mu and nu (and a step count), one vector each instead of one per parameter.
  assert len(jax.tree.leaves(per_leaf.opt_state)) > 2 * count
  assert len(jax.tree.leaves(fused.opt_state)) <= 4 < count


def test_resuming_with_the_other_optimizer_layout_is_refused_in_one_sentence(tmp_path):
  """A run from before config.fused_optimizer (its run.json has no optimizer_state)
  resumes per parameter; asking it for the flat layout is refused before any restore."""
  import json

  from chexnet_jax.run import run_dir

  workdir = str(tmp_path)
  older = run_dir.run_identity(_config(), labels_lib.LABELS, {'name': 'synthetic'})
  del older['optimizer_state']
  with open(tmp_path / run_dir.IDENTITY_FILE, 'w') as f:
    json.dump(older, f)
  run_dir.check_or_write_identity(
    workdir, run_dir.run_identity(_config(), labels_lib.LABELS, {'name': 'synthetic'})
  )
  fused = run_dir.run_identity(
    _config(fused_optimizer=True), labels_lib.LABELS, {'name': 'synthetic'}
  )
  with pytest.raises(run_dir.RunMismatchError) as error:
    run_dir.check_or_write_identity(workdir, fused)
  message = str(error.value)
  assert "optimizer_state: run has 'per_parameter', config asks for 'flat'" in message
  assert 'config.fused_optimizer' in message and message.count('\n') == 0


def test_compiler_options_set_gpu_command_buffers_unless_xla_default():
  assert train_step.compiler_options(_config(gpu_command_buffers='')) is None
  options = train_step.compiler_options(_config())
  assert 'CONVOLUTION' in options['xla_gpu_enable_command_buffer'].split(',')
  # Opt-in only: public reports of slowdowns, hangs and leaks (configs/default.py).
  assert 'COLLECTIVES' not in options['xla_gpu_enable_command_buffer'].split(',')


def test_poisoned_step_yields_nan_loss():
  _, losses = _train(_config(debug_nan_at_step=1), jax.devices()[:2])
  assert np.isfinite(losses[0]) and np.isnan(losses[1])


@pytest.mark.parametrize('rule, expected', [('none', 1e-3), ('sqrt', 4e-3), ('linear', 16e-3)])
def test_learning_rate_scaling_rules(rule, expected):
  config = _config(learning_rate=1e-3, lr_base_batch_size=64, batch_size=1024, lr_scaling=rule)
  assert lr_scaling.peak_learning_rate(config) == pytest.approx(expected)


def test_plateau_schedule_warms_up_from_the_unscaled_rate():
  """Horovod's warmup: from lr / N (N = batch / base batch) to the peak."""
  config = _config(
    learning_rate=1e-3, lr_base_batch_size=64, batch_size=1024, lr_scaling='none', warmup_epochs=2.0
  )
  _, schedule = train_state.create_optimizer(config, steps_per_epoch=5, total_steps=50)
  assert float(schedule(0)) == pytest.approx(1e-3 / 16, rel=1e-5)
  assert float(schedule(5)) == pytest.approx((1e-3 / 16 + 1e-3) / 2, rel=1e-5)
  assert float(schedule(10)) == pytest.approx(1e-3, rel=1e-5)
  assert float(schedule(49)) == pytest.approx(1e-3, rel=1e-5)


def test_warmup_cosine_schedule_warms_up_then_decays():
  config = _config(lr_schedule='warmup_cosine', warmup_epochs=1.0)
  _, schedule = train_state.create_optimizer(config, steps_per_epoch=10, total_steps=100)
  peak = lr_scaling.peak_learning_rate(config)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(peak)
  assert float(schedule(99)) < 0.01 * peak


def test_plateau_cuts_learning_rate_after_patience_epochs():
  config = _config(plateau_patience=1, plateau_factor=0.1)
  mesh = Mesh(np.array(jax.devices()[:1]), (sharding.DATA_AXIS,))
  tx, _ = train_state.create_optimizer(config, 1, 1)
  model = train_state.build_model(config)
  state = train_state.create_train_state(config, model, mesh, tx, labels_lib.LABELS)
  scales = []
  for val_loss in (1.0, 0.9, 0.95, 0.96):  # Two bad epochs after the best.
    state = train_state.update_plateau(config, state, val_loss)
    scales.append(float(state.plateau.scale))
  assert scales == pytest.approx([1.0, 1.0, 1.0, 0.1])


# ------------------------------------------------ the words of a stopped run --


class _NoCheckpointYet:
  """A checkpoint manager before its first save (the part check_finite reads)."""

  directory = '/runs/r/checkpoints'

  def wait_until_finished(self):
    pass

  def latest_step(self):
    return None


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_a_nan_before_any_checkpoint_offers_only_the_fixes_that_apply(dtype):
  from chexnet_jax.training import train

  with pytest.raises(train.NonFiniteLossError) as stopped:
    train.check_finite(1, float('nan'), _NoCheckpointYet(), dtype)
  message = str(stopped.value)
  assert message.startswith('Training loss is nan at step 1; the run stopped. No checkpoint')
  assert 'step None' not in message and 'resume' not in message, message
  assert ('use float32' in message) == (dtype != 'float32'), message


def test_a_full_disk_before_the_first_checkpoint_does_not_offer_to_resume(tmp_path):
  import errno
  import types

  from chexnet_jax.run import checkpoints
  from chexnet_jax.run import run_dir

  manager = types.SimpleNamespace(directory=str(tmp_path))
  with pytest.raises(run_dir.WorkdirError) as stopped:
    with checkpoints._write_errors(manager):
      raise OSError(errno.ENOSPC, 'No space left on device')
  message = str(stopped.value)
  assert '(No space left on device)' in message and 'No checkpoint was complete yet' in message
  assert 'step none' not in message and 'resume' not in message, message


def _guarded_run(config, devices, steps=4, failing=None):
  """`_train` through train_step.StepWithFallback -> (params, losses, step, built kinds).

  `failing(step_fn)` wraps each step built with command buffers, to inject a failure.
  """
  mesh = Mesh(np.array(devices), (sharding.DATA_AXIS,))
  tx, schedule = train_state.create_optimizer(config, steps, steps)
  model = train_state.build_model(config, for_training=True)
  state = train_state.create_train_state(config, model, mesh, tx, labels_lib.LABELS)
  built = []

  def build(config):
    built.append(config.gpu_command_buffers)
    step_fn = train_step.make_train_step(config, model, mesh, tx, schedule)
    return failing(step_fn) if (failing and config.gpu_command_buffers) else step_fn

  step = train_step.StepWithFallback(config, build)
  losses = []
  for batch in _batches(config, steps):
    state, metrics = step(state, sharding.to_global(batch, mesh))
    losses.append(float(metrics['train_loss']))
  return jax.device_get(state.params), losses, step, built


def _fails_at_second_call(error_text):
  def failing(step_fn):
    calls = []

    def step(state, batch):
      calls.append(1)
      result = step_fn(state, batch)  # Consumes the donated state, as a real failure may.
      if len(calls) == 2:
        raise jax.errors.JaxRuntimeError(error_text)
      return result

    return step

  return failing


def _fallback_lines(caplog):
  return [r.getMessage() for r in caplog.records if 'command buffers' in r.getMessage()]


def test_failed_capture_is_one_line_and_training_goes_on_with_xla_default(caplog):
  config = _config()
  assert config.gpu_command_buffers  # The default captures more than XLA's default.
  plain, plain_losses, _, _ = _guarded_run(_config(gpu_command_buffers=''), jax.devices()[:2])
  params, losses, step, built = _guarded_run(
    config,
    jax.devices()[:2],
    failing=_fails_at_second_call('INTERNAL: Failed to capture gpu graph'),
  )
  assert built == [config.gpu_command_buffers, '']
  assert losses == plain_losses  # The retried step ran on the state kept before the call.
  assert _max_difference(params, plain) == 0
  lines = _fallback_lines(caplog)
  assert len(lines) == 1 and 'Failed to capture gpu graph' in lines[0], lines
  assert "going on with XLA's default command buffers" in lines[0]
  assert step.config.gpu_command_buffers == '' and not step.guarded


def test_a_kind_xla_refuses_falls_back_when_compiling_and_when_called(caplog):
  # XLA parses the kinds on CPU too: an unknown one fails the compile with INVALID_ARGUMENT.
  config = _config(gpu_command_buffers='FUSION,NOT_A_KIND')
  _, losses, step, built = _guarded_run(config, jax.devices()[:1], steps=2)
  assert built == ['FUSION,NOT_A_KIND', ''] and all(np.isfinite(losses))
  assert "'NOT_A_KIND' is not a valid enum value" in step.fallback_reason
  assert len(_fallback_lines(caplog)) == 1


def test_compile_falls_back_for_a_refused_kind():
  config = _config(gpu_command_buffers='FUSION,NOT_A_KIND')
  devices = jax.devices()[:1]
  mesh = Mesh(np.array(devices), (sharding.DATA_AXIS,))
  tx, schedule = train_state.create_optimizer(config, 1, 1)
  model = train_state.build_model(config, for_training=True)
  state = train_state.create_train_state(config, model, mesh, tx, labels_lib.LABELS)
  step = train_step.StepWithFallback(
    config, lambda config: train_step.make_train_step(config, model, mesh, tx, schedule)
  )
  batch = sharding.to_global(next(_batches(config, 1)), mesh)
  assert step.compile(state, batch) is not None
  assert step.config.gpu_command_buffers == '' and 'NOT_A_KIND' in step.fallback_reason
  _, metrics = step(state, batch)
  assert np.isfinite(float(metrics['train_loss']))


def test_other_errors_are_not_taken_for_command_buffer_failures():
  failing = _fails_at_second_call('RESOURCE_EXHAUSTED: Out of memory allocating 1 GiB')
  with pytest.raises(jax.errors.JaxRuntimeError, match='Out of memory'):
    _guarded_run(_config(), jax.devices()[:1], steps=2, failing=failing)
  assert not train_step.is_command_buffer_failure(ValueError('Failed to capture gpu graph'))
  other = jax.errors.JaxRuntimeError('INVALID_ARGUMENT: no capture group 2 in the pattern')
  assert not train_step.is_command_buffer_failure(other)
  for text in (
    'INTERNAL: Failed to capture gpu graph: operation not permitted',
    'INTERNAL: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED: operation failed due to a previous error',
    "INVALID_ARGUMENT: While setting option xla_gpu_enable_command_buffer, 'X' is not valid",
  ):
    assert train_step.is_command_buffer_failure(jax.errors.JaxRuntimeError(text))
