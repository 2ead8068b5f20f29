r"""Scores chest X-ray images with a trained run and draws heatmaps of the top findings.

  python -m chexnet_jax.predict IMAGE [IMAGE ...] --workdir DIR \
      [--checkpoint best|latest|STEP] [--top_k 3] [--output_dir OUT] [--calibrated]

Reads PNG/JPEG in grey, RGB, RGBA or 16-bit, and DICOM (input_pipeline.dicom),
prepares each image exactly like the
dataset builder and the evaluation pipeline (resized to a config.dataset_image_size
square, then a centre crop of config.image_size), prints the probability of each of
the run's labels per image and writes OUT/predictions.json and
OUT/heatmaps/<image>_<finding>.png heatmaps (CAM on the probability scale, one 0-1
colour bar for all: see figures.py).
--calibrated divides the logits by the temperature evaluate fitted on validation for
this checkpoint (DIR/eval/calibration.json; see calibration.py).
A file that cannot be read is reported and skipped; the others are still scored and
the exit status is 1.
"""

import argparse
import json
import os
import sys
import warnings

import numpy as np
from PIL import Image

from chexnet_jax import calibration as calibration_lib
from chexnet_jax import cam as cam_lib
from chexnet_jax import checkpoints
from chexnet_jax import errors
from chexnet_jax import figures
from chexnet_jax import models
from input_pipeline import dicom
from input_pipeline import images as images_lib
from input_pipeline import labels as labels_lib
from input_pipeline import pipeline


class ImageLoadError(Exception):
  """An input file that is not a usable image; the message names the file."""


# ----------------------------------------------------------------------------
# Reading and preparing an image.


def _open_guarded(path):
  """PIL.Image.open, with the decompression-bomb guard turned into a clear refusal.

  PIL only warns between MAX_IMAGE_PIXELS and twice that; a scorer fed untrusted
  files should refuse both cases rather than allocate gigabytes.
  """
  with warnings.catch_warnings():
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    try:
      image = Image.open(path)
      image.load()  # Decode now so a truncated file fails here, not later.
      return image
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
      raise ImageLoadError(
        f'{path}: refused, more pixels than PIL.Image.MAX_IMAGE_PIXELS='
        f'{Image.MAX_IMAGE_PIXELS} (a possible decompression bomb: {e}). Downscale '
        'the image first, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it.'
      ) from e
    except FileNotFoundError as e:
      raise ImageLoadError(f'{path}: no such file.') from e
    except (OSError, ValueError, SyntaxError) as e:
      raise ImageLoadError(f'{path}: not a readable PNG/JPEG image ({e}).') from e


def _is_dicom_file(path):
  try:
    with open(path, 'rb') as f:
      return dicom.is_dicom(f.read(132))
  except OSError:
    return False  # _open_guarded reports it.


def prepare(grey, dataset_image_size, image_size, eval_preprocess='center_crop'):
  """uint8 [H, W] -> uint8 [image_size, image_size, 1]: the dataset builder's
  resize, then the evaluation pipeline's view (config.eval_preprocess: 'resize'
  the whole image or 'center_crop')."""
  stored = images_lib.resize_square(grey, dataset_image_size)
  return pipeline.eval_image(stored, image_size, eval_preprocess)


def load_image(path, dataset_image_size, image_size, eval_preprocess='center_crop'):
  """Reads one file -> (model input uint8 [S, S, 1], original (width, height))."""
  if _is_dicom_file(path):
    try:
      with open(path, 'rb') as f:
        grey = dicom.decode(f.read())
    except dicom.DicomError as e:
      raise ImageLoadError(f'{path}: {e}.') from e
    return (
      prepare(grey, dataset_image_size, image_size, eval_preprocess),
      (grey.shape[1], grey.shape[0]),
    )
  image = _open_guarded(path)
  # The dataset builder's conversion, so 16-bit and RGBA files match training.
  grey = images_lib.to_grey_uint8(image)
  return prepare(grey, dataset_image_size, image_size, eval_preprocess), image.size


# ----------------------------------------------------------------------------
# Scoring.


def top_findings(probs, top_k, names):
  """[(name, index, probability)] of the `top_k` most probable of the run's labels
  `names` (labels_lib.names_of(config): no default, so no caller assumes NIH's)."""
  if len(names) != len(probs):
    raise ValueError(f'{len(probs)} probabilities but {len(names)} label names')
  order = np.argsort(-np.asarray(probs))[:top_k]
  return [(names[k], int(k), float(probs[k])) for k in order]


def heatmap_stem(path, position, seen):
  """File-name stem for an image's heatmaps; two inputs named alike get distinct ones."""
  stem = os.path.splitext(os.path.basename(path))[0]
  stem = f'{stem}_{position}' if stem in seen else stem
  seen.add(stem)
  return stem


def score_image(cam_fn, variables, config, path, top_k, heatmap_prefix, temperature=1.0):
  """Scores one file and writes heatmaps of its top findings -> result dict.

  temperature != 1 rescales the probabilities (and the heatmaps) as calibration.py does.

  Raises ImageLoadError (naming the file) when the file is not a usable image.
  """
  image, _ = load_image(path, config.dataset_image_size, config.image_size, config.eval_preprocess)
  probs, cams = cam_fn(variables, image[None])
  probs, cams = np.asarray(probs[0]), np.asarray(cams[0])
  if temperature != 1.0:
    probs = calibration_lib.apply_temperature(probs, temperature)
  bias = cam_lib.head_bias(variables['params'], len(probs))
  findings = []
  names = labels_lib.names_of(config)
  for label, k, prob in top_findings(probs, top_k, names):
    heatmap = f'{heatmap_prefix}_{label}.png'
    figures.save_heatmap(
      heatmap,
      image,
      cams[k],
      bias[k],
      finding=label,
      probability=prob,
      image_name=os.path.basename(path),
      temperature=temperature,
      model_box=cam_lib.cam_to_box(cams[k]),
    )
    findings.append({'label': label, 'probability': prob, 'heatmap': heatmap})
  return {
    'image': path,
    'probabilities': dict(zip(names, map(float, probs))),
    'top_findings': findings,
  }


def format_table(results):
  """One column per scored image, one row per pathology."""
  names = [os.path.basename(r['image']) for r in results]
  width = max([12, *map(len, names)])
  lines = [f'{"finding":<20}' + ''.join(f'{n:>{width + 2}}' for n in names)]
  for label in results[0]['probabilities'] if results else ():
    row = ''.join(f'{r["probabilities"][label]:>{width + 2}.3f}' for r in results)
    lines.append(f'{label:<20}{row}')
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m chexnet_jax.predict',
    description='Score chest X-rays (PNG/JPEG/DICOM) with a trained chexnet_jax run.',
  )
  parser.add_argument('images', nargs='+', help='image files')
  parser.add_argument('--workdir', required=True, help='the training run directory')
  parser.add_argument(
    '--checkpoint',
    default='best',
    type=checkpoints.parse_selector,
    help=checkpoints.checkpoint_help(),
  )
  parser.add_argument('--top_k', type=int, default=3, help='heatmaps per image')
  parser.add_argument('--output_dir', default=None, help='default: WORKDIR/predict')
  parser.add_argument(
    '--calibrated',
    action='store_true',
    help='apply the temperature that evaluate fitted on validation '
    'for this checkpoint (WORKDIR/eval/calibration.json)',
  )
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    run = checkpoints.load_run(args.workdir, args.checkpoint)
    temperature = (
      calibration_lib.read_temperature(args.workdir, run.step) if args.calibrated else 1.0
    )
  except (errors.UserError, pipeline.DatasetError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  cam_fn = cam_lib.make_cam_fn(run.model, models.DTYPES[run.config.dtype])
  variables = cam_lib.local_copy(run.variables)
  output_dir = args.output_dir or os.path.join(args.workdir, 'predict')
  results, failures, seen_stems = [], [], set()
  for position, path in enumerate(args.images):
    prefix = os.path.join(output_dir, 'heatmaps', heatmap_stem(path, position, seen_stems))
    try:
      results.append(
        score_image(cam_fn, variables, run.config, path, args.top_k, prefix, temperature)
      )
    except ImageLoadError as error:  # Report it, and go on with the other files.
      failures.append({'image': path, 'error': str(error)})
      print(f'error: {error}', file=sys.stderr)
  if results:
    print(
      f'checkpoint {checkpoints.describe_checkpoint(args.checkpoint, run.step, run.config)} '
      f'of {args.workdir}'
      + (f', calibrated with temperature {temperature:.3f}' if args.calibrated else '')
    )
    print(format_table(results))
  os.makedirs(output_dir, exist_ok=True)
  summary_path = os.path.join(output_dir, 'predictions.json')
  with open(summary_path, 'w') as f:
    json.dump(
      {
        'workdir': args.workdir,
        'step': run.step,
        'temperature': temperature,
        'calibrated': args.calibrated,
        'results': results,
        'failures': failures,
      },
      f,
      indent=2,
    )
  print(f'wrote {summary_path}')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
