"""The console a person reads: absl's lines without thread ids, and one line as
each long phase starts (so that a silent minute reads as work, not a hang).

absl, jax and the standard library only; every command may use it.
"""

import logging as std_logging
import time

from absl import logging
import jax


class ConsoleFormatter(std_logging.Formatter):
  """absl's line prefix (level, date, time, file:line) without the thread id,
  which is the same on every line of a run and only hides the message."""

  def __init__(self):
    super().__init__('%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s')

  def formatTime(self, record, datefmt=None):
    del datefmt
    stamp = time.strftime('%m%d %H:%M:%S', time.localtime(record.created))
    return f'{stamp}.{int(record.msecs):03d}'


def configure_console():
  """absl's stderr handler writes ConsoleFormatter's lines from now on."""
  logging.get_absl_handler().setFormatter(ConsoleFormatter())


def phase(message, *args, stacklevel=2):
  """One INFO line on process 0 as a long phase starts, so that a silent
  minute reads as work, not a hang. The line names the caller's file:line
  (`stacklevel` 3 from this module's own phase functions)."""
  if jax.process_index() == 0:
    logging.info(message, *args, stacklevel=stacklevel)
