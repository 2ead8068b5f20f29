"""The learning rate at a batch size, and its schedule (warmup, then plateau or cosine).

`config.learning_rate` holds at `config.lr_base_batch_size` images per step;
`config.lr_scaling` says how it changes with the global batch B:

- 'none': the same rate at every batch (the reference trainer: Adam 1e-3 on 1 to
  16 GPUs, i.e. batch 64 to 1024).
- 'sqrt': rate x sqrt(B / base) (the usual rule for Adam-type optimizers, and
  Malladi et al. 2022's for the rate; configs/default.py's).
- 'sqrt_adam': 'sqrt', and Adam's second-moment decay and epsilon follow the
  batch too, as in Malladi et al. 2022 ("On the SDEs and scaling rules for
  adaptive gradient algorithms", NeurIPS): with kappa = B / base, 1 - b2 becomes
  kappa (1 - b2) and eps becomes eps / sqrt(kappa). Their rule scales 1 - b1 too;
  that is left out because kappa (1 - 0.9) passes 1 at kappa = 10, so b1 would
  leave its range at the hardware configs' batch 1024 (kappa 16).
- 'linear': rate x B / base (Goyal et al. 2017's rule for SGD).

Each rule scales down below the base batch as it scales up above it (batch 16 at
base 64 under 'sqrt': half the rate); docs/configuration.md says why, and how to
get CheXNet's 1e-3 at batch 16.

Warmup (`config.warmup_epochs` > 0): the rate rises linearly from its value at
the base batch without scaling-up, rate x base / B (Horovod's lr / N when every
device holds the base batch), to the scaled peak. `lr_schedule='plateau'` then
holds the peak (reduce_on_plateau cuts it at epoch ends); 'warmup_cosine' decays
it to zero. The evidence for the rule the hardware configs use is in
benchmarks/LARGE_BATCH.md.
"""

import math

import optax

RULES = ('none', 'sqrt', 'sqrt_adam', 'linear')
# config.lr_schedule: 'plateau' holds the peak (cut by reduce_on_plateau),
# 'warmup_cosine' decays it to zero.
SCHEDULES = ('plateau', 'warmup_cosine')


def batch_ratio(config):
  return config.batch_size / config.lr_base_batch_size


def peak_learning_rate(config):
  """config.learning_rate scaled from lr_base_batch_size to batch_size."""
  rule = config.lr_scaling
  ratio = batch_ratio(config)
  if rule == 'none':
    return config.learning_rate
  if rule in ('sqrt', 'sqrt_adam'):
    return config.learning_rate * math.sqrt(ratio)
  if rule == 'linear':
    return config.learning_rate * ratio
  raise ValueError(
    f'config.lr_scaling={rule!r} is not one of {RULES}; set --config.lr_scaling to one of them.'
  )


def adam_hyperparameters(config):
  """{'b1', 'b2', 'eps'} for Adam at batch_size: as configured, but under
  'sqrt_adam' b2 and eps follow the batch (Malladi et al. 2022)."""
  b1, b2, eps = config.b1, config.b2, config.adam_eps
  if config.lr_scaling != 'sqrt_adam':
    return {'b1': b1, 'b2': b2, 'eps': eps}
  kappa = batch_ratio(config)
  scaled_b2 = 1.0 - kappa * (1.0 - b2)
  if scaled_b2 <= 0.0:
    raise ValueError(
      f"lr_scaling='sqrt_adam' at batch_size={config.batch_size} (kappa {kappa:g}) makes "
      f'b2 = 1 - kappa (1 - {b2}) = {scaled_b2:g}, not in (0, 1); raise config.b2 or use '
      "lr_scaling='sqrt'."
    )
  return {'b1': b1, 'b2': scaled_b2, 'eps': eps / math.sqrt(kappa)}


def make_schedule(config, steps_per_epoch, total_steps):
  """optax schedule: step -> learning rate (before any plateau cut)."""
  peak = peak_learning_rate(config)
  warmup_steps = int(config.warmup_epochs * steps_per_epoch)
  if config.lr_schedule == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1)
    )
  if warmup_steps <= 0:
    return optax.constant_schedule(peak)
  start = min(peak, config.learning_rate / max(batch_ratio(config), 1.0))
  return optax.join_schedules(
    [optax.linear_schedule(start, peak, warmup_steps), optax.constant_schedule(peak)],
    [warmup_steps],
  )
