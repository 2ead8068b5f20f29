"""The sharded train step and its loss.

One code path for 1 device and N devices, one process and many: the step runs
under `jax.shard_map` over the 1-D mesh (axis 'data'). Inside it each device
sees its shard of the batch, so BatchNorm computes per-device statistics (as
Horovod and PyTorch DDP do) unless `config.bn_sync`, which gives BatchNorm the
axis name and so global-batch statistics. Gradients, loss and BN running
statistics are averaged over the axis, so the state stays replicated and
identical.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import optax

from chexnet_jax.model import losses
from chexnet_jax.model import densenet
from chexnet_jax.model import preprocessing
from chexnet_jax.runtime.sharding import DATA_AXIS


def make_train_step(config, model, mesh, tx, schedule, loss_weights=None):
  """Returns jitted (state, global batch) -> (state, metrics). Donates state.

  `model` comes from `train_state.build_model(config, for_training=True)`, so
  that BatchNorm knows whether to synchronise over 'data'.
  """
  dtype = densenet.DTYPES[config.dtype]
  # (w_pos, w_neg) per label from losses.label_weights, or None: plain BCE.
  loss_weights = None if loss_weights is None else tuple(jnp.asarray(w) for w in loss_weights)

  def loss_fn(params, batch_stats, images, labels, step):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    loss = losses.bce_loss(logits, labels, loss_weights).mean()
    # Fault injection for the tests: a poisoned loss at one chosen step.
    loss = jnp.where(step == config.debug_nan_at_step, jnp.nan, loss)
    return loss, updates['batch_stats']

  def local_step(state, batch):
    images = preprocessing.normalize(batch['image'], dtype)
    args = (state.batch_stats, images, batch['labels'], state.step)
    if state.dynamic_scale is None:
      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, *args)
      grads, batch_stats = pmean_as_one((grads, batch_stats))
      dynamic_scale, grads_finite = None, jnp.bool_(True)
    else:
      dynamic_scale, grads_finite, (loss, batch_stats), grads = state.dynamic_scale.value_and_grad(
        loss_fn, has_aux=True, axis_name=DATA_AXIS
      )(state.params, *args)
      batch_stats = pmean_as_one(batch_stats)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.plateau.scale, updates)
    new_state = state.replace(
      step=state.step + 1,
      params=optax.apply_updates(state.params, updates),
      opt_state=opt_state,
      batch_stats=batch_stats,
      dynamic_scale=dynamic_scale,
    )
    # float16: an overflowing step is skipped (the loss scale backs off).
    new_state = _keep_if_finite(grads_finite, new_state, state)
    metrics = {
      'train_loss': jax.lax.pmean(loss, DATA_AXIS),
      'learning_rate': schedule(state.step) * state.plateau.scale,
      'grads_finite': grads_finite,
    }
    return new_state, metrics

  spec = jax.sharding.PartitionSpec
  # check_vma=False: the step is written per device, as Horovod's is, with
  # explicit pmeans. With the check on, JAX would treat the replicated params
  # as device-invariant and sum their gradients over 'data' by itself in the
  # backward pass, so the pmean above would average an already summed value.
  step_fn = jax.shard_map(
    local_step,
    mesh=mesh,
    in_specs=(spec(), spec(DATA_AXIS)),
    out_specs=(spec(), spec()),
    check_vma=False,
  )
  return jax.jit(step_fn, donate_argnums=0, compiler_options=compiler_options(config))


# XLA's command-buffer kinds (xla/debug_options_flags.cc), for config.gpu_command_buffers.
COMMAND_BUFFER_KINDS = (
  'FUSION',
  'CUBLAS',
  'CUBLASLT',
  'CUSTOM_CALL',
  'CUDNN',
  'DYNAMIC_SLICE_FUSION',
  'DYNAMIC_SLICE_COPY_FUSION',
  'CONVOLUTION',
  'COLLECTIVES',
  'CONDITIONAL',
  'WHILE',
)


def compiler_options(config):
  """XLA options of the step: the GPU command-buffer kinds, unless XLA's default."""
  kinds = config.gpu_command_buffers
  return {'xla_gpu_enable_command_buffer': kinds} if kinds else None


def pmean_as_one(tree):
  """pmean over 'data' of a float32 pytree as one flat vector: one all-reduce.

  Leaf by leaf, XLA's combiner still left 62 all-reduces per DenseNet121 step
  (benchmarks/SCALING.md), each paying NCCL's fixed cost; the mean is the same.
  """
  flat, unravel = jax.flatten_util.ravel_pytree(tree)
  return unravel(jax.lax.pmean(flat, DATA_AXIS))


def _keep_if_finite(is_finite, new_state, old_state):
  """Keeps every leaf of `new_state` except on a non-finite float16 step."""
  kept = jax.tree.map(
    lambda new, old: jnp.where(is_finite, new, old),
    new_state.replace(dynamic_scale=None),
    old_state.replace(dynamic_scale=None),
  )
  return kept.replace(step=new_state.step, dynamic_scale=new_state.dynamic_scale)
