"""Image normalisation, run on device inside the jitted steps.

Images travel host -> device as uint8 grey; CheXNet converts the grey X-rays to
RGB (three equal channels) and normalises with the ImageNet statistics its
pretrained DenseNet expects. Shared by train, eval, predict and CAM.
"""

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, dtype=jnp.float32):
  """uint8 [B, H, W, 1] grey -> [B, H, W, 3] ImageNet-normalised, in `dtype`.

  The arithmetic runs in float32 and only the result is cast, so bfloat16 and
  float16 inputs to the model differ from float32 by one rounding only.
  """
  if images.ndim != 4 or images.shape[-1] != 1:
    raise ValueError(
      f'normalize expects grey images [B, H, W, 1], got shape '
      f'{images.shape}; batches carry `image` as uint8 '
      '[b, S, S, 1].'
    )
  grey = images.astype(jnp.float32) / 255.0
  rgb = jnp.broadcast_to(grey, grey.shape[:-1] + (3,))
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return ((rgb - mean) / std).astype(dtype)
