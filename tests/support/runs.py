"""Running the trainer from a test: one command line, one free port.

Tests that train start `python -m chexnet_jax.main` in a subprocess (the
command users type), from the repository root so `configs/...` resolves.
"""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE_CONFIG = 'configs/cpu_smoke.py'
MAIN = 'chexnet_jax.main'


def trainer_command(workdir, *overrides, config=SMOKE_CONFIG, program=None, module=MAIN):
  """The trainer's command line; overrides are 'field=value' or whole flags.
  `module`: run with -m instead of chexnet_jax.main (a driver that wraps main
  to inject faults, tests/support/fault_driver.py); `program`: Python source
  run with -c instead."""
  flags = [o if o.startswith('-') else f'--config.{o}' for o in overrides]
  head = ['-c', program] if program else ['-m', module]
  return [sys.executable, *head, '--config', config, '--workdir', str(workdir), *flags]


def run_trainer(workdir, *overrides, config=SMOKE_CONFIG, program=None, timeout=600, **kwargs):
  """Runs the trainer to its end (from the repository root unless `cwd` says
  otherwise); a CompletedProcess with text stdout/stderr."""
  kwargs.setdefault('cwd', REPO)
  command = trainer_command(workdir, *overrides, config=config, program=program)
  return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def start_trainer(workdir, *overrides, config=SMOKE_CONFIG, **kwargs):
  """Starts the trainer without waiting (for tests that read, signal or kill it)."""
  kwargs.setdefault('stdout', subprocess.PIPE)
  kwargs.setdefault('stderr', subprocess.PIPE)
  command = trainer_command(workdir, *overrides, config=config)
  return subprocess.Popen(command, cwd=REPO, text=True, **kwargs)


def tool_command(tool, *args):
  """`python -m chexnet_jax.<tool> ARGS` (evaluate, predict, score)."""
  return [sys.executable, '-m', f'chexnet_jax.{tool}', *map(str, args)]


def free_port():
  """A TCP port nothing listens on now (for a coordinator or a local server)."""
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]
