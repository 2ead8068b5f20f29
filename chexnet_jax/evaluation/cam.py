"""Class activation maps (CheXNet, Rajpurkar et al. 2017) and their localisation scores.

CAM of class c: M_c = sum_k w_{c,k} f_k, the final feature maps (after the last
BN+ReLU) weighted by the classifier kernel's column for c. Because the head is global
average pooling followed by one dense layer, the spatial mean of M_c plus the bias is
exactly the logit of c, which is what makes M_c a faithful "where did the score come
from" map. It is upsampled to the input with jax.image.resize.

Images are normalised with chexnet_jax.model.preprocessing.normalize, as in training, so a
CAM is computed on exactly what the classifier saw.

Localisation follows Wang et al. 2017 (ChestX-ray8): the box around the map's peak
region against the dataset's box, by IoU and IoBB (boxes.py), counted as correct at
thresholds T in 0.1..0.7.
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from chexnet_jax.evaluation import boxes
from chexnet_jax.model import preprocessing

IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


# ----------------------------------------------------------------------------
# Computing maps.


def head_kernel(params, num_features, num_classes):
  """Finds the classifier kernel [num_features, num_classes] in a params tree.

  Searched by shape rather than by module name so CAM does not depend on what
  densenet.py calls its head; exactly one match is required.
  """
  matches = [
    (jax.tree_util.keystr(path), leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    if str(getattr(path[-1], 'key', '')) == 'kernel' and leaf.shape == (num_features, num_classes)
  ]
  if len(matches) != 1:
    raise ValueError(
      'chexnet_jax/evaluation/cam.py: expected one dense kernel of shape '
      f'{(num_features, num_classes)} (the classifier head) in params, found '
      f'{[name for name, _ in matches]}; CAM needs a model that ends in global '
      'average pooling + one Dense layer.'
    )
  return matches[0][1]


def head_bias(params, num_classes):
  """The classifier's bias [num_classes] (zeros if it has none), beside its kernel.

  figures.py adds it to a CAM to put the map on the model's probability scale.
  """
  kernels = [
    path
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    if str(getattr(path[-1], 'key', '')) == 'kernel'
    and getattr(leaf, 'ndim', 0) == 2
    and leaf.shape[-1] == num_classes
  ]
  if len(kernels) != 1:
    raise ValueError(
      f'chexnet_jax/evaluation/cam.py: expected one dense kernel with {num_classes} outputs (the '
      f'classifier head) in params, found {len(kernels)}; CAM needs a model that ends '
      'in global average pooling + one Dense layer.'
    )
  parent = params
  for key in kernels[0][:-1]:
    parent = parent[key.key]
  bias = parent.get('bias') if hasattr(parent, 'get') else None
  return np.zeros(num_classes, np.float32) if bias is None else np.asarray(bias, np.float32)


def make_cam_fn(model, dtype=jnp.float32):
  """Returns jitted (variables, images_uint8 [B,H,W,1]) -> (probs [B,K], cams [B,K,H,W]).

  Probabilities come from the same forward pass (eval-mode BN), so predict.py shows
  the scores whose maps it draws.
  """

  @jax.jit
  def cam_fn(variables, images):
    x = preprocessing.normalize(images, dtype)
    logits, features = model.apply(variables, x, train=False, return_features=True)
    features = features.astype(jnp.float32)
    kernel = head_kernel(variables['params'], features.shape[-1], logits.shape[-1])
    maps = jnp.einsum('bhwc,ck->bkhw', features, kernel.astype(jnp.float32))
    batch, height, width = images.shape[:3]
    maps = jax.image.resize(maps, (batch, maps.shape[1], height, width), method='bilinear')
    return jax.nn.sigmoid(logits.astype(jnp.float32)), maps

  return cam_fn


def local_copy(variables):
  """Host numpy copy of (replicated, possibly multi-process) variables.

  CAMs are drawn on process 0 only; a jit over arrays that span every process
  would wait there for the others, so CAM functions get a local copy instead.
  """

  def to_host(x):
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)

  return jax.tree.map(to_host, variables)


def normalize_map(cam):
  """Min-max scales one map to [0, 1] (a constant map becomes all zeros)."""
  cam = np.asarray(cam, dtype=np.float32)
  span = cam.max() - cam.min()
  return (cam - cam.min()) / span if span > 0 else np.zeros_like(cam)


def peak(cam):
  """(x, y) pixel of the map's maximum."""
  row, col = np.unravel_index(int(np.argmax(cam)), np.shape(cam))
  return int(col), int(row)


# ----------------------------------------------------------------------------
# Boxes, masks and localisation scores.


def cam_to_mask(cam, threshold):
  """The connected region of normalise(cam) >= threshold that holds the peak.

  Wang et al. draw one box per isolated region; we keep the one around the
  maximum, the model's most confident location, so each CAM gives one detection.
  """
  binary = normalize_map(cam) >= threshold
  regions, _ = ndimage.label(binary)
  x, y = peak(cam)
  return regions == regions[y, x]


def cam_to_box(cam, threshold=0.5):
  return boxes.mask_to_box(cam_to_mask(cam, threshold))


def localization_accuracy(scores, thresholds=IOU_THRESHOLDS):
  """{T: fraction of scores >= T}, Wang et al.'s accuracy at T(IoU) or T(IoBB)."""
  scores = np.asarray(scores, dtype=np.float64)
  if scores.size == 0:
    return {float(t): None for t in thresholds}
  return {float(t): float(np.mean(scores >= t)) for t in thresholds}


def localize(cam, true_box, thresholds=IOU_THRESHOLDS, cam_threshold=0.5):
  """IoU and IoBB of the CAM's detected box against a true box, in input pixels."""
  predicted = cam_to_box(cam, cam_threshold)
  if predicted is None:
    return {'iou': 0.0, 'iobb': 0.0, 'predicted_box': None}
  return {
    'iou': boxes.iou(predicted, true_box),
    'iobb': boxes.iobb(predicted, true_box),
    'predicted_box': list(predicted),
  }


# ----------------------------------------------------------------------------
# Pictures.
