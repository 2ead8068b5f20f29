"""The train state, the optimizer and its learning-rate schedules.

The state is built directly on the mesh, replicated (`jax.eval_shape` for its
shapes, `jax.jit(..., out_shardings=...)` to compute it), so no host ever holds
a copy; `abstract_train_state` gives the same shapes for restoring a checkpoint.
`config.init_from` starts it from ImageNet or another weights file
(weights.py), or from a trained run's best checkpoint (run_weights.py: fine-tuning).
"""

from typing import Any

import flax
from flax.training import dynamic_scale as dynamic_scale_lib
import jax
import jax.numpy as jnp
import optax

from chexnet_jax.model import imagenet_weights
from chexnet_jax.training import lr_scaling
from chexnet_jax.model import densenet
from chexnet_jax.run import run_weights
from chexnet_jax.runtime import sharding
from chexnet_jax.model import weights


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  plateau: Any  # optax.contrib.reduce_on_plateau state; .scale is used.
  dynamic_scale: Any  # flax DynamicScale for float16, else None.

  @property
  def variables(self):
    return {'params': self.params, 'batch_stats': self.batch_stats}


# ---------------------------------------------------------------- optimizer --


def create_optimizer(config, steps_per_epoch, total_steps):
  """Adam(W) with the configured schedule -> (optax transform, schedule).

  The peak rate, its batch-scaling rule and warmup: chexnet_jax/training/lr_scaling.py.
  """
  schedule = lr_scaling.make_schedule(config, steps_per_epoch, total_steps)
  tx = optax.adamw(
    schedule, **lr_scaling.adam_hyperparameters(config), weight_decay=config.weight_decay
  )
  if config.fused_optimizer:  # Same numbers, one buffer per statistic.
    tx = optax.flatten(tx)
  return tx, schedule


def create_plateau(config):
  """CheXNet: LR x `plateau_factor` when validation loss stops improving.

  `plateau_patience` has PyTorch's meaning (as in CheXNet): that many bad
  epochs are tolerated and the next one cuts. optax cuts at the patience-th.
  """
  return optax.contrib.reduce_on_plateau(
    factor=config.plateau_factor, patience=config.plateau_patience + 1
  )


def update_plateau(config, state, val_loss):
  """Feeds one epoch's validation loss to the plateau rule (host side)."""
  if config.lr_schedule != 'plateau':
    return state
  _, plateau = create_plateau(config).update(
    updates={}, state=state.plateau, value=jnp.asarray(val_loss)
  )
  return state.replace(plateau=plateau)


# -------------------------------------------------------------------- state --


def build_model(config, *, for_training=False):
  """The configured model; for the train step BN syncs over 'data' if asked, and its
  dense layers are fused if asked. Evaluation's model is never fused: it runs under a
  plain jit, where XLA cannot partition a Pallas kernel over the devices (it would gather
  the batch onto each), and its numbers are the same to rounding."""
  bn_sync = for_training and config.bn_sync
  return densenet.from_config(
    config,
    bn_axis_name=sharding.DATA_AXIS if bn_sync else None,
    fused_dense_layer=for_training and config.fused_dense_layer,
  )


def init_variables(config, model, rng):
  size = config.image_size
  dummy = jnp.zeros((1, size, size, 3), densenet.DTYPES[config.dtype])
  return model.init(rng, dummy, train=False)


def create_train_state(config, model, mesh, tx, label_names):
  """Initialises the replicated state directly on the mesh (no host copy);
  `label_names` (the run's) map a pretrained head's rows by name."""

  def state_from(variables):
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(variables['params']),
      plateau=create_plateau(config).init(variables['params']),
      dynamic_scale=(dynamic_scale_lib.DynamicScale() if config.dtype == 'float16' else None),
    )

  def init():
    return init_variables(config, model, jax.random.key(config.seed))

  on_mesh = sharding.replicated(mesh)
  init_from = imagenet_weights.init_path(config)  # 'imagenet': downloaded.
  if init_from is None:
    return jax.jit(lambda: state_from(init()), out_shardings=on_mesh)()
  # Reading files cannot be traced: initialise (for the head, which an ImageNet
  # file lacks, and a new label's row), load on the host, then place on the mesh.
  fresh = jax.device_get(jax.jit(init)())
  names = tuple(label_names)
  if run_weights.is_run(init_from):  # A trained run: fine-tune it.
    variables = run_weights.fine_tune_variables(
      init_from, fresh, model=config.model, label_names=names
    )
  else:
    variables = weights.load_pretrained(init_from, fresh, label_names=names)
  return jax.jit(state_from, out_shardings=on_mesh)(jax.device_put(variables, on_mesh))


def abstract_train_state(config, model, mesh, tx):
  """Shapes and shardings of the train state, without computing it."""
  no_init = config.copy_and_resolve_references()
  no_init.init_from = ''  # Restoring overwrites the weights anyway.
  shapes = jax.eval_shape(lambda: create_train_state(no_init, model, mesh, tx, ()))
  on_mesh = sharding.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_mesh), shapes)
