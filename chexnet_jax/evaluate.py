r"""Evaluates a trained run on a split and writes the report.

  python -m chexnet_jax.evaluate --workdir DIR [--checkpoint best|latest|STEP] \
      [--split test|validation] [--tta none|flip|tencrop] [--bootstrap 1000] \
      [--data_dir DIR]

Works from any directory; --data_dir says where the run's dataset lives now, if
it moved (or the run was trained on another machine).

Everything is per label of the run: its dataset's names and count
(run.json's labels: NIH's 14, or the labels a built CSV/CheXpert dataset
records). Writes DIR/eval/<split>/ (DIR/eval/<split>-<tta>/ with test-time augmentation):
  metrics.json      every number below, plus localisation scores where boxes exist
  auroc.csv         per label + mean: AUROC with 95% CI, AUPRC with 95% CI,
                    validation-chosen threshold, sensitivity, specificity, positives,
                    known and unknown labels (num_known, num_unknown)
  predictions.csv   index, image, patient, prob_<label> per label, label_<label> per
                    label (1, 0, or -1 for an unknown label, e.g. uncertain)
  report.html       one self-contained page of all of it (chexnet_jax/report/page.py)
  roc_curves.png, pr_curves.png, reliability.png (one panel per label),
  gallery/*.png     class activation maps of confident true positives (figures.py)
and DIR/eval/calibration.json, the temperature fitted on validation that
`predict --calibrated` applies (calibration.py; written without TTA only),
and prints the AUROC table, one row per label. Confidence intervals resample patients
(seeded). Thresholds maximise Youden's J on the validation split and are applied
unchanged to the evaluated split. An unknown label (below 0: CheXpert's uncertain
under U-Ignore) is left out of every number, curve and calibration fit of its label.

The command line only: evaluation/scoring.py scores and builds the report,
evaluation/localization.py makes the gallery's maps and scores localisation,
report/gallery.py draws them, report/eval_outputs.py writes the files (into a
temporary folder renamed into place at the end, so two evaluations of one split
never clobber each other) and report/page.py renders the page. It reads
the run through run_reader, so it never changes the run, even one training now.

Multi-process: start it like training (srun, or --coordinator_address with
--num_processes/--process_id on each process); every process scores its shard,
only process 0 writes.
"""

import argparse
import sys

from jax.experimental import multihost_utils

from chexnet_jax import command_line
from chexnet_jax.evaluation import calibration as calibration_lib
from chexnet_jax.run import run_reader
from chexnet_jax.runtime import distributed
from chexnet_jax import errors
from chexnet_jax.report import eval_outputs
from chexnet_jax.report import gallery as gallery_lib
from chexnet_jax.evaluation import label_columns
from chexnet_jax.evaluation import localization as localization_lib
from chexnet_jax.report import page as report_lib
from chexnet_jax.run import run_dir
from chexnet_jax.evaluation import scoring
from input_pipeline import sources


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m chexnet_jax.evaluate',
    description='Evaluate a trained chexnet_jax run: AUROC with patient-bootstrap '
    'CIs, AUPRC, thresholds, ROC curves, heatmaps.',
  )
  command_line.add_run_arguments(parser)
  parser.add_argument(
    '--data_dir',
    default=None,
    help="where the run's dataset lives now (default: the data_dir it was trained with)",
  )
  parser.add_argument('--split', default='test', choices=('test', 'validation'))
  parser.add_argument(
    '--tta',
    default='none',
    choices=scoring.TTA_MODES,
    help='test-time augmentation: none, flip, or tencrop',
  )
  parser.add_argument(
    '--bootstrap',
    type=command_line.whole_number(1),
    default=1000,
    help='patient-level bootstrap resamples for the 95%% CIs',
  )
  parser.add_argument('--seed', type=int, default=0, help='bootstrap seed')
  parser.add_argument(
    '--gallery', type=command_line.whole_number(0), default=8, help='heatmaps in the gallery'
  )
  parser.add_argument(
    '--coordinator_address', default='', help='host:port of process 0 (multi-process without Slurm)'
  )
  parser.add_argument('--num_processes', type=int, default=-1)
  parser.add_argument('--process_id', type=int, default=-1)
  return parser.parse_args(argv)


def _start_processes(args):
  """Joins the multi-process job (Slurm or explicit), like training does."""
  config = run_dir.load_config(args.workdir, args.data_dir)
  # The training job's own coordinator is not this job's: use the flags.
  config.coordinator_address = args.coordinator_address
  config.num_processes = args.num_processes
  config.process_id = args.process_id
  distributed.initialize(config)
  return config


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = _start_processes(args)
    # Another dataset's validation/test split may hold this run's training images.
    run_dir.check_dataset(
      args.workdir, sources.get_dataset_info(config), sources.split_file(config)
    )
    scoring.announce(f'loading the weights of {args.workdir} (checkpoint {args.checkpoint})')
    run = run_reader.load_run(args.workdir, args.checkpoint, config=config)
    evaluation = scoring.evaluate(
      run, args.split, args.tta, args.bootstrap, args.seed, progress=True
    )
    if evaluation is not None:  # Process 0.
      _write_or_say_why(args, run, evaluation)
  except errors.UserError as error:
    return command_line.fail(error)
  # The others wait here, not in JAX's shutdown barrier, whose timeout is short.
  multihost_utils.sync_global_devices('chexnet_jax.evaluate: written')
  return 0


def _write_or_say_why(args, run, evaluation):
  """_write; a full disk (or an unwritable workdir) in one sentence: the split's
  folder is written whole or not at all, so nothing of this evaluation is left."""
  try:
    _write(args, run, evaluation)
  except OSError as error:
    out_dir = eval_outputs.output_dir(args.workdir, args.split, args.tta)
    raise errors.UserRuntimeError(
      f'the report could not be written into {out_dir} '
      f'({error.strerror or error}{": " + error.filename if error.filename else ""}); '
      'the previous report, if any, is kept: free space (or make it writable) and '
      'evaluate again.'
    ) from None


def _write(args, run, evaluation):
  """Writes the split's folder whole (eval_outputs.published) and prints the table."""
  out_dir = eval_outputs.output_dir(args.workdir, args.split, args.tta)
  scoring.announce('drawing the heatmaps, scoring localisation, writing the report')
  with eval_outputs.published(out_dir) as staging:
    maps, localization = localization_lib.heatmaps_and_localization(run, evaluation, args.gallery)
    gallery = gallery_lib.write_gallery(staging, maps)
    eval_outputs.write_outputs(staging, evaluation, gallery, localization)
    report_lib.write_report(
      staging, evaluation, gallery, localization, report_lib.run_name(args.workdir)
    )
  if args.tta == 'none':  # predict scores without TTA: its temperature must too.
    calibration_lib.write_temperature(
      args.workdir, evaluation.report['calibration']['temperature'], run.step, args.tta
    )
  report = evaluation.report
  which = run_reader.describe_checkpoint(
    args.checkpoint, run.step, run.config, imported=bool(run.origin)
  )
  print(
    f'{args.split} split, checkpoint {which}, '
    f'tta {args.tta}, {report["num_examples"]} images of {report["num_patients"]} patients; '
    '95% CI: patient bootstrap; thresholds: Youden on validation'
  )
  print(f'labels: {evaluation.label_file}')
  if run.origin:
    print(f'weights: {run.origin}')
  if evaluation.patient_note:  # Once, not per row.
    print(f'patients: {evaluation.patient_note}')
  if evaluation.banner:
    print(f'caution: {evaluation.banner}')
  print(eval_outputs.format_auroc_table(report))
  print_notes(evaluation)
  print(f'calibration: temperature {report["calibration"]["temperature"]:.3f} fitted on validation')
  print(f'wrote {out_dir} (open {report_lib.report_path(out_dir)} in a browser)')


def print_notes(evaluation):
  """Under the table: why a cell is blank, and why a number is not a finding."""
  for name in evaluation.label_names:
    row = label_columns.label_row(evaluation.report, name)
    notes = [
      *report_lib.empty_cell_reasons(evaluation, name).values(),
      *label_columns.cautions(row),
    ]
    for note in dict.fromkeys(notes):
      print(f'  {name}: {note}')


if __name__ == '__main__':
  sys.exit(main())
