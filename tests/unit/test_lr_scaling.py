"""lr_scaling: the 'sqrt_adam' rule (Malladi et al. 2022) and the hardware
configs' rates, which may not exceed the square-root rule's."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from chexnet_jax.training import config_checks
from chexnet_jax.training import lr_scaling
from chexnet_jax.training import train_state
from configs import default


def _config(**overrides):
  config = default.get_config()
  config.update(overrides)
  return config


def test_sqrt_adam_scales_the_rate_b2_and_eps_with_the_batch():
  config = _config(batch_size=1024, lr_base_batch_size=64, learning_rate=1e-3)
  config.lr_scaling = 'sqrt_adam'
  assert lr_scaling.peak_learning_rate(config) == pytest.approx(4e-3)
  hyper = lr_scaling.adam_hyperparameters(config)
  assert hyper['b1'] == config.b1  # Left alone: 16 x (1 - 0.9) > 1.
  assert hyper['b2'] == pytest.approx(1 - 16 * (1 - config.b2))  # 0.984
  assert hyper['eps'] == pytest.approx(config.adam_eps / 4)
  config.batch_size = 64  # The base batch: Adam as configured.
  assert lr_scaling.adam_hyperparameters(config) == {
    'b1': config.b1,
    'b2': config.b2,
    'eps': config.adam_eps,
  }


@pytest.mark.parametrize('rule', ['none', 'sqrt', 'linear'])
def test_other_rules_leave_adam_as_configured(rule):
  config = _config(batch_size=1024, lr_scaling=rule)
  assert lr_scaling.adam_hyperparameters(config)['b2'] == config.b2


def test_the_optimizer_uses_the_scaled_b2_and_eps():
  """Two Adam steps of the trainer's optimizer equal optax's Adam with b2 0.984
  and eps / 4, and differ from b2 0.999 (the second step depends on b2)."""
  config = _config(batch_size=1024, lr_scaling='sqrt_adam', warmup_epochs=0.0, weight_decay=0.0)
  config.adam_eps = 1e-3  # Large enough that its scaling shows.
  tx, _ = train_state.create_optimizer(config, steps_per_epoch=4, total_steps=8)
  expected = optax.adamw(4e-3, b1=0.9, b2=0.984, eps=2.5e-4, weight_decay=0.0)
  unscaled = optax.adamw(4e-3, b1=0.9, b2=0.999, eps=1e-3, weight_decay=0.0)

  def two_steps(optimizer):
    params = jnp.zeros(3)
    state = optimizer.init(params)
    for grad in (jnp.array([1.0, -2.0, 0.5]), jnp.array([3.0, 0.1, -1.0])):
      updates, state = optimizer.update(grad, state, params)
      params = optax.apply_updates(params, updates)
    return np.asarray(jax.device_get(params))

  np.testing.assert_allclose(two_steps(tx), two_steps(expected), rtol=1e-6)
  assert not np.allclose(two_steps(tx), two_steps(unscaled), rtol=1e-4)


def test_a_b2_the_batch_pushes_out_of_range_is_a_config_error():
  config = _config(batch_size=1024, lr_scaling='sqrt_adam', b2=0.9)  # 1 - 16 x 0.1 < 0.
  with pytest.raises(config_checks.ConfigError, match=r"sqrt_adam' at batch_size=1024"):
    config_checks.validate(config, devices=jax.devices()[:1])


@pytest.mark.parametrize('name', ['default', 'v100x1', 'v100x4', 'v100x16', 'h100x1'])
def test_hardware_configs_stay_at_or_below_the_sqrt_rule(name):
  """No evidence on real data backs more than sqrt(B / 64) x 1e-3 for Adam."""
  config = importlib.import_module(f'configs.{name}').get_config()
  sqrt_rate = config.learning_rate * math.sqrt(config.batch_size / config.lr_base_batch_size)
  assert lr_scaling.peak_learning_rate(config) <= sqrt_rate * (1 + 1e-9)
