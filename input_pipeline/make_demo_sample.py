"""Regenerates demo_data/ (the bundled demo sample) from full-size NIH images.

  python -m input_pipeline.make_demo_sample --sample DIR --out demo_data

DIR holds NIH's files for the chosen images: images/*.png (1024 px, as released),
Data_Entry_2017_v2020.csv (or .csv.gz) and BBox_List_2017.csv.

Images are shrunk to grey PNGs (the repository stays small); the CSVs keep NIH's
header and only these images' rows; train_val_list.txt / test_list.txt are made by
patient, in NIH's format, with NIH's test proportion.
"""

import argparse
import gzip
import os

import numpy as np
from PIL import Image

from input_pipeline import images
from input_pipeline import nih

TEST_FRACTION = nih.NIH_COUNTS['test'] / nih.NIH_COUNTS['images']
README = """# Demo sample of NIH ChestX-ray14

{n} real ChestX-ray14 images, shrunk to {size}x{size} grey PNG, with NIH's metadata
rows for them (`Data_Entry_2017_v2020.csv.gz`, `BBox_List_2017.csv`; box coordinates
stay in the original 1024-pixel frame) and patient-wise `train_val_list.txt` /
`test_list.txt` in NIH's format. Made by `python -m input_pipeline.make_demo_sample`.
`make demo` builds it with `python -m input_pipeline.build --allow_subset`.

NIH released ChestX-ray14 for unrestricted use; please cite Wang et al.,
"ChestX-ray8", CVPR 2017, and acknowledge the NIH Clinical Center.
"""


def _copy_rows(src: str, dst: str, names: set[str]):
  """Copies the header and the rows whose first field is in `names`."""
  opener = gzip.open if src.endswith('.gz') else open
  with opener(src, 'rt', newline='') as f:
    lines = f.read().splitlines(keepends=True)
  kept = [lines[0]] + [line for line in lines[1:] if line.split(',', 1)[0] in names]
  out_opener = gzip.open if dst.endswith('.gz') else open
  with out_opener(dst, 'wt', newline='') as f:
    f.writelines(kept)


def write_split_lists(out: str, entries: dict, names: list[str], seed: int):
  """train_val/test lists by patient, sorted like NIH's."""
  patients = sorted({entries[n].patient_id for n in names})
  shuffled = np.random.default_rng(seed).permutation(patients)
  test_patients = set(shuffled[: round(TEST_FRACTION * len(patients))].tolist())
  for list_name, in_test in ((nih.TRAIN_VAL_LIST, False), (nih.TEST_LIST, True)):
    chosen = [n for n in names if (entries[n].patient_id in test_patients) == in_test]
    with open(os.path.join(out, list_name), 'w') as f:
      f.writelines(f'{n}\n' for n in sorted(chosen))


def _shrink_images(sample: str, out: str, size: int) -> list[str]:
  names = sorted(os.listdir(os.path.join(sample, 'images')))
  os.makedirs(os.path.join(out, 'images'), exist_ok=True)
  for name in names:
    with open(os.path.join(sample, 'images', name), 'rb') as f:
      grey = images.decode_and_resize(f.read(), size)[:, :, 0]
    Image.fromarray(grey, 'L').save(os.path.join(out, 'images', name), optimize=True)
  return names


def make_demo_sample(sample: str, out: str, size: int = 256, seed: int = 0):
  names = _shrink_images(sample, out, size)
  entry_csv = nih.find_file(sample, nih.DEFAULT_LABEL_FILE)
  entries, _ = nih.read_data_entry(entry_csv)
  _copy_rows(entry_csv, os.path.join(out, os.path.basename(entry_csv)), set(names))
  _copy_rows(os.path.join(sample, nih.BBOX_NAME), os.path.join(out, nih.BBOX_NAME), set(names))
  write_split_lists(out, entries, names, seed)
  with open(os.path.join(out, 'README.md'), 'w') as f:
    f.write(README.format(n=len(names), size=size))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--sample',
    required=True,
    help='folder with images/*.png, the Data_Entry CSV and BBox_List_2017.csv',
  )
  parser.add_argument('--out', default='demo_data')
  parser.add_argument('--size', type=int, default=256)
  args = parser.parse_args()
  make_demo_sample(args.sample, args.out, args.size)


if __name__ == '__main__':
  main()
