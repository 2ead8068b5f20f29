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
Every input is checked (exists, a readable PNG/JPEG/DICOM within the builder's pixel
limit, input_pipeline.images) before the model is loaded; one that is not is reported
and skipped, the others are still scored, and the exit status is 1. Each image is
named by its path relative to the inputs' common folder (three view1_frontal.jpg of
three studies stay apart); output file names have no spaces. Each call replaces
OUT/heatmaps/ and OUT/predictions.json whole, and touches nothing else in OUT.
"""

import argparse
import os
import sys
import warnings

import numpy as np
from PIL import Image

from chexnet_jax.runtime import files
from chexnet_jax import command_line
from chexnet_jax.evaluation import calibration as calibration_lib
from chexnet_jax.evaluation import cam as cam_lib
from chexnet_jax.run import run_reader
from chexnet_jax import errors
from chexnet_jax.report import eval_outputs
from chexnet_jax.report import figures
from chexnet_jax.model import densenet
from input_pipeline import dicom
from input_pipeline import images as images_lib
from input_pipeline import pipeline


class ImageLoadError(errors.UserValueError):
  """An input file that is not a usable image; the message names the file."""


# ----------------------------------------------------------------------------
# Reading and preparing an image.


def read_checked(path):
  """The bytes of an input file, checked as the dataset builder checks its images
  (images_lib.problem: readable, not truncated, within images_lib.MAX_PIXELS)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise ImageLoadError(f'{path}: no such file.') from None
  except OSError as e:  # A folder, no permission, ...
    raise ImageLoadError(f'{path}: cannot be read ({e.strerror or e}).') from None
  if why := images_lib.problem(data):
    raise ImageLoadError(f'{path}: not a readable PNG/JPEG/DICOM image: {why}.')
  if why := shape_problem(*images_lib.dimensions(data)):
    raise ImageLoadError(f'{path}: {why}.')
  return data


# What predict takes for a radiograph: at least MIN_SIDE pixels a side, the long
# side at most MAX_ASPECT times the short one. Anything else (an icon, a strip)
# would be stretched to a square and scored without a word.
MIN_SIDE = 32
MAX_ASPECT = 3.0


def shape_problem(width, height):
  """Why a width x height image is not scored as a chest X-ray ('' if it is)."""
  if max(width, height) > MAX_ASPECT * min(width, height):
    return (
      f"{width} x {height} pixels is not a radiograph's shape (predict takes a long "
      f'side of at most {MAX_ASPECT:g} x the short one: crop it to the chest)'
    )
  if min(width, height) < MIN_SIDE:
    return (
      f'{width} x {height} pixels is too small for a radiograph (predict needs at '
      f'least {MIN_SIDE} pixels a side)'
    )
  return ''


def _decode(path, data):
  """Checked bytes -> uint8 [H, W], the builder's conversion (16-bit, RGBA, DICOM)."""
  try:
    with warnings.catch_warnings():
      # read_checked applied the one pixel limit; PIL's own warning would repeat it.
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      return images_lib.decode_grey(data)
  except dicom.DicomError as e:
    raise ImageLoadError(f'{path}: {e}.') from e
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageLoadError(
      f'{path}: not a readable PNG/JPEG/DICOM image ({images_lib.pil_reason(e)}).'
    ) from e


def prepare(grey, dataset_image_size, image_size, eval_preprocess='center_crop'):
  """uint8 [H, W] -> uint8 [image_size, image_size, 1]: the dataset builder's
  resize, then the evaluation pipeline's view (config.eval_preprocess: 'resize'
  the whole image or 'center_crop')."""
  stored = images_lib.resize_square(grey, dataset_image_size)
  return pipeline.eval_image(stored, image_size, eval_preprocess)


def load_image(path, dataset_image_size, image_size, eval_preprocess='center_crop'):
  """Reads one file -> (model input uint8 [S, S, 1], original (width, height))."""
  grey = _decode(path, read_checked(path))
  return (
    prepare(grey, dataset_image_size, image_size, eval_preprocess),
    (grey.shape[1], grey.shape[0]),
  )


def check_inputs(paths):
  """-> (paths that are usable images, [{'image', 'error'}] for the others), before
  any model is loaded, so a mistyped name costs no start-up."""
  usable, failures = [], []
  for path in paths:
    try:
      read_checked(path)
      usable.append(path)
    except ImageLoadError as error:
      failures.append({'image': path, 'error': str(error)})
  return usable, failures


def input_names(paths):
  """Each input's path relative to the inputs' common folder (one input: its file
  name), so three view1_frontal.jpg of three studies stay apart."""
  absolute = [os.path.abspath(path) for path in paths]
  if len(set(absolute)) <= 1:
    return [os.path.basename(path) for path in absolute]
  root = os.path.commonpath([os.path.dirname(path) for path in absolute])
  return [os.path.relpath(path, root) for path in absolute]


# ----------------------------------------------------------------------------
# Scoring.


def top_findings(probs, top_k, names):
  """[(name, index, probability)] of the `top_k` most probable of the run's labels
  `names` (the run's label_names: no default, so no caller assumes NIH's)."""
  if len(names) != len(probs):
    raise ValueError(f'{len(probs)} probabilities but {len(names)} label names')
  order = np.argsort(-np.asarray(probs))[:top_k]
  return [(names[k], int(k), float(probs[k])) for k in order]


def heatmap_stem(name, position, seen):
  """File-name stem for an image's heatmaps from its input name (input_names); two
  inputs whose stems collide get distinct ones."""
  stem = eval_outputs.safe_file_name(os.path.splitext(name)[0])
  stem = f'{stem}_{position}' if stem in seen else stem
  seen.add(stem)
  return stem


def score_image(
  cam_fn,
  variables,
  config,
  label_names,
  path,
  top_k,
  heatmap_prefix,
  temperature=1.0,
  name=None,
  written=None,
):
  """Scores one file and writes heatmaps of its top findings -> result dict.

  temperature != 1 rescales the probabilities (and the heatmaps) as calibration.py does.
  `name` is the image's name in the outputs (default: its file name); heatmaps are
  written under heatmap_prefix and recorded under `written` (the prefix they will
  have once published; default heatmap_prefix).

  Raises ImageLoadError (naming the file) when the file is not a usable image.
  """
  image, _ = load_image(path, config.dataset_image_size, config.image_size, config.eval_preprocess)
  probs, cams = cam_fn(variables, image[None])
  probs, cams = np.asarray(probs[0]), np.asarray(cams[0])
  if temperature != 1.0:
    probs = calibration_lib.apply_temperature(probs, temperature)
  bias = cam_lib.head_bias(variables['params'], len(probs))
  findings = []
  names = label_names
  name = name or os.path.basename(path)
  for label, k, prob in top_findings(probs, top_k, names):
    file_name = f'{os.path.basename(heatmap_prefix)}_{eval_outputs.safe_file_name(label)}.png'
    figures.save_heatmap(
      os.path.join(os.path.dirname(heatmap_prefix), file_name),
      image,
      cams[k],
      bias[k],
      finding=label,
      probability=prob,
      image_name=name,
      temperature=temperature,
      model_box=cam_lib.cam_to_box(cams[k]),
    )
    heatmap = os.path.join(os.path.dirname(written or heatmap_prefix), file_name)
    findings.append({'label': label, 'probability': prob, 'heatmap': heatmap})
  return {
    'image': path,
    'name': name,
    'probabilities': dict(zip(names, map(float, probs))),
    'top_findings': findings,
  }


def format_table(results):
  """One column per scored image (its input name), one row per label of the run."""
  names = [r.get('name') or os.path.basename(r['image']) for r in results]
  labels = list(results[0]['probabilities']) if results else []
  first = max([20, *(len(label) + 2 for label in labels)])  # e.g. 'Enlarged Cardiomediastinum'
  width = max([12, *map(len, names)])
  lines = [f'{"finding":<{first}}' + ''.join(f'{n:>{width + 2}}' for n in names)]
  for label in labels:
    row = ''.join(f'{r["probabilities"][label]:>{width + 2}.3f}' for r in results)
    lines.append(f'{label:<{first}}{row}')
  return '\n'.join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m chexnet_jax.predict',
    description='Score chest X-rays (PNG/JPEG/DICOM) with a trained chexnet_jax run.',
  )
  parser.add_argument('images', nargs='+', help='image files')
  command_line.add_run_arguments(parser)
  parser.add_argument(
    '--top_k', type=command_line.whole_number(0), default=3, help='heatmaps per image'
  )
  parser.add_argument('--output_dir', default=None, help='default: WORKDIR/predict')
  parser.add_argument(
    '--calibrated',
    action='store_true',
    help='apply the temperature that evaluate fitted on validation '
    'for this checkpoint (WORKDIR/eval/calibration.json)',
  )
  return parser.parse_args(argv)


def _report_failures(failures):
  for failure in failures:
    print(f'error: {failure["error"]}', file=sys.stderr)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  usable, failures = check_inputs(args.images)  # Before the model: a typo costs nothing.
  _report_failures(failures)
  if not usable:
    print('error: no input is a readable image; nothing was scored or written.', file=sys.stderr)
    return 1
  output_dir = args.output_dir or os.path.join(args.workdir, 'predict')
  try:
    _check_output_dir(output_dir)
    run = run_reader.load_run(args.workdir, args.checkpoint)
    temperature = (
      calibration_lib.read_temperature(args.workdir, run.step) if args.calibrated else 1.0
    )
  except errors.UserError as error:
    return command_line.fail(error)
  results, late_failures = _score_all(args, run, temperature, usable, output_dir)
  _report_failures(late_failures)
  failures += late_failures
  if results:
    which = run_reader.describe_checkpoint(
      args.checkpoint, run.step, run.config, imported=bool(run.origin)
    )
    print(
      f'checkpoint {which} of {args.workdir}'
      + (f', calibrated with temperature {temperature:.3f}' if args.calibrated else '')
    )
    if run.origin:
      print(f'weights: {run.origin}')
    print(format_table(results))
  summary_path = _write_summary(output_dir, args, run.step, temperature, results, failures)
  print(f'wrote {summary_path}')
  return 1 if failures else 0


def _check_output_dir(output_dir):
  """Before the model loads: OUT is a folder, or one that can be made."""
  if os.path.exists(output_dir) and not os.path.isdir(output_dir):
    raise errors.UserValueError(
      f'--output_dir {output_dir} is a file, not a folder; name a folder (it is '
      'created if missing).'
    )
  existing = os.path.abspath(output_dir)
  while not os.path.exists(existing):  # Created at the end: nothing half-written.
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise errors.UserValueError(
      f'--output_dir {output_dir} cannot be written ({existing} is not a writable '
      'folder); name a writable folder.'
    )


def _score_all(args, run, temperature, paths, output_dir):
  """Scores `paths`; this call's heatmaps replace OUT/heatmaps/ whole (predict's own
  folder: nothing of a previous call is left among them, nothing else is touched)."""
  cam_fn = cam_lib.make_cam_fn(run.model, densenet.DTYPES[run.config.dtype])
  variables = cam_lib.local_copy(run.variables)
  heatmap_dir = os.path.join(output_dir, 'heatmaps')
  names = dict(zip(paths, input_names(paths)))
  results, failures, seen_stems = [], [], set()
  with eval_outputs.published(heatmap_dir) as staging:
    for position, path in enumerate(paths):
      stem = heatmap_stem(names[path], position, seen_stems)
      try:
        results.append(
          score_image(
            cam_fn,
            variables,
            run.config,
            run.label_names,
            path,
            args.top_k,
            os.path.join(staging, stem),
            temperature,
            name=names[path],
            written=os.path.join(heatmap_dir, stem),
          )
        )
      except ImageLoadError as error:  # Changed since the check: report it, go on.
        failures.append({'image': path, 'error': str(error)})
  return results, failures


def _write_summary(output_dir, args, step, temperature, results, failures):
  """OUT/predictions.json, replaced whole (written beside it, then renamed)."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, 'predictions.json')
  summary = {
    'workdir': args.workdir,
    'step': step,
    'temperature': temperature,
    'calibrated': args.calibrated,
    'results': results,
    'failures': failures,
  }
  files.write_json_atomically(path, summary)  # Keys as given: the run's label order.
  return path


if __name__ == '__main__':
  sys.exit(main())
