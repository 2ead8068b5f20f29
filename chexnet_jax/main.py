"""Trains CheXNet: `python -m chexnet_jax.main --config configs/X.py --workdir DIR`.

Thin on purpose: flags, distributed start-up, then `train.train_and_evaluate`.
Any config field can be changed on the command line: `--config.batch_size=128`.
Running again with the same --workdir resumes from its latest checkpoint.
"""

import logging as std_logging
import sys
import threading

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from chexnet_jax.runtime import console
from chexnet_jax import command_line
from chexnet_jax import errors
from chexnet_jax.training import config_checks
from chexnet_jax.runtime import distributed
from chexnet_jax.training import train

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Run directory (resumed if it holds checkpoints).', required=True
)
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/cpu_smoke.py.', lock_config=True
)
flags.mark_flags_as_required(['config'])


class _QuietLibraries(std_logging.Filter):
  """orbax logs every step of every save at INFO, and warns at every save
  between epochs that it has no metrics (by design: only epoch ends have)."""

  def filter(self, record):
    if record.name == 'asyncio' and 'exception was never retrieved' in record.getMessage():
      # orbax's write tasks that failed with a failed save (the trainer runs no
      # asyncio of its own): the save's failure is already one sentence.
      return False
    if '/orbax/' not in record.pathname:
      return True
    # A failed save is reported by us in one sentence; orbax's tracebacks of
    # each of its threads would bury it.
    record.exc_info, record.exc_text = None, None
    return (
      record.levelno >= std_logging.WARNING and 'did not provide metrics' not in record.getMessage()
    )


def _one_line_for_background_threads(args):
  """After a failed save, orbax's writer threads can still fail as the process
  shuts down ('Event loop is closed'); the cause is already reported in one
  sentence, so each such thread gets one line, not a traceback."""
  name = args.thread.name if args.thread else 'unknown'
  logging.warning(
    'background thread %s stopped: %s: %s', name, args.exc_type.__name__, args.exc_value
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  console.configure_console()
  threading.excepthook = _one_line_for_background_threads
  distributed.quiet_backend_probe()
  config = _CONFIG.value
  try:
    config_checks.check_fields(config)  # Every field, before JAX starts.
    distributed.initialize(config, workdir=_WORKDIR.value)
    train.train_and_evaluate(config, _WORKDIR.value)
  except errors.UserError as error:
    sys.exit(command_line.fail(error))
  except (jax.errors.JaxRuntimeError, ValueError) as error:
    # A dead peer: one sentence, exit 1. A collective in orbax's save raises it
    # as a ValueError ('UNKNOWN: Gloo AllGather failed ... Connection reset').
    distributed.exit_if_peer_lost(error)
    raise
  except KeyboardInterrupt:  # Ctrl-C before training started (the loop saves).
    print(
      'error: interrupted (Ctrl-C) before training started; the workdir is as it was.',
      file=sys.stderr,
    )
    sys.exit(train.INTERRUPTED_EXIT_CODE)


def parse_flags(argv):
  """absl's parser, after command_line has checked what absl words its own way:
  a missing flag, a config file that does not load, an override naming no field."""
  try:
    command_line.check_command_line(argv[1:])
  except errors.UserError as error:
    sys.exit(command_line.fail(error))
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:  # A value of the wrong type: absl's own first line.
    sys.exit(
      f'error: {str(error).splitlines()[0]} (run with --helpfull for the flags; every config '
      'field is declared in configs/default.py).'
    )


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
