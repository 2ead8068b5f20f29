"""DenseNet (Huang et al. 2017) in Flax linen, layer for layer as torchvision.

Module names follow torchvision's `features.*` names (conv0, norm0, denseblock1/
denselayer1/norm1, transition1/conv, norm5, classifier) so that weight files map
onto the parameter tree by name (see weights.py). Layout is NHWC.

Parameters and BatchNorm statistics are float32; `dtype` only sets the compute
dtype of convolutions and normalisation. Pooling and the head run in float32, so
logits (and the CAM features) are always float32.

Training BatchNorm in a dense block normalises the concatenation of every feature
map made so far, so each layer would re-reduce all earlier maps for its batch
statistics. Per channel those statistics are the maps' own: they are computed once,
when a map is made (`batch_moments`), and concatenated (`BatchNorm` takes them).
The same numbers (to float32 rounding), a fraction of the bytes read. Every BatchNorm
is followed by a ReLU, and the pair has a hand-arranged gradient (`batch_norm_relu`):
autodiff's writes the masked output gradient, as large as the layer's input, and reads
it three times.

BatchNorm keeps torch's running variance: what training averages into it is the
*unbiased* batch variance (x n/(n-1)), as torch's BatchNorm2d does (flax's puts in the
biased one); the batch itself is normalised by the biased variance, in both. The
batch variance is flax's one-pass form (E[x^2] - E[x]^2; torch's is two-pass: the two
differ by float32 rounding).
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from chexnet_jax.model import fused_dense_layer
from input_pipeline import labels as labels_lib

# torchvision's BatchNorm2d: momentum 0.1 (Flax counts the other way: 0.9),
# epsilon 1e-5. Keras applications use epsilon 1.001e-5; the difference is
# below float32 noise for trained weights, and parity tests set it exactly.
BN_MOMENTUM = 0.9
TORCH_BN_EPSILON = 1e-5
KERAS_BN_EPSILON = 1.001e-5

# name -> (block sizes, growth rate, initial features).
ARCHITECTURES = {
  'densenet121': ((6, 12, 24, 16), 32, 64),
  'densenet169': ((6, 12, 32, 32), 32, 64),
  'densenet201': ((6, 12, 48, 32), 32, 64),
  # Compiles in seconds on 32-64 px images: for tests and smoke runs only.
  'tiny': ((2, 2), 16, 32),
}

# config.dtype -> compute dtype (parameters stay float32).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def batch_moments(x):
  """(mean, mean of squares) per channel of NHWC `x`, in float32: a BatchNorm's batch
  statistics before any averaging over devices (flax's fast variance, float32)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.mean(x, axis=(0, 1, 2)), jnp.mean(jnp.square(x), axis=(0, 1, 2))


def concat_moments(*parts):
  """The moments of a channel concatenation: each part's, concatenated."""
  return tuple(jnp.concatenate(column) for column in zip(*parts))


def _bessel(count, axis_name):
  """n/(n-1) for n = `count` values per channel on each device on `axis_name`: torch's
  running variance averages the unbiased batch variance."""
  if axis_name is not None:  # Statistics over every device on the axis (a Python int).
    count = count * jax.lax.psum(1, axis_name)
  return count / max(count - 1, 1)


class BatchNorm(nn.Module):
  """TorchBatchNorm's numbers (flax's fast variance, float32 statistics, the same
  variables; torch's unbiased running variance), whose batch moments may be given:
  `moments` from `batch_moments` of the same `x`."""

  use_running_average: bool
  momentum: float
  epsilon: float
  dtype: Any
  param_dtype: Any = jnp.float32
  axis_name: Any = None
  # Followed by a ReLU (batch_norm_relu: the same numbers, a leaner gradient).
  relu: bool = False
  # Return (mean, var, scale, bias) for a fused op to apply (fused_bn_relu_conv1x1).
  statistics_only: bool = False

  @nn.compact
  def __call__(self, x, moments=None):
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, mean2 = batch_moments(x) if moments is None else moments
      if self.axis_name is not None and not self.is_initializing():
        mean, mean2 = jax.lax.pmean(jnp.stack([mean, mean2]), self.axis_name)
      var = jnp.maximum(0.0, mean2 - jnp.square(mean))
      if not self.is_initializing():
        unbiased = var * _bessel(x.shape[0] * x.shape[1] * x.shape[2], self.axis_name)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, features, self.param_dtype)
    if self.statistics_only:
      return mean, var, scale, bias
    if self.relu:
      return batch_norm_relu(x, mean, var, scale, bias, self.epsilon, self.dtype)
    y = (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def batch_norm_relu(x, mean, var, scale, bias, epsilon, dtype):
  """relu((x - mean) / sqrt(var + epsilon) * scale + bias) as `dtype`, per channel of NHWC
  `x`. Its gradient is the one autodiff gives, arranged so that XLA makes it in one
  reduction over (dy, x), both sums at once, and an elementwise pass it can fuse into
  what consumes dx; autodiff's writes and re-reads the masked gradient."""
  return _batch_norm_relu_forward(x, mean, var, scale, bias, epsilon, dtype)[0]


def _batch_norm_relu_forward(x, mean, var, scale, bias, epsilon, dtype):
  multiplier = jax.lax.rsqrt(var + epsilon) * scale
  y = nn.relu(((x - mean) * multiplier + bias).astype(dtype))
  return y, (x, mean, var, scale, bias)


def _batch_norm_relu_backward(epsilon, dtype, saved, dy):
  x, mean, var, scale, bias = saved
  inverse_std = jax.lax.rsqrt(var + epsilon)
  centred = x - mean  # float32: mean is.
  # The ReLU's mask from the pre-activation, as autodiff's from its bfloat16 output.
  active = (centred * (inverse_std * scale) + bias).astype(dtype) > 0
  g = jnp.where(active, dy.astype(centred.dtype), 0.0)
  sum_g = jnp.sum(g, axis=(0, 1, 2))
  sum_g_centred = jnp.sum(g * centred, axis=(0, 1, 2))
  dx = (g * (inverse_std * scale)).astype(x.dtype)
  d_mean = -sum_g * inverse_std * scale
  d_var = -0.5 * sum_g_centred * scale * inverse_std**3
  return dx, d_mean, d_var, sum_g_centred * inverse_std, sum_g


batch_norm_relu.defvjp(_batch_norm_relu_forward, _batch_norm_relu_backward)


def _conv1x1(a, kernel, dtype):
  """nn.Conv's 1x1 convolution (no bias) of NHWC `a` by the float32 HWIO `kernel`."""
  return jax.lax.conv_general_dilated(
    a, kernel.astype(dtype), (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def fused_bn_relu_conv1x1(pieces, mean, var, scale, bias, kernel, epsilon, dtype):
  """conv1x1(batch_norm_relu(x, ...), kernel) as `dtype`, x the channel concatenation of
  the NHWC `pieces` (a tuple), with the per-channel sum and sum of squares of that output
  (float32): one Pallas kernel (fused_dense_layer) that reads the pieces in place, so
  neither x nor its normalisation is written to memory. Its gradient is autodiff's of the
  unfused ops (the convolution's, then batch_norm_relu's), in the same arithmetic, from
  two more kernels: the input's, and the kernel's (the normalisation recomputed)."""
  return _fused_forward(pieces, mean, var, scale, bias, kernel, epsilon, dtype)[0]


def _fused_forward(pieces, mean, var, scale, bias, kernel, epsilon, dtype):
  batch, height, width, _ = pieces[0].shape
  multiplier = jax.lax.rsqrt(var + epsilon) * scale  # batch_norm_relu's.
  y, sums, sumsqs = fused_dense_layer.bn_relu_matmul_sums(
    [piece.reshape(-1, piece.shape[-1]) for piece in pieces],
    mean,
    multiplier,
    bias,
    kernel.reshape(kernel.shape[2], -1),
    dtype,
  )
  y = y.reshape(batch, height, width, -1)
  return (y, sums, sumsqs), (pieces, mean, var, scale, bias, kernel, y)


def _fused_backward(epsilon, dtype, saved, cotangents):
  pieces, mean, var, scale, bias, kernel, y = saved
  dy, d_sums, d_sumsqs = cotangents
  # The sums' share in float32, rounded to y's dtype and added there, as autodiff of
  # batch_moments(y) beside norm2's own gradient gives it.
  y32 = y.astype(jnp.float32)
  dy = dy + (d_sums + d_sumsqs * (2.0 * y32)).astype(dy.dtype)
  inverse_std = jax.lax.rsqrt(var + epsilon)
  channels, features = kernel.shape[2:]
  flat_dy = dy.reshape(-1, features)
  flat_pieces = [piece.reshape(-1, piece.shape[-1]) for piece in pieces]
  # The kernel's: relu(bn(x))^T @ dy, rounded to `dtype` as the convolution's transpose
  # gives it, then float32 as the parameter; the normalisation recomputed, never written.
  d_kernel = fused_dense_layer.bn_relu_matmul_backward_kernel(
    flat_dy, flat_pieces, mean, inverse_std * scale, bias, dtype
  )
  d_kernel = d_kernel.astype(dtype).astype(kernel.dtype).reshape(kernel.shape)
  # The input's: _batch_norm_relu_backward of dy @ kernel^T, in one kernel.
  dx, sum_g, sum_g_centred = fused_dense_layer.bn_relu_matmul_backward_data(
    flat_dy,
    kernel.reshape(channels, features),
    flat_pieces,
    mean,
    inverse_std * scale,
    bias,
    dtype,
  )
  dx = tuple(d.reshape(piece.shape) for d, piece in zip(dx, pieces))
  d_mean = -sum_g * inverse_std * scale
  d_var = -0.5 * sum_g_centred * scale * inverse_std**3
  return dx, d_mean, d_var, sum_g_centred * inverse_std, sum_g, d_kernel


fused_bn_relu_conv1x1.defvjp(_fused_forward, _fused_backward)


class Conv1x1Kernel(nn.Module):
  """nn.Conv's 1x1 kernel parameter alone (its name, shape, dtype and initialiser), for a
  fused op to apply: weight files and checkpoints load either way."""

  features: int
  kernel_init: Any
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, channels):
    shape = (1, 1, channels, self.features)
    return self.param('kernel', self.kernel_init, shape, self.param_dtype)


@jax.custom_vjp
def max_pool_3x3_stride_2(x):
  """nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))) of NHWC `x`, whose
  gradient is dense: no select-and-scatter (its index tensors, zero fill and atomic
  scatter), the same values (the first maximum of each window in row-major order gets
  the gradient, as XLA's select-and-scatter with `ge` gives it)."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _max_pool_forward(x):
  y = max_pool_3x3_stride_2(x)
  return y, (x, y)


def _max_pool_backward(saved, dy):
  x, y = saved
  batch, height, width, channels = x.shape
  out_h, out_w = y.shape[1], y.shape[2]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  taken = jnp.zeros(y.shape, bool)
  dx = jnp.zeros(padded.shape, dy.dtype)
  for di in range(3):
    for dj in range(3):
      tap = jax.lax.slice(
        padded,
        (0, di, dj, 0),
        (batch, di + 2 * (out_h - 1) + 1, dj + 2 * (out_w - 1) + 1, channels),
        (1, 2, 2, 1),
      )
      chosen = (tap == y) & ~taken
      taken = taken | chosen
      # Back to the tap's input positions: every second row and column from (di, dj).
      dx = dx + jax.lax.pad(
        jnp.where(chosen, dy, jnp.zeros((), dy.dtype)),
        jnp.zeros((), dy.dtype),
        (
          (0, 0, 0),
          (di, height + 2 - di - (2 * out_h - 1), 1),
          (dj, width + 2 - dj - (2 * out_w - 1), 1),
          (0, 0, 0),
        ),
      )
  return (dx[:, 1 : height + 1, 1 : width + 1, :],)


max_pool_3x3_stride_2.defvjp(_max_pool_forward, _max_pool_backward)


def _norm_relu(norm, name, x, moments=None):
  """relu(norm(x)) named `name`, given the batch moments of x when they are known."""
  module = norm(name=name)
  y = module(x) if moments is None else module(x, moments=moments)
  return y if getattr(module, 'relu', False) else nn.relu(y)


class TorchBatchNorm(nn.BatchNorm):
  """nn.BatchNorm whose running variance averages the *unbiased* batch variance
  (x n/(n-1), n the values each statistic is computed over), as torch's
  BatchNorm2d does; flax's averages the biased one. The batch is normalised as
  before (by the biased variance, in both) and the running statistics are read
  as before, so only what training adds to them changes, and old checkpoints load
  unchanged. The variance itself is flax's one-pass form (module docstring)."""

  def __call__(self, x, use_running_average=None, *, mask=None):
    training = not nn.module.merge_param(
      'use_running_average', self.use_running_average, use_running_average
    )
    if not training or self.is_initializing() or mask is not None:
      return super().__call__(x, use_running_average, mask=mask)
    old = self.get_variable('batch_stats', 'var')
    y = super().__call__(x, use_running_average, mask=mask)
    new = self.get_variable('batch_stats', 'var')
    feature_axes = {a % x.ndim for a in ((self.axis,) if isinstance(self.axis, int) else self.axis)}
    n = math.prod(x.shape[a] for a in range(x.ndim) if a not in feature_axes)
    # new = m*old + (1-m)*biased: put the unbiased batch variance in its place.
    added = new - self.momentum * old
    self.put_variable(
      'batch_stats', 'var', self.momentum * old + added * _bessel(n, self.axis_name)
    )
    return y


class DenseLayer(nn.Module):
  """Bottleneck layer: BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k), concatenated.

  Given norm1's batch `moments` of x (training), also returns them with those of the
  new channels appended; else None beside the concatenation. `fused`: x is the tuple of
  the block's feature maps so far, and the new one is appended to it (no concatenation).
  """

  growth_rate: int
  bn_size: int
  conv: Any
  norm: Any
  # norm1-ReLU-conv1 as one Pallas kernel (fused_bn_relu_conv1x1); the same parameters.
  fused: bool = False

  @nn.compact
  def __call__(self, x, moments=None):
    if self.fused:
      y = self._fused_bottleneck(x, moments)
    else:
      y = _norm_relu(self.norm, 'norm1', x, moments)
      y = self.conv(self.bn_size * self.growth_rate, (1, 1), name='conv1')(y)
      y = _norm_relu(self.norm, 'norm2', y)
    y = self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(y)
    if moments is not None:
      moments = concat_moments(moments, batch_moments(y))
    if self.fused:
      return (*x, y), moments
    return jnp.concatenate([x, y], axis=-1), moments

  def _fused_bottleneck(self, pieces, moments):
    """norm2(conv1(norm1(x))) ReLU'd, x the concatenation of `pieces`: norm1-ReLU-conv1
    and norm2's moments in one kernel."""
    # Read for its shape only (the moments are given, or the running ones are used):
    # XLA drops it.
    x = jnp.concatenate(pieces, axis=-1)
    norm1 = self.norm(name='norm1', statistics_only=True)
    mean, var, scale, bias = norm1(x, moments)
    # The unfused path's conv1, unattached (parent=None): its settings, no parameters.
    conv = self.conv(self.bn_size * self.growth_rate, (1, 1), parent=None)
    kernel = Conv1x1Kernel(conv.features, conv.kernel_init, conv.param_dtype, name='conv1')(
      x.shape[-1]
    )
    y, sums, sumsqs = fused_bn_relu_conv1x1(
      tuple(pieces), mean, var, scale, bias, kernel, norm1.epsilon, conv.dtype
    )
    count = x.shape[0] * x.shape[1] * x.shape[2]  # batch_moments' mean: the sum / count.
    return _norm_relu(self.norm, 'norm2', y, (sums / count, sumsqs / count))


class DenseBlock(nn.Module):
  """`num_layers` DenseLayers, each adding `growth_rate` channels -> (x, its moments)."""

  num_layers: int
  growth_rate: int
  bn_size: int
  conv: Any
  norm: Any
  fused: bool = False  # DenseLayer's.

  @nn.compact
  def __call__(self, x, moments=None):
    if self.fused:  # The feature maps, concatenated once at the end.
      x = (x,)
    for i in range(1, self.num_layers + 1):
      layer = DenseLayer(
        self.growth_rate, self.bn_size, self.conv, self.norm, self.fused, name=f'denselayer{i}'
      )
      x, moments = layer(x, moments)
    if self.fused:
      x = jnp.concatenate(x, axis=-1)
    return x, moments


class Transition(nn.Module):
  """BN-ReLU-1x1 conv (halves the channels) - 2x2 average pool."""

  features: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x, moments=None):
    x = _norm_relu(self.norm, 'norm', x, moments)
    x = self.conv(self.features, (1, 1), name='conv')(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet-BC classifier returning logits (no sigmoid)."""

  block_sizes: Sequence[int]
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  num_classes: int = labels_lib.NUM_CLASSES
  dtype: Any = jnp.float32
  bn_epsilon: float = TORCH_BN_EPSILON
  # Set under shard_map to average BN statistics over that mesh axis.
  bn_axis_name: Any = None
  # Training: each feature map's BN moments computed once (see the module docstring).
  # False: TorchBatchNorm (flax's) re-reduces every input, as before (for the tests).
  share_bn_statistics: bool = True
  # Each dense layer's norm1-ReLU-conv1 as one Pallas kernel (config.fused_dense_layer).
  fused_dense_layer: bool = False

  @nn.compact
  def __call__(self, x, train: bool, return_features: bool = False):
    if self.fused_dense_layer and not self.share_bn_statistics:
      raise ValueError('fused_dense_layer needs share_bn_statistics (BatchNorm, not flax).')
    # He-normal like torchvision's kaiming_normal_ (from-scratch training only).
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.he_normal(),
    )
    norm = functools.partial(
      functools.partial(BatchNorm, relu=True) if self.share_bn_statistics else TorchBatchNorm,
      use_running_average=not train,
      momentum=BN_MOMENTUM,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      axis_name=self.bn_axis_name,
    )

    x = x.astype(self.dtype)
    x = conv(
      self.num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name='conv0'
    )(x)
    x = _norm_relu(norm, 'norm0', x)
    x = max_pool_3x3_stride_2(x)
    share = train and self.share_bn_statistics
    x, moments = self._dense_blocks(x, conv, norm, share)
    features = _norm_relu(norm, 'norm5', x, moments).astype(jnp.float32)

    pooled = jnp.mean(features, axis=(1, 2))
    logits = nn.Dense(
      self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name='classifier'
    )(pooled)
    return (logits, features) if return_features else logits

  def _dense_blocks(self, x, conv, norm, share):
    """The blocks and transitions -> (x, its batch moments if `share`, else None)."""
    channels = self.num_init_features
    last = len(self.block_sizes)
    for b, num_layers in enumerate(self.block_sizes, start=1):
      block = DenseBlock(
        num_layers,
        self.growth_rate,
        self.bn_size,
        conv,
        norm,
        self.fused_dense_layer,
        name=f'denseblock{b}',
      )
      x, moments = block(x, batch_moments(x) if share else None)
      channels += num_layers * self.growth_rate
      if b < last:
        channels //= 2
        x = Transition(channels, conv, norm, name=f'transition{b}')(x, moments)
    return x, moments


def create_model(
  name,
  *,
  num_classes=labels_lib.NUM_CLASSES,
  dtype=jnp.float32,
  bn_axis_name=None,
  fused_dense_layer=False,
):
  """Returns the DenseNet called `name` (densenet121/169/201 or tiny).

  Apply with `model.apply(variables, x, train=..., mutable=['batch_stats'])`
  (mutable only when train=True); x is normalised float [B, H, W, 3].
  CAM: `logits, feats = model.apply(..., return_features=True)`, then
  `feats @ variables['params']['classifier']['kernel']`.
  """
  if name not in ARCHITECTURES:
    raise ValueError(
      f'Unknown model {name!r} (config.model); choose one of {sorted(ARCHITECTURES)}.'
    )
  block_sizes, growth_rate, num_init_features = ARCHITECTURES[name]
  return DenseNet(
    block_sizes=block_sizes,
    growth_rate=growth_rate,
    num_init_features=num_init_features,
    num_classes=num_classes,
    dtype=dtype,
    bn_axis_name=bn_axis_name,
    fused_dense_layer=fused_dense_layer,
  )


def from_config(config, bn_axis_name=None, fused_dense_layer=False):
  """The configured model; `bn_axis_name` makes BatchNorm sync over that axis,
  `fused_dense_layer` uses its Pallas kernels (train_state.build_model decides).
  config.num_classes is the run's label count (the trainer and run_dir fill -1 in)."""
  if config.num_classes <= 0:
    raise ValueError(f'config.num_classes={config.num_classes}: fill in the label count first.')
  return create_model(
    config.model,
    num_classes=config.num_classes,
    dtype=DTYPES[config.dtype],
    bn_axis_name=bn_axis_name,
    fused_dense_layer=fused_dense_layer,
  )
