"""What the commands share: the run arguments, one catch for the user's errors,
and a config file and its `--config.field=` overrides checked before absl parses them.

Overrides are checked against the config itself (its fields and their kinds), so
the sentence a typo gets does not depend on how a library words its errors.
"""

import argparse
import difflib
import importlib.util
import os
import re
import sys

import ml_collections

from chexnet_jax import errors
from chexnet_jax.run import run_reader

_OVERRIDE = re.compile(r'^--?config\.([^=\s]+)')


def _checkpoint_selector(value):
  """argparse shows a type's ArgumentTypeError as it is, any other error as 'invalid'."""
  try:
    return run_reader.parse_selector(value)
  except errors.UserValueError as error:
    raise argparse.ArgumentTypeError(str(error)) from None


def whole_number(minimum):
  """An argparse type: an int of at least `minimum`, else one sentence saying so."""

  def parse(value):
    try:
      number = int(value)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{value!r} is not a whole number') from None
    if number < minimum:
      raise argparse.ArgumentTypeError(f'{number} is below {minimum}; give {minimum} or more')
    return number

  parse.__name__ = f'whole number >= {minimum}'
  return parse


def add_run_arguments(parser):
  """--workdir and --checkpoint: which run, and which of its checkpoints."""
  parser.add_argument('--workdir', required=True, help='the training run directory')
  parser.add_argument(
    '--checkpoint', default='best', type=_checkpoint_selector, help=run_reader.checkpoint_help()
  )


def fail(error):
  """A UserError ends a command as `error: <sentence>` on stderr, exit status 1;
  anything else keeps its traceback: it is a bug to report."""
  print(f'error: {error}', file=sys.stderr)
  return 1


def config_file_of(argv):
  """(path, argument) of the --config flag in argv (ml_collections' 'file.py:arg'), or None."""
  for i, arg in enumerate(argv):
    if arg in ('--config', '-config') and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(('--config=', '-config=')):
      value = arg.split('=', 1)[1]
    else:
      continue
    path, _, config_arg = value.partition(':')
    return path, config_arg or None
  return None


def check_command_line(argv, required=('config', 'workdir')):
  """Raises a UserError for a missing flag, a config file that does not load, or an
  override naming no field of the config: the problems absl would word its own way."""
  for name in required:
    if not any(arg in (f'--{name}', f'-{name}') or arg.startswith(f'--{name}=') for arg in argv):
      raise errors.UserValueError(f'--{name} is required; run with --helpfull for the flags.')
  path, config_arg = config_file_of(argv)
  if not os.path.isfile(path):
    raise errors.UserFileNotFoundError(
      f'--config {path}: no such file; give a config file such as configs/cpu_smoke.py.'
    )
  config = load_config_file(path, config_arg)
  for arg in argv:
    match = _OVERRIDE.match(arg)
    if match:
      check_override(config, match.group(1))


def load_config_file(path, config_arg=None):
  """The ConfigDict of a config file, as ml_collections will load it."""
  try:
    spec = importlib.util.spec_from_file_location('_chexnet_config_file', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if config_arg else module.get_config()
  except Exception as error:  # pylint: disable=broad-except
    # Whatever the file raises (a syntax error, its own exception) is the user's to fix.
    raise errors.UserValueError(_unloadable(path, error)) from error


def _unloadable(path, error):
  """One sentence for a config file that does not import or run: its first cause."""
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  where = f', line {error.lineno}' if isinstance(error, SyntaxError) and error.lineno else ''
  detail = (str(error.args[0]) if error.args else str(error)).splitlines()
  reason = f'{type(error).__name__}{where}: {detail[0] if detail else ""}'.rstrip(': ')
  return f'--config {path} could not be loaded ({reason}); fix the file and run again.'


def check_override(config, dotted):
  """`--config.batchsize` names no field: say which field it may mean."""
  field, _, inner = dotted.partition('.')
  if field not in config:
    close = difflib.get_close_matches(field, list(config.keys()), n=1)
    hint = f' Did you mean {close[0]}?' if close else ''
    raise errors.UserValueError(
      f'unknown config field {field!r}.{hint} Every field is declared in configs/default.py.'
    )
  if inner and not isinstance(config[field], ml_collections.ConfigDict):
    raise errors.UserValueError(
      f'--config.{dotted} names a field inside {field}, which holds a value; config fields are '
      'flat (every field is declared in configs/default.py).'
    )
