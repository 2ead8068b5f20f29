"""Trains CheXNet: `python -m chexnet_jax.main --config configs/X.py --workdir DIR`.

Thin on purpose: flags, distributed start-up, then `train.train_and_evaluate`.
Any config field can be changed on the command line: `--config.batch_size=128`.
Running again with the same --workdir resumes from its latest checkpoint.
"""

import logging as std_logging
import os
import re
import sys
import threading

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from chexnet_jax.training import config_checks
from chexnet_jax.runtime import distributed
from chexnet_jax import errors
from chexnet_jax.model import imagenet_weights
from chexnet_jax.runtime import progress
from chexnet_jax.training import train
from chexnet_jax.run import workdir_lock
from input_pipeline import batching
from input_pipeline import pipeline
from input_pipeline import workers

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Run directory (resumed if it holds checkpoints).', required=True
)
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/cpu_smoke.py.', lock_config=True
)
flags.mark_flags_as_required(['config'])

# Errors the user can fix: one clear sentence, no traceback. Everything else
# (a FileNotFoundError or ValueError from a bug included) keeps its traceback.
USER_ERRORS = (
  errors.UserError,
  pipeline.DatasetError,
  workers.WorkerError,
  # Raised by modules whose errors are not UserErrors yet.
  train.NonFiniteLossError,
  batching.BatchSizeError,
  imagenet_weights.WeightsDownloadError,
  workdir_lock.WorkdirBusyError,
)


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
  progress.configure_console()
  threading.excepthook = _one_line_for_background_threads
  distributed.quiet_backend_probe()
  config = _CONFIG.value
  try:
    config_checks.check_fields(config)  # Every field, before JAX starts.
    distributed.initialize(config, workdir=_WORKDIR.value)
    train.train_and_evaluate(config, _WORKDIR.value)
  except USER_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)
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


def _config_file(argv):
  """The --config file named in argv (without ml_collections' ':args'), or None."""
  for i, arg in enumerate(argv):
    if arg in ('--config', '-config') and i + 1 < len(argv):
      return argv[i + 1].split(':')[0]
    if arg.startswith(('--config=', '-config=')):
      return arg.split('=', 1)[1].split(':')[0]
  return None


def _unknown_field_sentence(error):
  """ml_collections' "'batchsize'\\nDid you mean batch_size instead of batchsize?"
  as one sentence: the field, the suggestion if any, where fields are declared."""
  words = re.sub(r"\\n|\n|\\'|['\"]", ' ', str(error)).split()
  field = words[0] if words else '?'
  suggestion = re.search(r'Did you mean (\S+?) instead', ' '.join(words))
  hint = f' Did you mean {suggestion.group(1)}?' if suggestion else ''
  return f'unknown config field {field!r}.{hint} Every field is declared in configs/default.py.'


def _flag_problem(error):
  """absl's first line, without its final full stop (the caller goes on after
  '; '); a required flag left out is said as such."""
  line = str(error).splitlines()[0].rstrip('.')
  missing = re.match(r'flag --(\w+)=None: Flag --\1 must have a value other than None', line)
  return f'--{missing.group(1)} is required' if missing else line


def _unloadable(path, error):
  """One sentence for a config file that does not import or run."""
  while error.__cause__ is not None or error.__context__ is not None:  # The first cause.
    error = error.__cause__ or error.__context__
  where = ''
  if isinstance(error, SyntaxError) and error.lineno:
    where = f', line {error.lineno}'
  detail = (str(error.args[0]) if error.args else str(error)).splitlines()
  reason = f'{type(error).__name__}{where}: {detail[0] if detail else ""}'.rstrip(': ')
  return f'error: --config {path} could not be loaded ({reason}); fix the file and run again.'


def parse_flags(argv):
  """absl's parser, with a config typo (--config.batchsize=), a value that does
  not parse (--config.batch_size=abc) or a missing config file made one sentence."""
  path = _config_file(argv)
  if path is not None and not os.path.isfile(path):
    sys.exit(
      f'error: --config {path}: no such file; give a config file such as configs/cpu_smoke.py.'
    )
  try:
    parsed = flags.FLAGS(argv)
  except AttributeError as error:  # ml_collections: no such field.
    sys.exit(f'error: {_unknown_field_sentence(error)}')
  except TypeError:  # ml_collections: --config.model.x=, a field inside a value.
    nested = [a.split('=')[0] for a in argv if re.match(r'--?config\.\w+\.', a)]
    sys.exit(
      f'error: {" ".join(nested) or "a --config override"} names a field inside one that '
      'holds a value; config fields are flat (every field is declared in configs/default.py).'
    )
  except flags.Error as error:  # A value of the wrong type, a missing flag.
    cause = error.__cause__ or error.__context__
    if path is not None and cause is not None and 'config file' in str(error):
      sys.exit(_unloadable(path, cause))
    sys.exit(
      f'error: {_flag_problem(error)}; run with --helpfull for the '
      'flags, and see configs/default.py for the config fields.'
    )
  except Exception as error:  # pylint: disable=broad-except
    # The config file itself fails: a syntax error, an exception it raises.
    sys.exit(_unloadable(path, error))
  try:
    _CONFIG.value  # pylint: disable=pointless-statement
  except Exception as error:  # pylint: disable=broad-except
    sys.exit(_unloadable(path, error))
  return parsed


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
