"""Running the trainer from a test: one command line, one free port.

Tests that train start `python -m chexnet_jax.main` in a subprocess (the
command users type), from the repository root so `configs/...` resolves.
"""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = 'configs/cpu_smoke.py'


def trainer_command(workdir, *overrides, config=SMOKE_CONFIG):
  """The trainer's command line; overrides are 'field=value' or full flags."""
  flags = [o if o.startswith('-') else f'--config.{o}' for o in overrides]
  return [
    sys.executable,
    '-m',
    'chexnet_jax.main',
    '--config',
    config,
    '--workdir',
    str(workdir),
  ] + flags


def run_trainer(workdir, *overrides, config=SMOKE_CONFIG, timeout=600, **kwargs):
  """Runs the trainer to its end; a CompletedProcess with text stdout/stderr."""
  return subprocess.run(
    trainer_command(workdir, *overrides, config=config),
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    **kwargs,
  )


def start_trainer(workdir, *overrides, config=SMOKE_CONFIG, **kwargs):
  """Starts the trainer without waiting (for tests that signal or kill it)."""
  kwargs.setdefault('stdout', subprocess.PIPE)
  kwargs.setdefault('stderr', subprocess.PIPE)
  return subprocess.Popen(
    trainer_command(workdir, *overrides, config=config), cwd=REPO, text=True, **kwargs
  )


def free_port():
  """A TCP port nothing listens on now (for a coordinator or a local server)."""
  with socket.socket() as sock:
    sock.bind(('localhost', 0))
    return sock.getsockname()[1]
