"""config.fused_dense_layer: the Pallas BN-ReLU-1x1 conv (interpret mode on CPU) against
the unfused XLA ops it replaces, alone and inside the tiny model."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chexnet_jax.model import densenet
from chexnet_jax.model import fused_dense_layer
from chexnet_jax.training import config_checks
from chexnet_jax.training import train_state
from configs import cpu_smoke
from configs import default

EPSILON = densenet.TORCH_BN_EPSILON
# Rows (batch x height x width): 72 is less than one 128-row tile, 192 one and a half.
SHAPES = [(2, 6, 6, 48, 64), (3, 8, 8, 32, 16)]


def _inputs(batch, height, width, channels, features, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(keys[0], (batch, height, width, channels)) + 0.3
  mean = 0.3 + 0.1 * jax.random.normal(keys[1], (channels,))
  var = jax.random.uniform(keys[2], (channels,), minval=0.5, maxval=1.5)
  scale = jax.random.normal(keys[3], (channels,))
  bias = 0.1 * jax.random.normal(keys[4], (channels,))
  kernel = jax.random.normal(keys[5], (1, 1, channels, features)) / np.sqrt(channels)
  return x.astype(dtype), mean, var, scale, bias, kernel


def _unfused(x, mean, var, scale, bias, kernel, dtype):
  """What DenseLayer computes without the field: y and norm2's moments of it."""
  y = densenet._conv1x1(
    densenet.batch_norm_relu(x, mean, var, scale, bias, EPSILON, dtype), kernel, dtype
  )
  return y, densenet.batch_moments(y)


def _pieces(x):
  """x as a dense block holds it: a first feature map, then maps of 16 channels."""
  first = 32 if x.shape[-1] > 32 else 16
  rest = x[..., first:]
  return (x[..., :first], *jnp.split(rest, rest.shape[-1] // 16, axis=-1))


def _fused(x, mean, var, scale, bias, kernel, dtype):
  """The kernel given x in pieces, its sums made norm2's moments as DenseLayer makes them."""
  y, sums, sumsqs = densenet.fused_bn_relu_conv1x1(
    _pieces(x), mean, var, scale, bias, kernel, EPSILON, dtype
  )
  count = y.size // y.shape[-1]
  return y, (sums / count, sumsqs / count)


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _bf16_ulp(x):
  """One unit in the last place of bfloat16 (8 significant bits) at |x|."""
  x = np.maximum(np.abs(_f64(x)), np.finfo(np.float32).tiny)
  return 2.0 ** (np.floor(np.log2(x)) - 7)


@pytest.mark.parametrize('shape', SHAPES)
def test_float32_forward_and_moments_equal_the_unfused_ops(shape):
  args = _inputs(*shape, jnp.float32)
  y, (mean, mean2) = jax.jit(_fused, static_argnums=6)(*args, jnp.float32)
  want_y, (want_mean, want_mean2) = jax.jit(_unfused, static_argnums=6)(*args, jnp.float32)
  assert y.dtype == jnp.float32 and y.shape == want_y.shape
  # float32 sums of `channels` products in another order: rounding, ~1e-7 relative.
  np.testing.assert_allclose(_f64(y), _f64(want_y), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_f64(mean), _f64(want_mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_f64(mean2), _f64(want_mean2), rtol=1e-5, atol=1e-6)


def _strict(function, *args):
  """function(*args) compiled with every bfloat16 rounding it asks for. By default XLA
  may keep values in float32 across a bfloat16 round trip (excess precision, on CPU):
  the unfused path's moments, and the input gradient's bfloat16 rounding, would be of
  unrounded values. On a GPU the unfused 1x1 convolution is cuDNN's, whose output is
  bfloat16: rounded, as the kernel rounds it."""
  options = {'xla_allow_excess_precision': False}
  return jax.jit(function).lower(*args).compile(compiler_options=options)(*args)


@pytest.mark.parametrize('shape', SHAPES)
def test_bfloat16_forward_and_moments_equal_the_unfused_ops(shape):
  args = _inputs(*shape, jnp.bfloat16)
  y, (mean, mean2) = _strict(lambda *a: _fused(*a, jnp.bfloat16), *args)
  want_y, (want_mean, want_mean2) = _strict(lambda *a: _unfused(*a, jnp.bfloat16), *args)
  assert y.dtype == jnp.bfloat16
  # The same bfloat16 products summed in float32 in another order, then rounded to
  # bfloat16: the float32 sums differ by ~1e-7 relative, which moves a rounding (one
  # bfloat16 ulp) only where a sum lies that close to a rounding boundary.
  difference = np.abs(_f64(y) - _f64(want_y))
  assert np.all(difference <= _bf16_ulp(want_y)), difference.max()
  assert np.mean(difference == 0) > 0.9
  # Moments: float32 sums of those bfloat16 values, in another order.
  np.testing.assert_allclose(_f64(mean), _f64(want_mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_f64(mean2), _f64(want_mean2), rtol=1e-5, atol=1e-6)


def test_bfloat16_moments_within_rounding_of_the_excess_precision_ones():
  """XLA's default compile of the unfused path (on CPU) takes the moments of the float32
  convolution output; the kernel's are of y as stored in bfloat16. Rounding moves each y
  by at most 2^-9 |y| (half an ulp), so the means by at most 2^-9 mean|y| and the means
  of squares by (2^-8 + 2^-18) mean(y^2), plus float32 noise."""
  args = _inputs(*SHAPES[0], jnp.bfloat16)
  y, (mean, mean2) = jax.jit(_fused, static_argnums=6)(*args, jnp.bfloat16)
  _, (want_mean, want_mean2) = jax.jit(_unfused, static_argnums=6)(*args, jnp.bfloat16)
  y = _f64(y)
  bound = 2**-9 * np.mean(np.abs(y), axis=(0, 1, 2))
  assert np.all(np.abs(_f64(mean) - _f64(want_mean)) <= bound * 1.001 + 1e-6)
  bound = (2**-8 + 2**-18) * np.mean(y * y, axis=(0, 1, 2))
  assert np.all(np.abs(_f64(mean2) - _f64(want_mean2)) <= bound * 1.001 + 1e-6)


def _weighted_loss(op, dtype, weights):
  def loss(*args):
    y, (mean, mean2) = op(*args, dtype)
    return (
      jnp.sum(y.astype(jnp.float32) * weights[0])
      + jnp.sum(mean * weights[1])
      + jnp.sum(mean2 * weights[2])
    )

  return loss


# 2,178 rows: two of the kernel gradient's chunks of rows, the second partly past the end.
CHUNKED = (2, 33, 33, 32, 16)


@pytest.mark.parametrize('shape', [SHAPES[1], CHUNKED])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gradients_equal_autodiff_of_the_unfused_ops(dtype, shape):
  if shape == CHUNKED:  # The shape still spans two chunks.
    assert 1 < CHUNKED[0] * CHUNKED[1] * CHUNKED[2] / (fused_dense_layer.CHUNK_TILES * 128) < 2
  args = _inputs(*shape, dtype, seed=1)
  keys = jax.random.split(jax.random.key(2), 3)
  weights = (
    jax.random.normal(keys[0], shape[:3] + (shape[4],)),
    jax.random.normal(keys[1], (shape[4],)),
    jax.random.normal(keys[2], (shape[4],)),
  )
  every = tuple(range(6))
  got = _strict(jax.grad(_weighted_loss(_fused, dtype, weights), every), *args)
  want = _strict(jax.grad(_weighted_loss(_unfused, dtype, weights), every), *args)
  # float32 sums in another order (bfloat16 included: its sums are float32), relative to
  # each gradient's scale. Were a forward y one bfloat16 ulp off (the tests above allow
  # it), the moments' share of dy would move by as much: not the case at these inputs.
  tolerance = 1e-5
  for name, g, w in zip(('x', 'mean', 'var', 'scale', 'bias', 'kernel'), got, want):
    assert g.dtype == w.dtype and g.shape == w.shape, name
    scale = np.max(np.abs(_f64(w)))
    np.testing.assert_allclose(
      _f64(g), _f64(w), rtol=tolerance, atol=tolerance * scale, err_msg=name
    )


def _tiny_step(fused):
  """(loss, gradients, new batch statistics, eval logits) of the tiny model, float32."""
  model = densenet.create_model('tiny', num_classes=3, fused_dense_layer=fused)
  images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  labels = jax.random.bernoulli(jax.random.key(4), 0.5, (2, 3)).astype(jnp.float32)
  variables = model.init(jax.random.key(5), images, train=False)

  def loss(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    bce = jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)
    return bce, updates['batch_stats']

  (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  logits = jax.jit(lambda v: model.apply(v, images, train=False))(variables)
  return variables, value, grads, stats, logits


def test_tiny_model_with_the_field_on_trains_as_with_it_off():
  off_vars, off_loss, off_grads, off_stats, off_logits = _tiny_step(False)
  on_vars, on_loss, on_grads, on_stats, on_logits = _tiny_step(True)
  # The same parameter tree, initialised alike: weight files and checkpoints load.
  assert jax.tree.structure(on_vars) == jax.tree.structure(off_vars)
  jax.tree.map(np.testing.assert_array_equal, on_vars, off_vars)
  # float32 noise: sums in another order.
  close = dict(rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(on_loss, off_loss, **close)
  np.testing.assert_allclose(on_logits, off_logits, **close)
  for tree_on, tree_off in ((on_grads, off_grads), (on_stats, off_stats)):
    assert jax.tree.structure(tree_on) == jax.tree.structure(tree_off)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **close), tree_on, tree_off)
  assert float(jnp.max(jnp.abs(off_grads['denseblock1']['denselayer1']['conv1']['kernel']))) > 0


TRITON_CALL = 'custom_call @__gpu$xla.gpu.triton'


def _triton_calls(fused, platform, train=True, gradient=False):
  """Triton kernels in the tiny model's program (its loss's gradient if `gradient`) lowered
  for `platform`: no device needed."""
  model = densenet.create_model('tiny', num_classes=3, fused_dense_layer=fused)
  images = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
  mutable = ['batch_stats'] if train else False

  def loss(params, batch_stats):
    state = {'params': params, 'batch_stats': batch_stats}
    out = model.apply(state, images, train=train, mutable=mutable)
    return jnp.sum(out[0] if train else out)

  program = jax.jit(jax.grad(loss) if gradient else loss)
  lowered = program.trace(variables['params'], variables['batch_stats']).lower(
    lowering_platforms=(platform,)
  )
  return lowered.as_text().count(TRITON_CALL)


def test_triton_kernels_per_dense_layer_on_gpus_only_with_the_field_on():
  layers = sum(densenet.ARCHITECTURES['tiny'][0])
  assert _triton_calls(False, 'cuda', gradient=True) == 0
  assert _triton_calls(True, 'cuda') == layers
  assert _triton_calls(True, 'cuda', train=False) == layers
  # The forward's, and the backward's two (the input's gradient, the kernel's).
  assert _triton_calls(True, 'cuda', gradient=True) == 3 * layers
  # On CPU, interpret mode: the same kernels as XLA ops.
  assert _triton_calls(True, 'cpu', gradient=True) == 0


def test_fused_needs_shared_bn_statistics():
  model = densenet.DenseNet(block_sizes=(1,), fused_dense_layer=True, share_bn_statistics=False)
  with pytest.raises(ValueError, match='share_bn_statistics'):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)


def _device(platform, kind, capability=None):
  return types.SimpleNamespace(platform=platform, device_kind=kind, compute_capability=capability)


def _fused_config(dtype):
  config = cpu_smoke.get_config()
  config.dtype = dtype
  config.fused_dense_layer = True
  return config


def test_the_field_reaches_the_train_step_model_and_is_off_by_default():
  assert default.get_config().fused_dense_layer is False
  config = _fused_config('bfloat16')
  config.num_classes = 14
  assert train_state.build_model(config, for_training=True).fused_dense_layer is True
  # Evaluation runs under a plain jit over all devices: never fused.
  assert train_state.build_model(config).fused_dense_layer is False


H100 = _device('gpu', 'NVIDIA H100 80GB HBM3', '9.0')


def test_accepted_in_bfloat16_on_ampere_or_newer_and_on_the_cpu():
  config_checks.validate(_fused_config('bfloat16'), devices=[H100] * 4)
  config_checks.validate(_fused_config('bfloat16'), devices=[_device('cpu', 'cpu')] * 4)
  config_checks.validate(_fused_config('float32'), devices=[_device('cpu', 'cpu')] * 4)


def test_float32_on_a_gpu_is_refused_in_one_sentence():
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(_fused_config('float32'), devices=[H100] * 4)
  message = str(error.value)
  assert message.startswith("config.fused_dense_layer=True with config.dtype='float32' on NVIDIA")
  assert 'TF32' in message and '\n' not in message, message


def test_float16_is_refused_in_one_sentence():
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.check_fields(_fused_config('float16'))
  message = str(error.value)
  assert message.startswith(
    "config.fused_dense_layer=True must be False with config.dtype='float16'"
  )
  assert message.count('. ') == 0 and '\n' not in message, message


V100 = _device('gpu', 'Tesla V100-SXM2-32GB', '7.0')


@pytest.mark.parametrize(
  'device, dtype, message',
  [
    (V100, 'float32', r"^config.fused_dense_layer=True with config.dtype='float32' on Tesla"),
    (V100, 'bfloat16', r'^config.dtype=bfloat16 but Tesla V100.* no bfloat16 tensor cores'),
    (_device('tpu', 'TPU v5 lite'), 'bfloat16', r'^config.fused_dense_layer=True but TPU'),
  ],
)
def test_devices_that_cannot_run_the_kernels_are_refused(device, dtype, message):
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate(_fused_config(dtype), devices=[device] * 4)
