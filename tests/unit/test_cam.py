"""chexnet_jax/evaluation/cam.py: CAM arithmetic, localisation scores (hand-computed), overlays."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chexnet_jax.evaluation import boxes
from chexnet_jax.evaluation import cam
from chexnet_jax.model import densenet
from chexnet_jax.model import preprocessing


# ------------------------------------------------------------ box arithmetic --


def test_iou_and_iobb_hand_computed():
  predicted, truth = (0, 0, 4, 4), (2, 2, 4, 4)  # Overlap 2x2 = 4.
  assert boxes.iou(predicted, truth) == pytest.approx(4 / (16 + 16 - 4))
  assert boxes.iobb(predicted, truth) == pytest.approx(4 / 16)
  # A small detection inside a large truth: IoBB 1, IoU = area ratio.
  assert boxes.iobb((10, 10, 2, 5), (0, 0, 100, 100)) == 1.0
  assert boxes.iou((10, 10, 2, 5), (0, 0, 100, 100)) == pytest.approx(10 / 10000)
  # IoBB divides by the detected box: a huge detection scores low.
  assert boxes.iobb((0, 0, 100, 100), (10, 10, 2, 5)) == pytest.approx(10 / 10000)
  assert boxes.iou((0, 0, 1, 1), (5, 5, 1, 1)) == 0.0
  assert boxes.iou((1.5, 0, 3, 2), (1.5, 0, 3, 2)) == 1.0
  assert boxes.iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_mask_scores_hand_computed():
  mask = np.zeros((10, 10), bool)
  mask[2:6, 2:6] = True  # 16 pixels at x, y in 2..5.
  assert boxes.mask_to_box(mask) == (2, 2, 4, 4)
  np.testing.assert_array_equal(boxes.box_to_mask((2, 2, 4, 4), (10, 10)), mask)


def test_cam_to_box_keeps_the_region_around_the_peak():
  heat = np.zeros((20, 20), np.float32)
  heat[3:7, 4:10] = 1.0  # Peak region.
  heat[5, 6] = 1.5
  heat[14:18, 14:18] = 0.9  # A second, weaker region above the threshold.
  assert cam.peak(heat) == (6, 5)
  assert cam.cam_to_box(heat, 0.5) == (4, 3, 6, 4)
  result = cam.localize(heat, (4, 3, 6, 4))
  assert result['iou'] == result['iobb'] == 1.0


def test_localization_accuracy_at_wang_thresholds():
  accuracy = cam.localization_accuracy([0.05, 0.15, 0.35, 0.65])
  assert list(accuracy) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
  assert accuracy[0.1] == 0.75 and accuracy[0.3] == 0.5 and accuracy[0.7] == 0.0


def test_original_box_maps_through_resize_and_crops():
  # 1024 -> 256 (scale 1/4), then a centre 224 crop removes 16 pixels each side.
  box = boxes.original_box_to_input((128, 256, 400, 200), (1024, 1024), 256, 224)
  assert box == pytest.approx((16, 48, 100, 50))
  # Partly outside the crop: clipped; wholly outside: None.
  assert boxes.original_box_to_input((0, 0, 100, 100), (1024, 1024), 256, 224) == pytest.approx(
    (0, 0, 9, 9)
  )
  assert boxes.original_box_to_input((0, 0, 40, 40), (1024, 1024), 256, 224) is None
  # Non-square: 2048x1024 -> 512x256, centre square starts at x=128.
  box = boxes.original_box_to_input((1024, 0, 8, 8), (2048, 1024), 256, 256)
  assert box == pytest.approx((128, 0, 2, 2))


# ------------------------------------------------------------ map arithmetic --


class BrightnessModel(nn.Module):
  """Features = the normalised grey level pooled 4x4: a CAM that must follow brightness."""

  @nn.compact
  def __call__(self, x, train, return_features=False):
    features = nn.avg_pool(x[..., :1], (4, 4), strides=(4, 4)) + 3.0
    logits = nn.Dense(14, name='classifier')(jnp.mean(features, axis=(1, 2)))
    return (logits, features) if return_features else logits


def test_cam_weights_features_by_head_kernel_and_peaks_on_bright_patch():
  model = BrightnessModel()
  images = np.zeros((2, 32, 32, 1), np.uint8)
  images[0, 4:12, 20:28] = 255
  images[1, 20:28, 8:16] = 255
  variables = model.init(jax.random.key(0), preprocessing.normalize(images), train=False)
  kernel = np.zeros((1, 14), np.float32)
  kernel[0, 2], kernel[0, 5] = 1.0, -1.0
  variables['params']['classifier']['kernel'] = jnp.asarray(kernel)
  probs, maps = cam.make_cam_fn(model)(variables, images)
  assert maps.shape == (2, 14, 32, 32) and probs.shape == (2, 14)
  for b, (x0, y0) in enumerate([(20, 4), (8, 20)]):
    x, y = cam.peak(maps[b, 2])
    assert x0 <= x < x0 + 8 and y0 <= y < y0 + 8
    assert cam.normalize_map(maps[b, 5])[y, x] == 0.0  # Negative weight: coldest there.
    np.testing.assert_allclose(maps[b, 0], 0.0)  # Zero weight: flat.


def test_tiny_densenet_cam_matches_logits_and_its_head():
  model = densenet.create_model('tiny')
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1), dtype=np.uint8)
  x = preprocessing.normalize(images)
  variables = model.init(jax.random.key(0), x, train=False)
  variables = jax.tree.map(
    lambda v: v + 0.01 * jax.random.normal(jax.random.key(1), v.shape), variables
  )
  logits, features = model.apply(variables, x, train=False, return_features=True)
  kernel = cam.head_kernel(variables['params'], features.shape[-1], 14)
  assert kernel is variables['params']['classifier']['kernel']
  # Global average pooling + one Dense layer: mean of the CAM + bias = logit.
  low_res = np.einsum('bhwc,ck->bk', np.asarray(features), np.asarray(kernel))
  low_res /= features.shape[1] * features.shape[2]
  np.testing.assert_allclose(
    low_res + variables['params']['classifier']['bias'], logits, rtol=1e-4, atol=1e-4
  )
  probs, maps = cam.make_cam_fn(model)(variables, images)
  np.testing.assert_allclose(probs, jax.nn.sigmoid(logits), rtol=1e-5, atol=1e-6)
  assert maps.shape == (2, 14, 32, 32)


def test_head_kernel_error_names_the_file():
  with pytest.raises(ValueError, match='cam.py'):
    cam.head_kernel({'dense': {'kernel': np.zeros((3, 2))}}, 8, 14)


def test_local_copy_is_host_numpy():
  copied = cam.local_copy({'params': {'w': jnp.ones((2,))}})
  assert isinstance(copied['params']['w'], np.ndarray)


# ------------------------------------- a CAM from a trained model localises --

SYNTHETIC_SIZE = 64  # Tiny DenseNet's features have stride 8: an 8x8 map, 12 px patches.


def _synthetic_batch(source, start, size):
  examples = [source[start + j] for j in range(size)]
  return (
    np.stack([e['image'] for e in examples]),
    np.stack([e['labels'] for e in examples]).astype(np.float32),
  )


def _train_tiny_on_synthetic(steps=100, batch=32, learning_rate=3e-3):
  """A few seconds of Adam on the synthetic data, unaugmented so positions stay put."""
  import optax
  from input_pipeline import synthetic

  model = densenet.create_model('tiny')
  source = synthetic.SyntheticSplit('train', steps * batch, SYNTHETIC_SIZE)
  images, _ = _synthetic_batch(source, 0, batch)
  variables = model.init(jax.random.key(0), preprocessing.normalize(images), train=False)
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def step(variables, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
        {'params': params, 'batch_stats': variables['batch_stats']},
        preprocessing.normalize(images),
        train=True,
        mutable=['batch_stats'],
      )
      return optax.sigmoid_binary_cross_entropy(logits, labels).mean(), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(variables['params'])
    changes, opt_state = optimizer.update(grads, opt_state, variables['params'])
    return {
      'params': optax.apply_updates(variables['params'], changes),
      'batch_stats': updates['batch_stats'],
    }, opt_state

  opt_state = optimizer.init(variables['params'])
  for i in range(steps):
    variables, opt_state = step(variables, opt_state, *_synthetic_batch(source, i * batch, batch))
  return model, variables


def test_cam_of_trained_model_peaks_on_the_synthetic_patch():
  """Single-finding synthetic test images: the CAM of that finding peaks inside its patch.

  A patch covers 3.5% of the image, so chance would score ~4%; measured 36 of 36
  images at 100 steps (34 of 36 at 80). The CAM is also hotter on the patch than off it.
  """
  from input_pipeline import synthetic

  model, variables = _train_tiny_on_synthetic()
  cam_fn = cam.make_cam_fn(model)
  source = synthetic.SyntheticSplit('test', 400, SYNTHETIC_SIZE)
  peaks_inside, hotter_inside, total = 0, 0, 0
  for i in range(len(source)):
    example = source[i]
    present = np.flatnonzero(example['labels'])
    if len(present) != 1:
      continue
    k = int(present[0])
    heat = cam.normalize_map(cam_fn(variables, example['image'][None])[1][0, k])
    patch = synthetic.patch_box(k, SYNTHETIC_SIZE)
    inside = boxes.box_to_mask(patch, heat.shape)
    peak_x, peak_y = cam.peak(heat)
    peaks_inside += bool(inside[peak_y, peak_x])
    hotter_inside += heat[inside].mean() > heat[~inside].mean()
    total += 1
  assert total >= 20
  assert peaks_inside / total >= 0.85, f'CAM peaked inside the patch in {peaks_inside}/{total}'
  assert hotter_inside / total >= 0.95, f'CAM hotter on the patch in {hotter_inside}/{total}'


def test_original_box_maps_through_whole_image_resize():
  """eval_preprocess='resize' (CheXNet): 1024 -> 256 -> 224, nothing cut away."""
  box = boxes.original_box_to_input((128, 256, 400, 200), (1024, 1024), 256, 224, 'resize')
  assert box == pytest.approx((28, 56, 87.5, 43.75))
  assert boxes.original_box_to_input(
    (0, 0, 40, 40), (1024, 1024), 256, 224, 'resize'
  ) == pytest.approx((0, 0, 8.75, 8.75))
  # Non-square: 2048x1024 -> centre 1024 square -> 256 -> 128.
  box = boxes.original_box_to_input((1024, 0, 8, 8), (2048, 1024), 256, 128, 'resize')
  assert box == pytest.approx((64, 0, 1, 1))


def test_a_records_boxes_map_into_the_model_input():
  """localization.boxes_in_input (evaluate's gallery and localisation on NIH's boxes)."""
  from chexnet_jax.evaluation import localization  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  config = types.SimpleNamespace(dataset_image_size=256, image_size=256, eval_preprocess='resize')
  record = {'boxes': [{'label': 3, 'bbox': (512, 256, 128, 64)}]}
  assert localization.boxes_in_input(record, config) == [(3, (128.0, 64.0, 32.0, 16.0))]
  assert localization.boxes_in_input({}, config) == []
