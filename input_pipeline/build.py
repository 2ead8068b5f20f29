"""Converts NIH ChestX-ray14, or your own CSV of X-rays, into the TFDS ArrayRecord
dataset the trainer reads.

  python -m input_pipeline.build --manual_dir NIH_DIR --data_dir OUT --image_size 256 \
      [--val_fraction 0.1 --split_seed 0 --allow_subset --skip_bad --overwrite
       --num_workers N]
  python -m input_pipeline.build --csv FILE --image_root DIR --labels A,B,C \
      --patient_column COL --name NAME --data_dir OUT --image_size 256 \
      [--split_column COL --format chexpert --uncertainty ignore|zeros|ones ...]
      (input_pipeline/csv_dataset.py; train it with --config.dataset=NAME)

Every input is checked before anything is written; problems are reported all at
once. The dataset appears in OUT/chestxray14/<S>px/1.0.0 (<S>px_val<F>_seed<N> for a
non-default validation cut) only when complete, with
split.json (the image names of each split, fraction and seed) beside the records.
Building again into the same place keeps a dataset built from the same inputs and
refuses one built from other inputs unless --overwrite (input_pipeline/fingerprints.py).
"""

import argparse
import os
import sys

import tensorflow_datasets as tfds

from configs import default as default_config
from input_pipeline import chestxray14
from input_pipeline import chexpert
from input_pipeline import csv_dataset
from input_pipeline import fingerprints
from input_pipeline import nih


def build(*args, **kwargs) -> tfds.core.DatasetBuilder:
  """Builds (or finds built from the same inputs) chestxray14/<image_size>px; returns
  the builder. Takes `prepare`'s arguments."""
  return prepare(*args, **kwargs)[0]


def prepare(
  manual_dir: str,
  data_dir: str,
  image_size: int = 256,
  *,
  val_fraction: float = chestxray14.DEFAULT_VAL_FRACTION,
  split_seed: int = chestxray14.DEFAULT_SPLIT_SEED,
  allow_subset: bool = False,
  skip_bad: bool = False,
  num_workers: int | None = None,
  overwrite: bool = False,
):
  """(builder, 'built' | 'unchanged' | 'rebuilt'): every input is read and checked
  first, and its fingerprint compared with a dataset already there; one built from
  other inputs raises fingerprints.ExistingDatasetError unless `overwrite`."""
  config = chestxray14.make_config(image_size, val_fraction, split_seed)
  plan = nih.plan_build(
    manual_dir,
    val_fraction=val_fraction,
    split_seed=split_seed,
    allow_subset=allow_subset,
    skip_bad=skip_bad,
    num_workers=num_workers or os.cpu_count(),
  )
  mode, outcome = fingerprints.reuse_or_rebuild(
    chestxray14.dataset_dir(data_dir, image_size, val_fraction, split_seed),
    chestxray14.fingerprint(plan, config),
    overwrite,
  )
  builder = chestxray14.Chestxray14(
    data_dir=data_dir,
    config=config,
    file_format='array_record',
    allow_subset=allow_subset,
    skip_bad=skip_bad,
    num_workers=num_workers,
    plan=plan,
  )
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode)
  )
  return builder, outcome


_SAID = {
  'built': 'built',
  'rebuilt': 'rebuilt (--overwrite: the inputs differed)',
  'unchanged': 'already built from the same inputs; kept',
}


def _summary(builder, outcome='built') -> str:
  splits = ', '.join(f'{name} {info.num_examples:,}' for name, info in builder.info.splits.items())
  skipped = builder.info.metadata.get('skipped') or {}
  return (
    f'{builder.info.full_name} {_SAID[outcome]} in {builder.data_dir}: {splits}; '
    f'{len(skipped)} input(s) skipped; split in {chestxray14.SPLIT_FILE}'
  )


def parse_args(argv):
  defaults = default_config.get_config()  # One source for the split defaults.
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
    '--manual_dir', default='', help='NIH download: CSVs, lists, images/ or images_0NN[.tar.gz]'
  )
  p.add_argument('--data_dir', required=True, help='TFDS data_dir to write into')
  p.add_argument(
    '--image_size',
    type=int,
    default=defaults.dataset_image_size,
    help='stored side in pixels (config.dataset_image_size)',
  )
  p.add_argument(
    '--val_fraction',
    type=float,
    default=defaults.val_fraction,
    help='fraction of train_val PATIENTS put in validation',
  )
  p.add_argument(
    '--split_seed', type=int, default=defaults.split_seed, help='seed of the validation cut'
  )
  p.add_argument(
    '--allow_subset',
    action='store_true',
    help="accept fewer images than NIH's 112,120 (lists name the subset)",
  )
  p.add_argument(
    '--skip_bad',
    action='store_true',
    help='leave bad inputs out (listed in metadata) instead of failing',
  )
  p.add_argument('--num_workers', type=int, default=None, help='processes (default: all cores)')
  p.add_argument(
    '--overwrite',
    action='store_true',
    help='replace a dataset there built from other inputs (else refused)',
  )
  own = p.add_argument_group('your own data (instead of --manual_dir)')
  own.add_argument(
    '--csv',
    action='append',
    default=[],
    help='CSV of image paths and labels (repeat for several, e.g. '
    "CheXpert's train.csv and valid.csv)",
  )
  own.add_argument('--image_root', default='', help='the CSV paths are relative to this')
  own.add_argument('--name', default='', help='dataset name: --config.dataset=NAME')
  own.add_argument(
    '--labels',
    default='',
    help='comma-separated label columns (--format chexpert: default its 14 observations)',
  )
  own.add_argument(
    '--path_column', default='path', help="image path column (default 'path'; CheXpert: 'Path')"
  )
  own.add_argument('--patient_column', default='', help='patient id column')
  own.add_argument(
    '--no_patient_column_images_are_independent',
    action='store_true',
    help='no patient column: every image is of a different patient',
  )
  own.add_argument(
    '--split_column', default='', help='column holding train/validation/test (else cut by patient)'
  )
  own.add_argument(
    '--test_fraction',
    type=float,
    default=0.2,
    help='fraction of PATIENTS put in test (without a split column)',
  )
  own.add_argument('--format', default='generic', choices=csv_dataset.FORMATS)
  own.add_argument(
    '--uncertainty',
    default='ignore',
    choices=chexpert.UNCERTAINTY_POLICIES,
    help="CheXpert's -1: ignore (masked out), zeros or ones",
  )
  own.add_argument('--frontal_only', action='store_true', help='CheXpert: frontal views only')
  args = p.parse_args(argv)
  if bool(args.csv) == bool(args.manual_dir):
    p.error('give either --manual_dir (NIH ChestX-ray14) or --csv (your own data)')
  if args.csv and not (args.image_root and args.name):
    p.error('--csv needs --image_root and --name')
  return args


def _csv_spec(args) -> csv_dataset.Spec:
  return csv_dataset.Spec(
    csv_paths=tuple(args.csv),
    image_root=args.image_root,
    labels=tuple(n.strip() for n in args.labels.split(',')) if args.labels else (),
    path_column=args.path_column,
    patient_column=args.patient_column,
    split_column=args.split_column,
    images_are_independent=args.no_patient_column_images_are_independent,
    format=args.format,
    uncertainty=args.uncertainty,
    frontal_only=args.frontal_only,
    val_fraction=args.val_fraction,
    test_fraction=args.test_fraction,
    split_seed=args.split_seed,
  )


def main_csv(args):
  try:
    builder, outcome = csv_dataset.build(
      _csv_spec(args),
      name=args.name,
      data_dir=args.data_dir,
      image_size=args.image_size,
      skip_bad=args.skip_bad,
      overwrite=args.overwrite,
      num_workers=args.num_workers,
    )
  except (nih.InvalidInputError, fingerprints.ExistingDatasetError) as e:
    sys.exit(f'Nothing was written. {e}')
  for warning in builder.info.metadata.get('warnings') or []:
    print(f'warning: {warning}', file=sys.stderr)
  said = _SAID[outcome]
  splits = ', '.join(f'{n} {i.num_examples:,}' for n, i in builder.info.splits.items())
  metadata = builder.info.metadata
  print(
    f'{builder.info.full_name} {said} in {builder.data_dir}: {splits}; labels '
    f'{",".join(metadata["labels"])}; {metadata.get("num_skipped", 0)} input(s) '
    f'skipped; split by {metadata["split_by"]}. Train it with '
    f'--config.dataset={args.name} --config.data_dir={args.data_dir} '
    f'--config.dataset_image_size={args.image_size}'
  )


def main(argv=None):
  args = parse_args(argv)
  tfds.disable_progress_bar()  # Ours (per split, in images) is the useful one.
  if args.csv:
    return main_csv(args)
  try:
    builder, outcome = prepare(
      args.manual_dir,
      args.data_dir,
      args.image_size,
      val_fraction=args.val_fraction,
      split_seed=args.split_seed,
      allow_subset=args.allow_subset,
      skip_bad=args.skip_bad,
      num_workers=args.num_workers,
      overwrite=args.overwrite,
    )
  except (nih.InvalidInputError, FileNotFoundError, fingerprints.ExistingDatasetError) as e:
    sys.exit(f'Nothing was written. {e}')
  print(_summary(builder, outcome))


if __name__ == '__main__':
  main()
