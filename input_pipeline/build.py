"""Converts NIH ChestX-ray14, or your own CSV of X-rays, into the TFDS ArrayRecord
dataset the trainer reads.

  python -m input_pipeline.build --manual_dir NIH_DIR --data_dir OUT --image_size 256 \
      [--label_file Data_Entry_2017.csv --val_fraction 0.1 --split_seed 0 \
       --allow_subset --skip_bad --overwrite --num_workers N]
  python -m input_pipeline.build --csv FILE --image_root DIR --labels A,B,C \
      --patient_column COL --name NAME --data_dir OUT --image_size 256 \
      [--split_column COL --format chexpert --uncertainty ignore|zeros|ones ...]
      (input_pipeline/csv_dataset.py; train it with --config.dataset=NAME)

An adapter (input_pipeline/nih.py, csv_dataset.py) reads and checks every input
first and reports all problems at once; input_pipeline/records.py writes its plan.
The dataset appears in OUT/<name>/<S>px/1.0.0 (NIH: chestxray14/<S>px_val<F>_seed<N>
for a non-default validation cut) only when complete, with split.json (the image
names of each split, fraction and seed) beside the records. Building again into the
same place keeps a dataset built from the same inputs and refuses one built from
other inputs unless --overwrite (input_pipeline/fingerprints.py).
"""

import argparse
import os
import sys

import tensorflow_datasets as tfds

from chexnet_jax import errors
from configs import default as default_config
from input_pipeline import chestxray14
from input_pipeline import chexpert
from input_pipeline import csv_dataset
from input_pipeline import nih
from input_pipeline import records
from input_pipeline import sources


def build(*args, **kwargs) -> tfds.core.DatasetBuilder:
  """Builds (or finds built from the same inputs) chestxray14/<image_size>px; returns
  the builder. Takes `prepare`'s arguments."""
  return prepare(*args, **kwargs)[0]


def prepare(
  manual_dir: str,
  data_dir: str,
  image_size: int = 256,
  *,
  overwrite: bool = False,
  num_workers: int | None = None,
  **options,
):
  """(builder, 'built' | 'unchanged' | 'rebuilt') for NIH: every input is read and
  checked first (`options`: nih.plan_build's, e.g. val_fraction, label_file), and its
  fingerprint compared with a dataset already there; one built from other inputs
  raises fingerprints.ExistingDatasetError unless `overwrite`."""
  plan = nih.plan_build(
    manual_dir, image_size=image_size, num_workers=num_workers or os.cpu_count(), **options
  )
  return records.write(
    plan, data_dir, overwrite=overwrite, num_workers=num_workers, builder=chestxray14.Chestxray14
  )


_SAID = {
  'built': 'built',
  'rebuilt': 'rebuilt (--overwrite: the inputs differed)',
  'unchanged': 'already built from the same inputs; kept',
}


def summary(builder, outcome: str, data_dir: str) -> str:
  """One line: what was written, where, and how to train on it."""
  metadata = sources.upgraded_metadata(builder.info)
  splits = ', '.join(f'{n} {i.num_examples:,}' for n, i in builder.info.splits.items())
  size = metadata['image_size']
  dataset = f'--config.dataset={builder.info.name} --config.data_dir={data_dir}'
  if builder.info.name == chestxray14.NAME:
    dataset += f' --config.val_fraction={metadata["val_fraction"]}'
    dataset += f' --config.split_seed={metadata["split_seed"]}'
  return (
    f'{builder.info.full_name} {_SAID[outcome]} in {builder.data_dir}: {splits}; labels '
    f'{",".join(metadata["labels"])}; {metadata["num_skipped"]} input(s) skipped; split '
    f'by {metadata["split_by"]} (in {records.SPLIT_FILE}). Train it with {dataset} '
    f'--config.dataset_image_size={size}'
  )


# (flag, help, argparse options): NIH's, then those of your own data.
_NIH_FLAGS = (
  ('--manual_dir', 'NIH download: CSVs, lists, images/ or images_0NN[.tar.gz]', {'default': ''}),
  (
    '--label_file',
    f'NIH label CSV (plain or .gz): {" or ".join(nih.DATA_ENTRY_NAMES)}; the published '
    'CheXNet figures used Data_Entry_2017.csv',
    {'default': nih.DEFAULT_LABEL_FILE, 'choices': nih.DATA_ENTRY_NAMES},
  ),
  ('--allow_subset', "accept fewer images than NIH's 112,120", {'action': 'store_true'}),
)
_OWN_FLAGS = (
  ('--csv', 'CSV of image paths and labels (repeat for several)', {'action': 'append'}),
  ('--image_root', 'the CSV paths are relative to this', {'default': ''}),
  ('--name', 'dataset name: --config.dataset=NAME', {'default': ''}),
  ('--labels', 'comma-separated label columns (CheXpert: its 14)', {'default': ''}),
  ('--path_column', "image path column (CheXpert: 'Path')", {'default': 'path'}),
  ('--patient_column', 'patient id column', {'default': ''}),
  (
    '--no_patient_column_images_are_independent',
    'no patient column: every image is of a different patient',
    {'action': 'store_true'},
  ),
  ('--split_column', 'column of train/validation/test (else by patient)', {'default': ''}),
  (
    '--test_fraction',
    'fraction of PATIENTS put in test (no split column, no CheXpert valid/)',
    {'type': float, 'default': csv_dataset.DEFAULT_TEST_FRACTION},
  ),
  (
    '--format',
    'generic, or chexpert (Path, -1/blank)',
    {'default': 'generic', 'choices': tuple(csv_dataset.FORMATS)},
  ),
  (
    '--uncertainty',
    "CheXpert's -1: ignore (masked out), zeros or ones",
    {'default': 'ignore', 'choices': chexpert.UNCERTAINTY_POLICIES},
  ),
  ('--frontal_only', 'CheXpert: frontal views only', {'action': 'store_true'}),
)


def _add(group, flags):
  for flag, help_text, options in flags:
    group.add_argument(flag, help=help_text, **options)


def parse_args(argv):
  defaults = default_config.get_config()  # One source for the split defaults.
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].replace('\n', ' '))
  _add(
    p,
    (
      ('--data_dir', 'TFDS data_dir to write into', {'required': True}),
      (
        '--image_size',
        'stored side in pixels',
        {'type': int, 'default': defaults.dataset_image_size},
      ),
      (
        '--val_fraction',
        'fraction of PATIENTS put in validation',
        {'type': float, 'default': defaults.val_fraction},
      ),
      ('--split_seed', 'seed of the patient split', {'type': int, 'default': defaults.split_seed}),
      ('--skip_bad', 'leave bad inputs out (listed in metadata)', {'action': 'store_true'}),
      ('--num_workers', 'processes (default: all cores)', {'type': int, 'default': None}),
      ('--overwrite', 'replace a dataset built there from other inputs', {'action': 'store_true'}),
    ),
  )
  _add(p.add_argument_group('NIH ChestX-ray14'), _NIH_FLAGS)
  _add(p.add_argument_group('your own data (instead of --manual_dir)'), _OWN_FLAGS)
  args = p.parse_args(argv)
  args.csv = args.csv or []
  if bool(args.csv) == bool(args.manual_dir):
    p.error('give either --manual_dir (NIH ChestX-ray14) or --csv (your own data)')
  if args.csv and not (args.image_root and args.name):
    p.error('--csv needs --image_root and --name')
  return args


def _picked(args, *names) -> dict:
  return {name: getattr(args, name) for name in names}


def _csv_spec(args) -> csv_dataset.Spec:
  return csv_dataset.Spec(
    csv_paths=tuple(args.csv),
    labels=tuple(n.strip() for n in args.labels.split(',')) if args.labels else (),
    images_are_independent=args.no_patient_column_images_are_independent,
    **_picked(args, 'image_root', 'path_column', 'patient_column', 'split_column', 'format'),
    **_picked(args, 'uncertainty', 'frontal_only', 'val_fraction', 'test_fraction', 'split_seed'),
  )


def _build(args):
  common = _picked(args, 'data_dir', 'image_size', 'skip_bad', 'overwrite', 'num_workers')
  if args.csv:
    return csv_dataset.build(_csv_spec(args), name=args.name, **common)
  nih_only = _picked(args, 'val_fraction', 'split_seed', 'label_file', 'allow_subset')
  return prepare(args.manual_dir, **common, **nih_only)


def main(argv=None):
  args = parse_args(argv)
  tfds.disable_progress_bar()  # Ours (per split, in images) is the useful one.
  try:
    builder, outcome = _build(args)
  except errors.UserError as e:
    sys.exit(f'Nothing was written. {e}')
  for warning in builder.info.metadata.get('warnings') or []:
    print(f'warning: {warning}', file=sys.stderr)
  for line in skipped_lines(sources.upgraded_metadata(builder.info)):
    print(line, file=sys.stderr)
  print(summary(builder, outcome, args.data_dir))


_SKIPPED_SHOWN = 20


def skipped_lines(metadata) -> list[str]:
  """What --skip_bad left out, one line each (the first _SKIPPED_SHOWN, then a count)."""
  skipped = sorted((metadata.get('skipped') or {}).items())
  lines = [f'skipped: {name}: {why}' for name, why in skipped[:_SKIPPED_SHOWN]]
  hidden = metadata['num_skipped'] - len(lines)
  if hidden > 0:
    lines.append(f'skipped: {hidden} more (the dataset metadata lists up to {len(skipped)}).')
  return lines


if __name__ == '__main__':
  main()
