"""Input throughput per CPU core on real NIH images (1024x1024 PNG).

  python benchmarks/input_pipeline.py --sample DIR [--batches 40]

DIR holds images/*.png (full-size NIH PNGs; a few hundred are plenty), NIH's
Data_Entry CSV (all rows or just these images') and BBox_List_2017.csv.

Measures, each in one process on one core:
  conversion  decode the 1024 PNG + grey + resize to 256 (what the build does per image)
  reference   decode the 1024 PNG, convert RGB, resize 256 (the TF reference, every step)
  ours        the train pipeline over the converted 256 px records: read, random-resized
              crop to 224, flip, batch 64 (grain, no worker processes, no threads)
and the end-to-end build of the sample, and prints a Markdown table.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from configs import default  # noqa: E402
from input_pipeline import build  # noqa: E402
from input_pipeline import images  # noqa: E402
from input_pipeline import make_demo_sample  # noqa: E402
from input_pipeline import nih  # noqa: E402
from input_pipeline import pipeline  # noqa: E402


def _png_bytes(sample):
  folder = os.path.join(sample, 'images')
  return [open(os.path.join(folder, n), 'rb').read() for n in sorted(os.listdir(folder))]


def _rate(fn, items):
  start = time.perf_counter()
  for item in items:
    fn(item)
  return len(items) / (time.perf_counter() - start)


def reference_decode(data):
  with Image.open(__import__('io').BytesIO(data)) as image:
    return np.asarray(image.convert('RGB').resize((256, 256), Image.Resampling.BILINEAR))


def _manual_dir(sample, root):
  """The sample in NIH's layout, with patient-wise split lists."""
  os.makedirs(root)
  entry_csv = nih.find_file(sample, nih.DEFAULT_LABEL_FILE)
  for path in (os.path.join(sample, 'images'), entry_csv, os.path.join(sample, nih.BBOX_NAME)):
    os.symlink(os.path.abspath(path), os.path.join(root, os.path.basename(path)))
  entries, _ = nih.read_data_entry(entry_csv)
  names = sorted(os.listdir(os.path.join(sample, 'images')))
  make_demo_sample.write_split_lists(root, entries, names, seed=0)
  return root


def _pipeline_rate(data_dir, batches, augment, dataset_image_size=256):
  config = default.get_config()
  config.augment = augment
  config.data_dir, config.dataset_image_size, config.image_size = (
    data_dir,
    dataset_image_size,
    224,
  )
  config.batch_size, config.grain_workers, config.prefetch_buffer = 64, 0, 0
  iterator = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  next(iterator)  # Opens the files.
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * 64 / (time.perf_counter() - start)


def _cpu_model():
  lines = subprocess.run(['lscpu'], capture_output=True, text=True).stdout.splitlines()
  return next(
    (line.split(':', 1)[1].strip() for line in lines if line.startswith('Model name')), '?'
  )


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
    '--sample',
    required=True,
    help='folder with images/*.png (1024 px), the Data_Entry CSV and BBox_List_2017.csv',
  )
  p.add_argument('--batches', type=int, default=40)
  args = p.parse_args()
  tfds.disable_progress_bar()
  pngs = _png_bytes(args.sample)
  conversion = _rate(lambda d: images.decode_and_resize(d, 256), pngs)
  reference = _rate(reference_decode, pngs)
  with tempfile.TemporaryDirectory() as tmp:
    manual = _manual_dir(args.sample, os.path.join(tmp, 'nih'))
    start = time.perf_counter()
    build.build(
      manual, os.path.join(tmp, 'tfds'), 256, allow_subset=True, num_workers=os.cpu_count()
    )
    build_seconds = time.perf_counter() - start
    ours = _pipeline_rate(os.path.join(tmp, 'tfds'), args.batches, 'random_resized_crop')
    ours_crop = _pipeline_rate(os.path.join(tmp, 'tfds'), args.batches, 'random_crop')
    # The default recipe (CheXNet): whole image at 224 + flip, from 256 px records
    # resized on the fly, or from records built at 224 (nothing left to resize).
    ours_resize = _pipeline_rate(os.path.join(tmp, 'tfds'), args.batches, 'resize')
    build.build(
      manual, os.path.join(tmp, 'tfds'), 224, allow_subset=True, num_workers=os.cpu_count()
    )
    ours_224 = _pipeline_rate(os.path.join(tmp, 'tfds'), args.batches, 'resize', 224)
  full_minutes = nih.NIH_COUNTS['images'] / (conversion * 16) / 60
  print(
    f'CPU {_cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, '
    f'numpy {np.__version__}, Pillow {Image.__version__}, grain 0.2.18, '
    f'tensorflow-datasets {tfds.__version__}'
  )
  print('| path | images/s per core |\n| --- | --- |')
  print(f'| reference: decode 1024 PNG, RGB, resize 256 | {reference:,.0f} |')
  print(
    f'| ours: train pipeline, 256 px records, random-resized crop 224, flip, batch 64 | '
    f'{ours:,.0f} |'
  )
  print(f'| ours: same with random_crop 224 (no resize) | {ours_crop:,.0f} |')
  print(f'| ours: 256 px records, whole image resized to 224, flip (recipe) | {ours_resize:,.0f} |')
  print(
    f'| ours: 224 px records, whole image (no resize), flip (default recipe) | {ours_224:,.0f} |'
  )
  print(f'| conversion (build): decode 1024 PNG, grey, resize 256 | {conversion:,.0f} |')
  print(
    f'Build of the {len(pngs)}-image sample, {os.cpu_count()} workers, checks and '
    f'writing included: {build_seconds:.1f} s ({len(pngs) / build_seconds:,.0f} images/s).'
  )
  print(
    f'Projection, conversion of 112,120 images on 16 cores: {full_minutes:.1f} min '
    '(decode-bound; images_0NN.tar.gz input adds one gunzip pass in the main process).'
  )


if __name__ == '__main__':
  main()
