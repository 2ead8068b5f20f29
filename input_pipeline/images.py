"""Decoding an X-ray (PNG, JPEG or DICOM) into the stored form: grey uint8, pre-resized;
checking one before a build, under the one pixel-count limit the builder and predict share."""

import io
import re
import warnings

import numpy as np
from PIL import Image

from input_pipeline import dicom

# Antialiased when shrinking (PIL filters over the whole footprint), like
# torchvision's Resize; far cheaper than decoding, which dominates.
RESAMPLE = Image.Resampling.BILINEAR
# The most pixels (width x height) an image may have, for the builder and predict
# alike: PIL's own decompression-bomb threshold, which PIL itself only warns about
# below twice that. A chest X-ray is at most ~4,300 x 4,300 (18 megapixels).
MAX_PIXELS = 89_478_485
SUPPORTED_MODES = ('L', 'LA', 'RGB', 'RGBA', 'I;16', 'I;16B', 'I;16L', 'I')


def pixel_problem(width: int, height: int) -> str:
  """Why an image of width x height is refused ('' if it is not)."""
  if width * height <= MAX_PIXELS:
    return ''
  return (
    f'{width} x {height} = {width * height:,} pixels, more than the limit of '
    f'{MAX_PIXELS:,} (input_pipeline.images.MAX_PIXELS, a guard against decompression '
    'bombs); downscale the image first'
  )


def problem(data: bytes) -> str:
  """Why these bytes are not a usable X-ray ('' if they are). PNG/JPEG: cheap, no
  decode; DICOM: decoded (its pixel data can only be checked that way)."""
  if not data:
    return 'zero-byte file'
  if dicom.is_dicom(data):
    return pixel_problem(*dicom.size(data)) or dicom.problem(data)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # Ours says it.
      with Image.open(io.BytesIO(data)) as image:
        mode, (width, height) = image.mode, image.size
        image.verify()  # Walks every chunk and checks CRCs: catches truncation.
  except Image.DecompressionBombError:
    return 'more than twice the pixel limit (PIL refused to open it); downscale it first'
  except Image.UnidentifiedImageError:
    return 'not a PNG, JPEG or DICOM file (its format is not recognised)'
  except Exception as e:  # PIL raises several types for broken files.
    return f'unreadable or truncated image ({type(e).__name__}: {pil_reason(e)})'
  if mode not in SUPPORTED_MODES:
    return f'unsupported image mode {mode!r} (supported: {SUPPORTED_MODES})'
  return pixel_problem(width, height)


def dimensions(data: bytes) -> tuple[int, int]:
  """(width, height) of checked image bytes (`problem` said ''), without decoding."""
  if dicom.is_dicom(data):
    return dicom.size(data)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)  # Checked already.
    with Image.open(io.BytesIO(data)) as image:
      return image.size


def pil_reason(error):
  """PIL's message without the in-memory file's repr ('<_io.BytesIO object at 0x...>'),
  which names no file: the caller names it."""
  return re.sub(r'\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>', '', str(error)).strip()


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
