"""Metric writers: TensorBoard events, `metrics.jsonl` and a human progress line.

clu's metric writers would be the natural choice, but importing any of
`clu.metric_writers` imports TensorFlow (its package __init__ does), which we
keep out of the dependencies. tensorboardX writes the same event files.
"""

import json
import math
import os

import numpy as np


def _to_python(value):
  value = np.asarray(value).item()
  return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricWriter:
  """Writes scalars to TensorBoard and appends them to `workdir/metrics.jsonl`.

  Only process 0 should create one; the other processes get `NullWriter`.
  """

  def __init__(self, workdir):
    from tensorboardX import SummaryWriter  # Heavy import, process 0 only.

    self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write_scalars(self, step, scalars):
    record = {'step': int(step)}
    for name, value in scalars.items():
      record[name] = _to_python(value)
      if record[name] is not None:
        self._tensorboard.add_scalar(name, record[name], int(step))
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()

  def close(self):
    self._tensorboard.close()
    self._jsonl.close()


class NullWriter:
  """What processes other than 0 write to."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def close(self):
    pass


def progress_line(step, total_steps, scalars):
  """One line a human can follow: step, loss, throughput, input wait."""
  return (
    f'step {step}/{total_steps}  loss {scalars["train_loss"]:.4f}  '
    f'lr {scalars["learning_rate"]:.2e}  '
    f'{scalars["images_per_second"]:.1f} img/s  '
    f'step {scalars["step_time_ms"]:.0f} ms  '
    f'data wait {scalars["data_wait_ms"]:.0f} ms'
  )
