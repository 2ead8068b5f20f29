"""Decoding an X-ray (PNG, JPEG or DICOM) into the stored form: grey uint8, pre-resized."""

import io

import numpy as np
from PIL import Image

from input_pipeline import dicom

# Antialiased when shrinking (PIL filters over the whole footprint), like
# torchvision's Resize; far cheaper than decoding, which dominates.
RESAMPLE = Image.Resampling.BILINEAR


def to_grey_uint8(image: Image.Image) -> np.ndarray:
  """Any supported PIL mode -> uint8 [H, W]. 16/32-bit images are scaled by their own
  range (min -> 0, max -> 255) rather than clipped, so 12/16-bit X-rays keep contrast."""
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    pixels = np.asarray(image, dtype=np.float64)
    low, high = pixels.min(), pixels.max()
    scaled = (pixels - low) * (255.0 / (high - low)) if high > low else pixels * 0
    return np.round(scaled).astype(np.uint8)
  # RGBA/RGB/LA -> L: ITU-R 601 luma, alpha ignored (NIH's RGBA images are opaque).
  return np.asarray(image.convert('L'), dtype=np.uint8)


def resize_square(grey: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W] -> uint8 [size, size, 1]: the stored image. NIH's images are
  square; any other image is resized to a square, as training saw its data."""
  image = Image.fromarray(grey, mode='L')
  if image.size != (size, size):
    image = image.resize((size, size), RESAMPLE)
  return np.asarray(image, dtype=np.uint8)[:, :, None]


def decode_grey(data: bytes) -> np.ndarray:
  """PNG/JPEG or DICOM bytes -> uint8 [H, W] (input_pipeline.dicom for DICOM)."""
  if dicom.is_dicom(data):
    return dicom.decode(data)
  with Image.open(io.BytesIO(data)) as image:
    return to_grey_uint8(image)


def decode_and_resize(data: bytes, size: int) -> np.ndarray:
  """PNG/JPEG or DICOM bytes -> uint8 [size, size, 1]."""
  return resize_square(decode_grey(data), size)
