"""The one kind of error that is the user's to fix.

A tool raises UserError (or a subclass) for a mistake the user can correct: a
missing run, a checkpoint that does not exist, a damaged step, a file it needs.
Its message is one sentence naming the file or field and the fix. Both packages
raise it (input_pipeline too), and each command catches this one type
(command_line.user_errors_as_one_line) and prints `error: <message>`; every other
exception keeps its traceback, because it is a bug to report.

A leaf of the module graph: the standard library only.
"""


class UserError(Exception):
  """A mistake the user can fix; the message is one sentence that says how."""


class UserValueError(UserError, ValueError):
  """A value the user gave (a flag, a field, a step) that cannot be used."""


class UserFileNotFoundError(UserError, FileNotFoundError):
  """A file or directory the user named, or that a step needs, does not exist."""


class UserRuntimeError(UserError, RuntimeError):
  """A state the user can change: a busy workdir, a failed download, a job launched wrong."""
