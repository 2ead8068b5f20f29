r"""Exports a run's model for deployment: ONNX or a torchvision state dict (safetensors).

  python -m chexnet_jax.export --workdir DIR --format onnx|safetensors --output FILE \
      [--checkpoint best|latest|STEP]

onnx: input float32 [N, 3, H, W] normalised as torchvision does, output the sigmoid
probabilities [N, labels]; label names and preprocessing in the model's metadata
(ONNX Runtime, Triton, MONAI Deploy). safetensors: the state dict that
torchvision.models.densenet121(num_classes=N).load_state_dict takes. Each export is
checked against the model on a probe batch before it is written. Needs the 'export'
extra (pip install -e '.[export]'). run/export.py.
"""

import argparse
import sys

from chexnet_jax import command_line
from chexnet_jax import errors
from chexnet_jax.run import export


def parse_args(argv):
  parser = argparse.ArgumentParser(
    prog='python -m chexnet_jax.export',
    description="Write a run's model as ONNX or as a torchvision-layout safetensors file.",
  )
  command_line.add_run_arguments(parser)
  parser.add_argument('--format', required=True, choices=export.FORMATS)
  parser.add_argument('--output', required=True, help='the file to write (replaced whole)')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    summary = export.export_run(args.workdir, args.checkpoint, args.format, args.output)
  except errors.UserError as error:
    return command_line.fail(error)
  print(
    f'wrote {args.output}: {args.format}, step {summary["step"]} of {args.workdir}, '
    f'{len(summary["labels"])} labels; checked against the model on a probe batch '
    f'(largest difference {summary["difference"]:.1e}).'
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
