r"""Makes a published CheXNet checkpoint into a run that every tool reads.

  python -m chexnet_jax.import_weights FILE --workdir DIR [--data_dir TFDS_DIR]

FILE: arnoweng/CheXNet's model.pth.tar, a torchvision-layout DenseNet state dict with
a 14-output head (or one whose file names its labels), a Keras .h5, or a pickled
whole model such as jrzech/reproduce-chexnet's checkpoint (read with numpy: no
PyTorch needed, nothing in the file run). DIR (new or empty) then works with evaluate,
predict, score --compare, the notebook, and fine-tuning (--config.init_from=DIR).
run.json records the file, its sha256 and that the run was not trained here; the
labels are in the file's order (CheXNet's 14 when it names none). run/imported.py.
"""

import argparse
import sys

from chexnet_jax import command_line
from chexnet_jax import errors
from chexnet_jax.run import imported


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m chexnet_jax.import_weights',
    description='Turn a published CheXNet checkpoint into a chexnet_jax run directory.',
  )
  parser.add_argument('file', help='the checkpoint: .pth/.pth.tar/.pt state dict or .h5')
  parser.add_argument('--workdir', required=True, help='the run directory to create (new or empty)')
  parser.add_argument(
    '--data_dir',
    default='',
    help="where the built dataset lives, for evaluate ('' : give it later)",
  )
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    origin = imported.import_checkpoint(args.file, args.workdir, data_dir=args.data_dir)
  except errors.UserError as error:
    return command_line.fail(error)
  print(
    f'wrote {args.workdir}: {origin["format"]} {origin["file"]} (sha256 {origin["sha256"][:12]}), '
    f'not trained here; labels in {origin["labels"]}.\n'
    f'next: python -m chexnet_jax.predict IMAGE --workdir {args.workdir}'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
