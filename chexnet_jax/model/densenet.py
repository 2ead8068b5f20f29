"""DenseNet (Huang et al. 2017) in Flax linen, layer for layer as torchvision.

Module names follow torchvision's `features.*` names (conv0, norm0, denseblock1/
denselayer1/norm1, transition1/conv, norm5, classifier) so that weight files map
onto the parameter tree by name (see weights.py). Layout is NHWC.

Parameters and BatchNorm statistics are float32; `dtype` only sets the compute
dtype of convolutions and normalisation. BatchNorm keeps torch's running variance
(`TorchBatchNorm`: the unbiased batch variance) and flax's one-pass batch variance
(E[x^2] - E[x]^2; torch computes two-pass: the two differ by float32 rounding).
Pooling and the head run in float32, so logits (and the CAM features) are always
float32.
"""

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    if self.axis_name is not None:  # Statistics over every device on the axis.
      n = n * jax.lax.psum(1, self.axis_name)
    # new = m*old + (1-m)*biased: put the unbiased batch variance in its place.
    added = new - self.momentum * old
    self.put_variable('batch_stats', 'var', self.momentum * old + added * (n / max(n - 1, 1)))
    return y


class DenseLayer(nn.Module):
  """Bottleneck layer: BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k), concatenated."""

  growth_rate: int
  bn_size: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.norm(name='norm1')(x))
    y = self.conv(self.bn_size * self.growth_rate, (1, 1), name='conv1')(y)
    y = nn.relu(self.norm(name='norm2')(y))
    y = self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(y)
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
  """`num_layers` DenseLayers, each adding `growth_rate` channels."""

  num_layers: int
  growth_rate: int
  bn_size: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    for i in range(1, self.num_layers + 1):
      x = DenseLayer(self.growth_rate, self.bn_size, self.conv, self.norm, name=f'denselayer{i}')(x)
    return x


class Transition(nn.Module):
  """BN-ReLU-1x1 conv (halves the channels) - 2x2 average pool."""

  features: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.norm(name='norm')(x))
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

  @nn.compact
  def __call__(self, x, train: bool, return_features: bool = False):
    # He-normal like torchvision's kaiming_normal_ (from-scratch training only).
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.he_normal(),
    )
    norm = functools.partial(
      TorchBatchNorm,
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
    x = nn.relu(norm(name='norm0')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    x = self._dense_blocks(x, conv, norm)
    features = nn.relu(norm(name='norm5')(x)).astype(jnp.float32)

    pooled = jnp.mean(features, axis=(1, 2))
    logits = nn.Dense(
      self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32, name='classifier'
    )(pooled)
    return (logits, features) if return_features else logits

  def _dense_blocks(self, x, conv, norm):
    channels = self.num_init_features
    last = len(self.block_sizes)
    for b, num_layers in enumerate(self.block_sizes, start=1):
      x = DenseBlock(num_layers, self.growth_rate, self.bn_size, conv, norm, name=f'denseblock{b}')(
        x
      )
      channels += num_layers * self.growth_rate
      if b < last:
        channels //= 2
        x = Transition(channels, conv, norm, name=f'transition{b}')(x)
    return x


def create_model(name, *, num_classes=labels_lib.NUM_CLASSES, dtype=jnp.float32, bn_axis_name=None):
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
  )


def from_config(config, bn_axis_name=None):
  """The configured model; `bn_axis_name` makes BatchNorm sync over that axis.
  config.num_classes is the run's label count (the trainer and run_dir fill -1 in)."""
  if config.num_classes <= 0:
    raise ValueError(f'config.num_classes={config.num_classes}: fill in the label count first.')
  return create_model(
    config.model,
    num_classes=config.num_classes,
    dtype=DTYPES[config.dtype],
    bn_axis_name=bn_axis_name,
  )
