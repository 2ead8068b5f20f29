"""DenseNet: parameter counts, the tiny variant, and parity with Keras applications.

The full DenseNet121 is built once per module (Keras) and compiled once (ours,
eval and train mode in one jit), at 64 px, to keep the file under a minute.
"""

import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import pytest

from chexnet_jax.model import densenet
from chexnet_jax.model import preprocessing
from chexnet_jax.model import weights
from tests.support.keras_helpers import keras_model_to_state_dict, randomize_keras_weights

PARITY_SIZE = 64
PARITY_RTOL = 1e-4


def param_count(name, num_classes):
  model = densenet.create_model(name, num_classes=num_classes)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  )
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize(
  'name, num_classes, expected',
  [
    ('densenet121', 14, 6_968_206),
    ('densenet121', 1000, 7_978_856),  # torchvision's published counts.
    ('densenet169', 1000, 14_149_480),
    ('densenet201', 1000, 20_013_928),
  ],
)
def test_param_counts(name, num_classes, expected):
  assert param_count(name, num_classes) == expected


def test_unknown_model_names_the_choices():
  with pytest.raises(ValueError, match='densenet121'):
    densenet.create_model('resnet50')


@pytest.fixture(scope='module')
def tiny():
  model = densenet.create_model('tiny')
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  return model, variables, x


def test_tiny_shapes_and_cam_features(tiny):
  model, variables, x = tiny
  logits, features = model.apply(variables, x, train=False, return_features=True)
  assert logits.shape == (4, 14) and logits.dtype == jnp.float32
  blocks, growth, init = densenet.ARCHITECTURES['tiny']
  channels = (init + blocks[0] * growth) // 2 + blocks[1] * growth
  assert features.shape == (4, 4, 4, channels)  # Two blocks: 32 px / 8.
  head = variables['params']['classifier']
  cam = features @ head['kernel']  # The class activation maps.
  np.testing.assert_allclose(cam.mean(axis=(1, 2)) + head['bias'], logits, rtol=1e-5, atol=1e-5)


def test_train_mode_updates_batch_stats_only(tiny):
  model, variables, x = tiny
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  old = variables['batch_stats']['norm0']['mean']
  assert not np.allclose(updates['batch_stats']['norm0']['mean'], old)
  assert set(updates) == {'batch_stats'}


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_computes_low_keeps_float32_params_and_logits(tiny, dtype):
  _, _, x = tiny
  model = densenet.create_model('tiny', dtype=dtype)
  # Its own parameters and BN statistics are created float32.
  variables = model.init(jax.random.key(0), x, train=False)
  dtypes = {a.dtype for a in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  # Convolutions and BN compute in `dtype`; features and logits come out float32.
  (logits, features), state = model.apply(
    variables, x, train=False, return_features=True, capture_intermediates=True
  )
  outputs = state['intermediates']
  assert outputs['conv0']['__call__'][0].dtype == dtype
  assert outputs['norm5']['__call__'][0].dtype == dtype
  assert logits.dtype == features.dtype == jnp.float32
  # Same weights as the float32 model: close, but not equal (it did compute in low precision).
  reference = densenet.create_model('tiny').apply(variables, x, train=False)
  assert not np.array_equal(logits, reference)
  np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1)
  # A training step's BN statistics stay float32.
  _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert {a.dtype for a in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


def test_bn_axis_name_gives_global_batch_statistics(tiny):
  """Per-example shards with a BN axis must act like one batch."""
  model, variables, x = tiny
  synced = densenet.create_model('tiny', bn_axis_name='data')

  def shard_logits(xs):
    return synced.apply(variables, xs, train=True, mutable=['batch_stats'])[0]

  per_shard = jax.vmap(shard_logits, axis_name='data')(x[:, None])
  whole, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(per_shard[:, 0], whole, rtol=1e-4, atol=1e-5)


def test_normalize():
  images = np.array([0, 255, 128], np.uint8).reshape(3, 1, 1, 1)
  out = preprocessing.normalize(jnp.asarray(images), jnp.bfloat16)
  assert out.shape == (3, 1, 1, 3) and out.dtype == jnp.bfloat16
  mean = np.array(preprocessing.IMAGENET_MEAN)
  std = np.array(preprocessing.IMAGENET_STD)
  expected = (images / 255.0 - mean) / std
  np.testing.assert_allclose(np.float32(out), expected, rtol=1e-2)
  with pytest.raises(ValueError, match=r'\[B, H, W, 1\]'):
    preprocessing.normalize(jnp.zeros((2, 8, 8, 3), jnp.uint8))


# ----------------------------------------------------------------------------
# Parity with keras.applications.DenseNet121 (JAX backend).


@pytest.fixture(scope='module')
def keras_densenet121():
  """(Keras model, input, eval logits, train-mode logits), weights randomised."""
  import keras  # pylint: disable=g-import-not-at-top

  assert keras.backend.backend() == 'jax'
  model = keras.applications.DenseNet121(
    weights=None, classes=14, classifier_activation=None, input_shape=(PARITY_SIZE, PARITY_SIZE, 3)
  )
  randomize_keras_weights(model, seed=0)
  x = np.random.default_rng(1).normal(size=(4, PARITY_SIZE, PARITY_SIZE, 3))
  x = x.astype(np.float32)
  eval_logits, train_logits = keras_logits_both_modes(model, x)
  return keras_model_to_state_dict(model), x, eval_logits, train_logits


def keras_logits_both_modes(model, x):
  """(eval, train-mode) logits from one jit: half the CPU time of eager calls."""

  @jax.jit
  def both_modes(trainable, non_trainable, x):
    outputs = [
      model.stateless_call(trainable, non_trainable, x, training=mode)[0] for mode in (False, True)
    ]
    return outputs

  def values(variables):
    return [v.value for v in variables]

  outputs = both_modes(values(model.trainable_variables), values(model.non_trainable_variables), x)
  return [np.asarray(o) for o in outputs]


def relative_error(actual, expected):
  return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.slow
def test_keras_densenet121_converts_to_torchvision_keys(keras_densenet121):
  state_dict = keras_densenet121[0]
  # torchvision's densenet121 state dict: 727 keys, 121 of them num_batches_tracked.
  assert len(state_dict) == 727 - 121
  expected = {
    'features.denseblock4.denselayer16.conv2.weight': (32, 128, 3, 3),
    'features.transition3.conv.weight': (512, 1024, 1, 1),
    'features.norm5.running_var': (1024,),
    'classifier.weight': (14, 1024),
  }
  assert {k: state_dict[k].shape for k in expected} == expected


@pytest.mark.slow
def test_densenet121_matches_keras(keras_densenet121):
  state_dict, x, keras_eval, keras_train = keras_densenet121
  model = densenet.create_model('densenet121').clone(bn_epsilon=densenet.KERAS_BN_EPSILON)
  # Shapes suffice: every variable, head included, comes from Keras.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
  variables = weights.state_dict_to_variables(state_dict, shapes)

  @jax.jit
  def both_modes(variables, x):
    train, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return model.apply(variables, x, train=False), train

  ours_eval, ours_train = both_modes(variables, x)
  assert np.std(keras_eval) > 1e-2  # Random weights still give distinct logits.
  errors = (
    relative_error(np.asarray(ours_eval), keras_eval),
    relative_error(np.asarray(ours_train), keras_train),
  )
  print(f'relative error vs Keras: eval {errors[0]:.2e}, train {errors[1]:.2e}')
  assert max(errors) < PARITY_RTOL


_BATCH_NORMS = {
  'TorchBatchNorm': lambda train: densenet.TorchBatchNorm(
    use_running_average=not train, momentum=densenet.BN_MOMENTUM
  ),
  # The one the models use in training (shared moments): the same numbers.
  'BatchNorm': lambda train: densenet.BatchNorm(
    use_running_average=not train,
    momentum=densenet.BN_MOMENTUM,
    epsilon=densenet.TORCH_BN_EPSILON,
    dtype=jnp.float32,
  ),
}


@pytest.mark.parametrize('name', sorted(_BATCH_NORMS))
def test_batchnorm_running_variance_follows_torch(name):
  """torch's BatchNorm2d averages the *unbiased* batch variance (n/(n-1)) into its
  running variance; flax's puts in the biased one. Ours follows torch; the batch
  is still normalised by the biased variance, as in both."""
  import torch

  x = np.random.default_rng(0).normal(1.0, 2.0, (2, 3, 3, 4)).astype(np.float32)  # n = 18.
  module = _BATCH_NORMS[name](train=True)
  variables = module.init(jax.random.PRNGKey(0), x)
  y, updated = module.apply(variables, x, mutable=['batch_stats'])
  reference = torch.nn.BatchNorm2d(4, momentum=0.1, eps=densenet.TORCH_BN_EPSILON).train()
  expected = reference(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach()
  np.testing.assert_allclose(y, expected.numpy(), atol=1e-5)
  np.testing.assert_allclose(updated['batch_stats']['mean'], reference.running_mean, rtol=1e-6)
  np.testing.assert_allclose(updated['batch_stats']['var'], reference.running_var, rtol=1e-6)
  # Evaluation reads the running statistics unchanged (old checkpoints load as before).
  trained = {**variables, **updated}
  evaluated = _BATCH_NORMS[name](train=False).apply(trained, x)
  plain = densenet.nn.BatchNorm(use_running_average=True).apply(trained, x)
  np.testing.assert_array_equal(evaluated, plain)


def _loss_grads_stats(model, variables, images, labels):
  """Loss, parameter gradients and updated BN statistics of one training forward+backward."""

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    loss = jnp.mean(jnp.square(logits - labels))
    return loss, updates['batch_stats']

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  return loss, grads, stats


def _shared_and_reference(name, size, dtype):
  """(loss, grads, stats) of the shared-statistics model and of flax's nn.BatchNorm one."""
  shared = densenet.create_model(name, num_classes=5, dtype=dtype)
  assert shared.share_bn_statistics
  reference = shared.clone(share_bn_statistics=False)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(4, size, size, 3)), dtype)
  labels = jnp.asarray(rng.random((4, 5)), dtype)
  variables = reference.init(jax.random.key(1), images, train=False)
  # The same variables (names, shapes): weight files and checkpoints are unchanged.
  assert jax.tree.structure(shared.init(jax.random.key(1), images, train=False)) == (
    jax.tree.structure(variables)
  )
  # Non-trivial statistics and scales, as a trained model has.
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  variables = jax.tree.unflatten(
    tree, [(x + 0.1 * jax.random.uniform(k, x.shape)).astype(dtype) for x, k in zip(leaves, keys)]
  )
  ours = _loss_grads_stats(shared, variables, images, labels)
  theirs = _loss_grads_stats(reference, variables, images, labels)
  # Evaluation computes no batch moments: the running averages, as flax's.
  eval_ours = shared.apply(variables, images, train=False)
  np.testing.assert_array_equal(eval_ours, reference.apply(variables, images, train=False))
  return ours, theirs


def _worst_relative(ours, theirs):
  """The largest difference of any leaf, relative to that leaf's largest value."""
  return max(
    float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs))
  )


def _assert_same_step(name, size, dtype, grads_within):
  (loss, grads, stats), (ref_loss, ref_grads, ref_stats) = _shared_and_reference(name, size, dtype)
  assert abs(float(loss - ref_loss)) <= 1e-6 * abs(float(ref_loss))
  assert _worst_relative(grads, ref_grads) < grads_within
  assert _worst_relative(stats, ref_stats) < 1e-6


def test_shared_bn_statistics_are_flax_batchnorm_exactly_in_float64():
  """Each feature map's moments computed once and concatenated: in float64 the same loss,
  gradients and running statistics as flax's nn.BatchNorm over every concatenation."""
  # DenseNet121's 121 BN layers (the last over 4 values per channel at 32 px) agreed to
  # 8e-8 of a leaf's largest gradient in float64 (float32 noise: 1e-3); the check takes
  # minutes of compiling on a CPU, so the suite runs the tiny model's.
  with jax.enable_x64(True):
    _assert_same_step('tiny', 32, jnp.float64, grads_within=1e-9)


def test_shared_bn_statistics_equal_flax_batchnorm_to_float32_noise():
  # Float32 rounding, amplified by the variance's E[x^2] - E[x]^2 over 4 small images:
  # measured 6e-4 of a leaf's largest gradient (1e-12 in float64); a wrong statistic: O(1).
  _assert_same_step('tiny', 32, jnp.float32, grads_within=5e-3)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 7, 9, 4), (4, 112, 112, 8)])
def test_max_pool_gradient_without_select_and_scatter_is_flax_max_pools(shape):
  """The same output bitwise, and the same gradient where windows tie (ReLU's zeros): the
  first maximum in row-major order takes it; sums of up to 4 overlapping windows differ
  by float32 rounding only (a wrong choice on a tie differs by O(1))."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(np.maximum(rng.normal(size=shape), 0).round(1), jnp.float32)  # many ties
  y, pullback = jax.vjp(densenet.max_pool_3x3_stride_2, x)
  ref_y, ref_pullback = jax.vjp(
    lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))), x
  )
  np.testing.assert_array_equal(y, ref_y)
  dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  np.testing.assert_allclose(pullback(dy)[0], ref_pullback(dy)[0], rtol=0, atol=2e-6)
  assert int(jnp.sum(x == 0)) > x.size // 3  # The ties are there.


@pytest.mark.parametrize('dtype', ['float64', 'bfloat16'])
def test_batch_norm_relu_gradient_is_autodiffs(dtype):
  """batch_norm_relu's hand-arranged gradient (one reduction, one elementwise pass) is
  autodiff's of the plain expression: to float64 rounding, and in bfloat16 (the ReLU's
  mask taken from the bfloat16 pre-activation, as autodiff's) to float32 rounding."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    compute = jnp.dtype(dtype)
    stats = jnp.float64 if dtype == 'float64' else jnp.float32
    x = jnp.asarray(rng.normal(0.3, 1.5, (4, 5, 6, 8)), compute)
    mean, var = jnp.mean(x.astype(stats), (0, 1, 2)), jnp.var(x.astype(stats), (0, 1, 2))
    scale = jnp.asarray(rng.normal(1.0, 0.5, 8), stats)
    bias = jnp.asarray(rng.normal(0.0, 0.5, 8), stats)
    epsilon = densenet.TORCH_BN_EPSILON

    def plain(x, mean, var, scale, bias):
      return nn.relu(((x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias).astype(compute))

    def fused(x, mean, var, scale, bias):
      return densenet.batch_norm_relu(x, mean, var, scale, bias, epsilon, compute)

    args = (x, mean, var, scale, bias)
    y, pullback = jax.vjp(fused, *args)
    ref_y, ref_pullback = jax.vjp(plain, *args)
    np.testing.assert_array_equal(y, ref_y)
    assert 0.2 < float(jnp.mean(y == 0)) < 0.8  # Both sides of the ReLU are tested.
    dy = jnp.asarray(rng.normal(size=y.shape), compute)
    within = 1e-12 if dtype == 'float64' else 1e-5
    for ours, theirs in zip(pullback(dy), ref_pullback(dy)):
      assert ours.dtype == theirs.dtype
      scale_of = float(jnp.max(jnp.abs(theirs.astype(stats))))
      assert float(jnp.max(jnp.abs((ours - theirs).astype(stats)))) <= within * scale_of
