"""`python -m chexnet_jax.main` plus test-only fault hooks, for tests/system/test_reliability.py.

Run from the repository root as `python -m tests.support.fault_driver` with
main's flags. It appends, before each train step runs, the step number and the
example indices of its batch (this process's rows) to <workdir>/steps.jsonl,
and injects the fault that the environment names, each at a step number:

  TEST_KILL_AFTER_SAVE     SIGKILL while that step's checkpoint is still being written
  TEST_KILL_AFTER_SAVED    SIGKILL once that step's checkpoint is complete
  TEST_DISK_FULL_AFTER_SAVE  writes over DISK_FULL_BYTES fail (EFBIG) after that save
  TEST_HANG_AT_STEP        that step hangs (like a collective waiting on a hung peer)
  TEST_VANISH_AFTER_SAVE   the checkpoints directory is deleted after that save
  TEST_CAPTURE_FAIL_AT_STEP  that step, built with config.gpu_command_buffers, runs (so
                           consumes its donated state) then raises XLA's error for a CUDA
                           graph that failed to capture
"""

import json
import os
import resource
import shutil
import signal
import sys
import time

from absl import app
import jax
import numpy as np

from chexnet_jax import main as trainer
from chexnet_jax.run import checkpoints
from chexnet_jax.training import train_step

DISK_FULL_BYTES = 100_000  # Lets logs and JSON through; not a state file.


def _step(name):
  return int(os.environ.get(name, -1))


def main():
  workdir = sys.argv[sys.argv.index('--workdir') + 1]
  kill_after_save = _step('TEST_KILL_AFTER_SAVE')
  kill_after_saved = _step('TEST_KILL_AFTER_SAVED')
  full_after_save = _step('TEST_DISK_FULL_AFTER_SAVE')
  hang_at_step = _step('TEST_HANG_AT_STEP')
  vanish_after_save = _step('TEST_VANISH_AFTER_SAVE')
  capture_fail_at_step = _step('TEST_CAPTURE_FAIL_AT_STEP')
  make_train_step, save = train_step.make_train_step, checkpoints.save

  def recording_make_train_step(config, *args, **kwargs):
    step_fn = make_train_step(config, *args, **kwargs)
    capturing = bool(config.gpu_command_buffers)

    def step(state, batch):
      shards = sorted(batch['index'].addressable_shards, key=lambda s: s.index[0].start or 0)
      rows = [np.asarray(s.data) for s in shards]
      record = {
        'step': int(state.step) + 1,  # This process's rows (all, alone).
        'index': np.concatenate(rows).tolist(),
      }
      with open(os.path.join(workdir, 'steps.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')
      if record['step'] == hang_at_step:  # Like a collective waiting on a hung peer.
        time.sleep(3600)
      result = step_fn(state, batch)
      if capturing and record['step'] == capture_fail_at_step:  # As XLA words it (GPU).
        raise jax.errors.JaxRuntimeError('INTERNAL: Failed to capture gpu graph: injected')
      return result

    return step

  def faulty_save(manager, state, data_iterator, metrics=None):
    step = save(manager, state, data_iterator, metrics)
    if step == kill_after_save:  # Its files are still being written.
      os.kill(os.getpid(), signal.SIGKILL)
    if step == kill_after_saved:  # The save just completed.
      checkpoints.wait_until_finished(manager)
      os.kill(os.getpid(), signal.SIGKILL)
    if step == vanish_after_save:  # Someone deletes the checkpoints directory.
      checkpoints.wait_until_finished(manager)
      shutil.rmtree(manager.directory)
    if step == full_after_save:  # The disk fills up after this save.
      checkpoints.wait_until_finished(manager)
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # Writes fail with EFBIG.
      resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL_BYTES, resource.RLIM_INFINITY))
    return step

  train_step.make_train_step, checkpoints.save = recording_make_train_step, faulty_save
  app.run(trainer.main, flags_parser=trainer.parse_flags)


if __name__ == '__main__':
  main()
