"""Checkpoints: one orbax CheckpointManager for the train state and the input
position (WORKDIR/checkpoints/N/, items 'state' and 'data'), used by the
training run alone; and `load_run`, which puts a trained run's weights on the
mesh for evaluation and prediction, read by run_reader (read-only: only the
training run's manager sets a damaged step aside).

'data' is topology-free JSON: the global step, batch size and seed fix the
input stream (input_pipeline/pipeline.py), plus the process and device counts
it was saved on, so that a run resumes on any number of processes.

orbax writes each step to a temporary directory and renames it when complete,
so a save killed half-way never appears as a step. The checksums are part of
the save: once every process has written its arrays, and before orbax renames
the temporary directory into step N, process 0 writes N/checksums.json, the
sha256 of every file of the step (checkpoint_files.py: orbax's commit file and
commit time, written after, are left out). A step is therefore verifiable from
the moment it exists. A restore verifies it first: a step whose files differ (a
flipped bit, a truncated or missing file, anywhere: arrays, 'data', metadata)
or whose checksums are missing is "corrupt", one that orbax cannot read is
"unreadable"; either is moved aside to <step>.corrupt-<time> or
<step>.unreadable-<time>, with one log line, and the previous step is used.
Only a step saved by a chexnet_jax that wrote checksums at the next save (its
'data' lacks checkpoint_files.MARKER) is restored without checksums,
with a log line saying so. The checksums and the torn-metrics check are
checkpoint_files' (run_reader applies the same rule to a run it reads,
refusing a bad step instead of moving it aside).
"""

import contextlib
import functools
import os
import re
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from chexnet_jax.run import checkpoint_files
from chexnet_jax.run import run_dir
from chexnet_jax.run import run_reader

# The rule that picks a run's best step is run_reader's (which evaluate, predict,
# the notebook and fine-tuning read a run with): one rule for the writer and readers.
# Which files a step must match, and which metrics files are torn: checkpoint_files'
# rule, shared with run_weights (fine-tuning refuses such a step of its source run).
# Bounds orbax's wait for a background write (its default: 5 minutes and more
# on a directory turned read-only); a save of DenseNet121 takes seconds.
SAVE_TIMEOUT_SECONDS = 120
# The step each checkpoint directory's save in flight writes (one at a time:
# a save waits for the previous one), for the checksum callback.
_SAVING = {}


# A checkpoint chosen for evaluation or prediction is missing, damaged or not chosen yet.


def create_manager(workdir, keep, best_metric):
  """Keeps the last `keep` steps and the best by `best_metric` (config.best_metric:
  'val_loss', lowest wins, as CheXNet chose; or 'val_mean_auroc', highest wins).
  config_checks has refused any other name before this runs."""
  _best_metric_fn = functools.partial(run_reader.best_score, name=best_metric)
  policy = ocp.checkpoint_managers.AnyPreservationPolicy(
    [
      ocp.checkpoint_managers.LatestN(n=keep),
      ocp.checkpoint_managers.BestN(
        get_metric_fn=_best_metric_fn, n=1, keep_checkpoints_without_metrics=False
      ),
    ]
  )
  directory = checkpoint_files.checkpoint_dir(workdir)
  options = ocp.CheckpointManagerOptions(
    preservation_policy=policy,
    best_fn=_best_metric_fn,
    best_mode='max',
    enable_async_checkpointing=True,
    create=True,
    async_options=ocp.AsyncOptions(
      timeout_secs=SAVE_TIMEOUT_SECONDS,
      # orbax calls it on process 0 once all processes have written, before
      # it renames the temporary directory into the step.
      post_finalization_callback=functools.partial(_write_checksums, directory),
    ),
  )
  _set_aside_torn_metrics(directory)
  return ocp.CheckpointManager(directory, options=options, item_names=('state', 'data'))


def _set_aside_torn_metrics(directory):
  """orbax reads every step's metrics when it opens the directory: a torn
  metrics file would stop every tool with a JSONDecodeError."""
  for step, reason in checkpoint_files.torn_metrics(directory):
    _set_aside(directory, step, reason)
  if jax.process_count() > 1:  # None may open the directory before it moved.
    multihost_utils.sync_global_devices('checkpoint metrics checked')


def save(manager, state, data=None, metrics=None):
  """Starts an asynchronous save of `state` and the input position `data` (a
  JSON-able dict, see module doc); its checksums are written as part of it.
  First waits for the previous save and proves the directory still takes a
  write: a full disk or a read-only directory is reported at this save, in one
  sentence."""
  items = {'state': ocp.args.StandardSave(state)}
  # The marker tells a complete step that lost its checksums (damaged) from
  # one that predates them.
  items['data'] = ocp.args.JsonSave(dict(data or {}, **checkpoint_files.MARKER))
  step = int(jax.device_get(state.step))
  with _write_errors(manager):  # Also reports the previous save's failure.
    manager.wait_until_finished()
    _probe_writable(manager.directory)
    _SAVING[str(manager.directory)] = step
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)
  return step


def wait_until_finished(manager):
  """Waits for the asynchronous save (checksums included); a failed write is
  one clear error."""
  with _write_errors(manager):
    manager.wait_until_finished()


def _write_checksums(directory):
  """orbax's post-finalization callback: checksums the step being saved in its
  temporary directory (or in place, where orbax's atomicity writes in place)."""
  step = _SAVING[directory]
  temporary = os.path.join(directory, f'{step}{ocp.path.atomicity_types.TMP_DIR_SUFFIX}')
  path = temporary if os.path.isdir(temporary) else os.path.join(directory, str(step))
  checkpoint_files.write_checksums(path)


def _probe_writable(directory):
  """A byte written and flushed: a full disk or read-only directory fails here."""
  if jax.process_index() != 0:
    return
  path = os.path.join(directory, f'.write-probe-{os.getpid()}')
  try:
    with open(path, 'wb') as probe:
      probe.write(b'x')
      probe.flush()
      os.fsync(probe.fileno())
  finally:
    with contextlib.suppress(OSError):
      os.remove(path)


@contextlib.contextmanager
def _write_errors(manager):
  """A save that failed for want of space or permission -> WorkdirError.

  orbax raises such failures as ValueError/TimeoutError from its background
  threads, whose cause (errno) is buried in a long message.
  """
  try:
    yield
  except Exception as error:  # pylint: disable=broad-except
    reason = _os_error(error)
    if reason is None and isinstance(error, TimeoutError):
      reason = (
        f'no write finished within {SAVE_TIMEOUT_SECONDS} s: the file '
        'system hangs, is read-only or vanished'
      )
    if reason is None:
      raise
    steps = checkpoint_files.finished_steps(manager.directory)
    kept = (
      f'The last complete checkpoint is step {steps[-1]}; free space (or fix the '
      'directory), then run again to resume from it.'
      if steps
      else 'No checkpoint was complete yet; free space (or fix the directory), then '
      'run again: it starts afresh.'
    )
    raise run_dir.WorkdirError(
      f'Writing a checkpoint to {manager.directory} failed ({reason}). {kept}'
    ) from error


def _os_error(error):
  """The OS reason of a failed write, e.g. 'No space left on device', or None."""
  while error is not None:
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    code = re.search(r"os_error_code='(\d+)'", str(error))  # tensorstore's.
    if code:
      return os.strerror(int(code.group(1)))
    error = error.__cause__ or error.__context__
  return None


def restore_latest(manager, state_template):
  """Restores the newest intact step: (state, step, data) or (None, None, None).

  `data` is the step's input position (see `save`), or None for a step saved
  by an older chexnet_jax (grain's per-process iterator state). A corrupt or
  unreadable step is moved aside, so that it is not taken for the latest.
  """
  _log_unfinished_saves(manager)
  for step in sorted(manager.all_steps(), reverse=True):
    problem = checkpoint_files.verify(os.path.join(manager.directory, str(step)))
    if problem == checkpoint_files.UNVERIFIED:
      logging.warning(
        'Checkpoint step %d in %s has no %s: it predates checksums at save '
        '(an older chexnet_jax wrote them at the next save); restoring it unverified.',
        step,
        manager.directory,
        checkpoint_files.CHECKSUM_FILE,
      )
    elif problem:
      _set_aside(manager.directory, step, problem, 'corrupt')
      continue
    try:
      restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(state_template))
      )
    except Exception as error:  # pylint: disable=broad-except
      _set_aside(
        manager.directory,
        step,
        f'{type(error).__name__}: {checkpoint_files.first_line(error)}',
        'unreadable',
      )
      continue
    data = _restore_data(manager, step)
    _reload(manager)
    return restored['state'], step, data
  _reload(manager)
  return None, None, None


def _restore_data(manager, step):
  if not os.path.exists(os.path.join(manager.directory, str(step), 'data')):
    return None
  try:
    return dict(manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data'])
  except Exception:  # pylint: disable=broad-except
    return None  # Saved by an older chexnet_jax: grain's per-process state.


def _reload(manager):
  """Forgets the steps set aside (after every process has tried them)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('checkpoints restored')
  manager.reload()


def _log_unfinished_saves(manager):
  for name in sorted(os.listdir(manager.directory)):
    if name.endswith('.orbax-checkpoint-tmp'):
      logging.warning(
        'Ignoring %s in %s: a save that never finished (the run stopped while writing it).',
        name,
        manager.directory,
      )


def _set_aside(directory, step, reason, kind='unreadable'):
  """Renames a bad step to <step>.<kind>-<time> (for inspection), kind being
  'corrupt' (checksums differ) or 'unreadable' (orbax or JSON cannot read it).

  Left in place, it would still be the manager's latest step (for load_run)
  and the resumed run would fail to save that step again ("already exists").
  """
  logging.warning(
    'Checkpoint step %d in %s is %s (%s); moving it to %d.%s-*; trying the previous one.',
    step,
    directory,
    kind,
    reason,
    step,
    kind,
  )
  if jax.process_index() == 0:  # The others may not see it any more.
    path = os.path.join(directory, str(step))
    with contextlib.suppress(FileNotFoundError):
      os.replace(path, f'{path}.{kind}-{int(time.time())}')


# ----------------------------------------------------------- loading a run --
