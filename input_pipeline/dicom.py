"""Reading a DICOM chest X-ray into the stored form's grey uint8 (pydicom).

The display pipeline of the DICOM standard (PS3.4 N.2), as a viewer shows the image:
  stored values -> modality LUT (Rescale Slope/Intercept, or a Modality LUT) ->
  VOI LUT (a VOI LUT Sequence, else Window Center/Width) when present, else the
  stored bit range -> scaled to 0..255 -> inverted for MONOCHROME1 (0 = white).
So an 8-bit MONOCHROME2 file without rescale or window gives its pixels unchanged,
and 12/16-bit files are scaled by the range the file itself declares (never by the
image's own min/max, which would depend on its content).

Compressed transfer syntaxes are decoded when pydicom has a decoder for them
(pylibjpeg, gdcm or Pillow plugins); otherwise the file is refused, naming the
syntax and what to install. No tag is ever copied out of a file: errors name the
file and the technical field only, never a patient-identifying tag.
"""

from chexnet_jax import errors

import contextlib
import io
import logging

import numpy as np
import pydicom
from pydicom import pixels

_PREAMBLE = 128
_MAGIC = b'DICM'


class DicomError(errors.UserValueError):
  """A DICOM file that cannot be turned into a grey image; the message says why."""


def is_dicom(data: bytes) -> bool:
  """True for a DICOM Part 10 file (128-byte preamble, then 'DICM')."""
  return data[_PREAMBLE : _PREAMBLE + len(_MAGIC)] == _MAGIC


def _read(data: bytes):
  try:
    return pydicom.dcmread(io.BytesIO(data))
  except Exception as e:  # pydicom raises several types for broken files.
    raise DicomError(f'not a readable DICOM file ({type(e).__name__}: {e})') from None


def _decoded(ds) -> np.ndarray:
  syntax = ds.file_meta.get('TransferSyntaxUID')
  if syntax is None:
    raise DicomError('no Transfer Syntax UID in the file meta information')
  if syntax.is_compressed:
    decoder = pixels.get_decoder(syntax)
    if decoder is None or not decoder.is_available:
      missing = '; '.join(decoder.missing_dependencies) if decoder else 'no decoder known'
      raise DicomError(
        f'compressed transfer syntax {syntax.name} ({syntax}) cannot be decoded here: '
        f'install a decoder ({missing}) or convert the file to an uncompressed syntax'
      )
  if 'PixelData' not in ds:
    raise DicomError('no Pixel Data element (not an image)')
  if int(ds.get('NumberOfFrames', 1) or 1) != 1:
    raise DicomError(f'{ds.NumberOfFrames} frames; one radiograph per file is expected')
  try:
    with _pydicom_quiet():
      return ds.pixel_array
  except Exception as e:
    reason = ' '.join(str(e).split())  # pydicom's report spans lines: one sentence.
    raise DicomError(
      f'pixel data of transfer syntax {syntax.name} ({syntax}) could not '
      f'be decoded ({type(e).__name__}: {reason})'
    ) from None


@contextlib.contextmanager
def _pydicom_quiet():
  """pydicom logs each failed decoder's traceback at ERROR before raising; the
  exception says it all, in our one sentence."""
  logger = logging.getLogger('pydicom')
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


def _stored_range(ds) -> np.ndarray:
  bits = int(ds.BitsStored)
  if int(ds.get('PixelRepresentation', 0)) == 1:  # Two's complement.
    return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], np.float64)
  return np.array([0, 2**bits - 1], np.float64)


def _has_voi(ds) -> bool:
  return 'VOILUTSequence' in ds or ('WindowCenter' in ds and 'WindowWidth' in ds)


def to_grey_uint8(ds) -> np.ndarray:
  """A pydicom Dataset -> uint8 [H, W] as displayed (module docstring)."""
  photometric = str(ds.get('PhotometricInterpretation', '')).strip()
  values = _decoded(ds)
  if photometric in ('MONOCHROME1', 'MONOCHROME2'):
    pass
  elif photometric == 'RGB' and values.ndim == 3:
    values = values[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
  else:
    raise DicomError(
      f'Photometric Interpretation {photometric or "missing"!r} is not '
      'MONOCHROME1, MONOCHROME2 or RGB'
    )
  if values.ndim != 2:
    raise DicomError(f'pixel array has shape {values.shape}, expected rows x columns')
  if photometric == 'RGB':  # Colour images carry no modality or VOI transform.
    low, high, shown = 0.0, 255.0, values
  else:
    # The stored range through the same transforms gives the bounds to scale by:
    # the window's (or LUT's) output range, else the modality range of the bits.
    stored = _stored_range(ds)
    probe = np.linspace(stored[0], stored[1], 4097)
    modality, probe = pixels.apply_modality_lut(values, ds), pixels.apply_modality_lut(probe, ds)
    if _has_voi(ds):
      shown = pixels.apply_voi_lut(modality, ds, index=0)
      probe = pixels.apply_voi_lut(probe, ds, index=0)
    else:
      shown = modality
    low, high = float(np.min(probe)), float(np.max(probe))
  shown = np.asarray(shown, np.float64)
  if high <= low:
    raise DicomError(f'empty display range [{low}, {high}] (check the window or LUT)')
  grey = np.round(np.clip((shown - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8)
  return 255 - grey if photometric == 'MONOCHROME1' else grey


def size(data: bytes) -> tuple[int, int]:
  """(Columns, Rows) from the header alone, so a huge image is refused before its
  pixels are decoded; (0, 0) when unreadable (`problem` says why)."""
  try:
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return int(ds.get('Columns', 0) or 0), int(ds.get('Rows', 0) or 0)
  except Exception:  # pydicom raises several types for broken files.
    return 0, 0


def decode(data: bytes) -> np.ndarray:
  """DICOM bytes -> uint8 [H, W]; DicomError saying why not."""
  return to_grey_uint8(_read(data))


def problem(data: bytes) -> str:
  """Why these bytes are not a usable DICOM X-ray ('' if they are). Decodes fully:
  a DICOM's pixel data can only be checked by decoding it."""
  try:
    decode(data)
  except DicomError as e:
    return str(e)
  return ''
