"""The sharded train step and its loss.

One code path for 1 device and N devices, one process and many: the step runs
under `jax.shard_map` over the 1-D mesh (axis 'data'). Inside it each device
sees its shard of the batch, so BatchNorm computes per-device statistics (as
Horovod and PyTorch DDP do) unless `config.bn_sync`, which gives BatchNorm the
axis name and so global-batch statistics. Gradients, loss and BN running
statistics are averaged over the axis, so the state stays replicated and
identical.
"""

from absl import logging
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
  """XLA options of the step: the GPU command-buffer kinds, unless XLA's default.

  Passed to jit on every backend: XLA parses the option on CPU too (and refuses
  a kind it does not know there), though only the GPU backend acts on it.
  """
  kinds = config.gpu_command_buffers
  return {'xla_gpu_enable_command_buffer': kinds} if kinds else None


# Calls checked before a step runs unguarded: XLA records a command buffer (CUDA graph)
# at the step's first executions, so a capture that fails does so at the first or second.
GUARDED_CALLS = 3

# Words of XLA's and CUDA's errors about command buffers: a kind the installed XLA refuses
# ("While setting option xla_gpu_enable_command_buffer, 'X' is not a valid enum value"), a
# CUDA graph that failed to capture ("Failed to capture gpu graph",
# CUDA_ERROR_STREAM_CAPTURE_*, "... while stream is capturing") or to update. A bare
# "capture" is not among them: other errors use the word.
_COMMAND_BUFFER_WORDS = (
  'xla_gpu_enable_command_buffer',
  'command buffer',
  'commandbuffer',
  'gpu graph',
  'cuda graph',
  'stream capture',
  'stream_capture',
  'failed to capture',
  'is capturing',
)


def is_command_buffer_failure(error):
  """True for an XLA error about compiling or capturing command buffers."""
  text = str(error).lower()
  return isinstance(error, jax.errors.JaxRuntimeError) and any(
    word in text for word in _COMMAND_BUFFER_WORDS
  )


class StepWithFallback:
  """A train step that command buffers cannot break.

  `build(config)` returns the jitted step for `config`. While the step has run fewer
  than GUARDED_CALLS times with `config.gpu_command_buffers`' kinds, an XLA error
  about command buffers (compiling or capturing them) is logged in one line and the
  step is rebuilt with XLA's default kinds and run again on a copy of the state
  kept before the call (the failed call may have consumed the donated state).
  Any other error, or one after the guarded calls, propagates.
  """

  def __init__(self, config, build):
    self.config, self._build = config, build
    self._step = build(config)
    self._guarded = GUARDED_CALLS if config.gpu_command_buffers else 0
    self.fallback_reason = None  # The first line of the error, once it fell back.

  @property
  def guarded(self):
    """True while a call may still fall back (and so recompile)."""
    return self._guarded > 0

  def compile(self, *args):
    """Lowers and compiles the step for `args` (falling back as a call would) -> lowered."""
    try:
      lowered = self._step.lower(*args)
      self._step = lowered.compile()
    except jax.errors.JaxRuntimeError as error:
      if not (self._guarded and is_command_buffer_failure(error)):
        raise
      self._fall_back(error)
      lowered = self._step.lower(*args)
      self._step = lowered.compile()
    return lowered

  def __call__(self, state, batch):
    if not self._guarded:
      return self._step(state, batch)
    kept = _copy(state)
    try:
      result = jax.block_until_ready(self._step(state, batch))
    except jax.errors.JaxRuntimeError as error:
      if not is_command_buffer_failure(error):
        raise
      self._fall_back(error)
      return self._step(kept, batch)
    self._guarded -= 1
    return result

  def _fall_back(self, error):
    lines = str(error).strip().splitlines() or [type(error).__name__]
    self.fallback_reason = lines[0][:300]
    logging.warning(
      "Command buffers %r failed (%s); going on with XLA's default command buffers "
      '(config.gpu_command_buffers=).',
      self.config.gpu_command_buffers,
      self.fallback_reason,
    )
    self.config = _without_command_buffers(self.config)
    self._step = self._build(self.config)
    self._guarded = 0


def _without_command_buffers(config):
  config = config.copy_and_resolve_references()
  config.gpu_command_buffers = ''
  return config


@jax.jit
def _copy(tree):
  """A copy of `tree` in new buffers (the step donates its input state)."""
  return jax.tree.map(lambda x: x.copy() if hasattr(x, 'copy') else x, tree)


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
