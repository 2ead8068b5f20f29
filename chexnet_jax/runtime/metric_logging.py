"""Metric writers: TensorBoard events, `metrics.jsonl` and a human progress line.

clu's metric writers would be the natural choice, but importing any of
`clu.metric_writers` imports TensorFlow (its package __init__ does), which we
keep out of the dependencies. tensorboardX writes the same event files.
"""

import json
import math
import os
import re
import sys

import numpy as np

from chexnet_jax.runtime import files


# tensorboardX's rule for a tag: it logs 'Summary name ... is illegal' and
# rewrites any other character (and leading '/'); labels such as 'No Finding'
# have spaces.
_NOT_IN_TAGS = re.compile(r'[^-/\w.]')


def tensorboard_tag(name):
  """`name` as a legal TensorBoard tag: each other character becomes '_'."""
  return _NOT_IN_TAGS.sub('_', name).lstrip('/')


def _to_python(value):
  value = np.asarray(value).item()
  return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricWriter:
  """Writes scalars to TensorBoard and appends them to `workdir/metrics.jsonl`.

  metrics.jsonl keeps each name as given; TensorBoard gets `tensorboard_tag(name)`.

  Only process 0 should create one; the other processes get `NullWriter`.
  """

  def __init__(self, workdir, resumed_step=None):
    """`resumed_step`: the checkpoint step a resumed run goes on from; the rows of
    later steps (done, then lost with the process) are superseded by the redone
    steps' rows, in metrics.jsonl and in TensorBoard (its purge_step)."""
    SummaryWriter = _summary_writer_class()  # Heavy import, process 0 only.

    path = os.path.join(workdir, 'metrics.jsonl')
    purge = None if resumed_step is None else int(resumed_step) + 1
    if purge is not None:
      _drop_rows_from(path, purge)
    self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=purge)
    self._jsonl = open(path, 'a')

  def write_scalars(self, step, scalars):
    record = {'step': int(step)}
    for name, value in scalars.items():
      record[name] = _to_python(value)
      if record[name] is not None:
        self._tensorboard.add_scalar(tensorboard_tag(name), record[name], int(step))
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()

  def close(self):
    self._tensorboard.close()
    self._jsonl.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch whenever it is installed (the export extra), only
  to accept torch tensors; that cost 1.5-3 s at every start, and we write
  floats. While `sys.modules['torch']` is None, `import torch` raises
  ImportError, which tensorboardX catches.
  """
  hidden = 'torch' not in sys.modules
  if hidden:
    sys.modules['torch'] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    if hidden:
      del sys.modules['torch']
  return SummaryWriter


def _drop_rows_from(path, step):
  """Rewrites metrics.jsonl (whole, atomically) without its rows of `step` and
  later, and without a line torn by a kill."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] < step:
        kept.append(line if line.endswith('\n') else line + '\n')
  files.write_atomically(path, ''.join(kept).encode())


class NullWriter:
  """What processes other than 0 write to."""

  def write_scalars(self, step, scalars):
    del step, scalars

  def close(self):
    pass


def progress_line(step, total_steps, scalars):
  """One line a human can follow: step, loss, throughput, input wait. The
  throughput is absent for an interval that held only the compiling step."""
  line = (
    f'step {step}/{total_steps}  loss {scalars["train_loss"]:.4f}  '
    f'lr {scalars["learning_rate"]:.2e}'
  )
  if 'images_per_second' in scalars:
    line += (
      f'  {scalars["images_per_second"]:.1f} img/s  '
      f'step {scalars["step_time_ms"]:.0f} ms  '
      f'data wait {scalars["data_wait_ms"]:.0f} ms'
    )
  return line
