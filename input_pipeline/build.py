"""Converts NIH ChestX-ray14 into the TFDS ArrayRecord dataset the trainer reads.

  python -m input_pipeline.build --manual_dir NIH_DIR --data_dir OUT --image_size 256 \
      [--val_fraction 0.1 --split_seed 0 --allow_subset --skip_bad --num_workers N]

Every input is checked before anything is written; problems are reported all at
once. The dataset appears in OUT/chestxray14/<S>px/1.0.0 (<S>px_val<F>_seed<N> for a
non-default validation cut) only when complete, with
split.json (the image names of each split, fraction and seed) beside the records.
"""
import argparse
import sys

import tensorflow_datasets as tfds

from configs import default as default_config
from input_pipeline import chestxray14
from input_pipeline import nih


def build(manual_dir: str, data_dir: str, image_size: int = 256, *,
          val_fraction: float = chestxray14.DEFAULT_VAL_FRACTION,
          split_seed: int = chestxray14.DEFAULT_SPLIT_SEED, allow_subset: bool = False, skip_bad: bool = False,
          num_workers: int | None = None) -> tfds.core.DatasetBuilder:
  """Builds (or finds already built) chestxray14/<image_size>px; returns the builder."""
  config = chestxray14.make_config(image_size, val_fraction, split_seed)
  builder = chestxray14.Chestxray14(
      data_dir=data_dir, config=config, file_format='array_record',
      allow_subset=allow_subset, skip_bad=skip_bad, num_workers=num_workers)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _summary(builder) -> str:
  splits = ', '.join(f'{name} {info.num_examples:,}' for name, info in builder.info.splits.items())
  skipped = builder.info.metadata.get('skipped') or {}
  return (f'{builder.info.full_name} in {builder.data_dir}: {splits}; '
          f'{len(skipped)} input(s) skipped; split in {chestxray14.SPLIT_FILE}')


def parse_args(argv):
  defaults = default_config.get_config()  # One source for the split defaults.
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--manual_dir', required=True,
                 help='NIH download: CSVs, lists, images/ or images_0NN[.tar.gz]')
  p.add_argument('--data_dir', required=True, help='TFDS data_dir to write into')
  p.add_argument('--image_size', type=int, default=defaults.dataset_image_size,
                 help='stored side in pixels (config.dataset_image_size)')
  p.add_argument('--val_fraction', type=float, default=defaults.val_fraction,
                 help='fraction of train_val PATIENTS put in validation')
  p.add_argument('--split_seed', type=int, default=defaults.split_seed,
                 help='seed of the validation cut')
  p.add_argument('--allow_subset', action='store_true',
                 help="accept fewer images than NIH's 112,120 (lists name the subset)")
  p.add_argument('--skip_bad', action='store_true',
                 help='leave bad inputs out (listed in metadata) instead of failing')
  p.add_argument('--num_workers', type=int, default=None, help='processes (default: all cores)')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  tfds.disable_progress_bar()  # Ours (per split, in images) is the useful one.
  try:
    builder = build(args.manual_dir, args.data_dir, args.image_size,
                    val_fraction=args.val_fraction, split_seed=args.split_seed,
                    allow_subset=args.allow_subset, skip_bad=args.skip_bad,
                    num_workers=args.num_workers)
  except (nih.InvalidInputError, FileNotFoundError) as e:
    sys.exit(f'Nothing was written. {e}')
  print(_summary(builder))


if __name__ == '__main__':
  main()
