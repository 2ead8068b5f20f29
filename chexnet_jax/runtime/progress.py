"""What a person reads while a run trains: a line for each long phase, step
lines with elapsed time and ETA, and a console without absl's thread ids.

A leaf module (absl, jax and the standard library only): train.py and main.py
call it; the evaluation tools may use `configure_console` too.
"""

import logging as std_logging
import os
import time

from absl import logging
import jax

# Training crops that keep less than this fraction of the stored image's area
# train on a small part of each record: a config meant for other records (e.g.
# cpu_smoke's 32 px crops of 224 px records), not a choice.
SMALL_CROP_AREA = 0.5
_CROPPING_AUGMENTS = ('random_crop', 'center_crop')
# What compiling costs, where it is long enough to look like a hang (the
# DenseNets on a CPU: about a minute for the initialiser, minutes for a step).
_SLOW_TO_COMPILE = ('densenet121', 'densenet169', 'densenet201')


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


def dataset_phase(config):
  """The line before the dataset's files are opened (synthetic data has none)."""
  if config.dataset != 'synthetic':
    phase('Opening dataset %r in %s...', config.dataset, config.data_dir, stacklevel=3)


def is_slow_to_compile(config):
  return config.model in _SLOW_TO_COMPILE and jax.default_backend() == 'cpu'


def state_phase(config):
  """The line before the train state is built: where its weights come from
  and, for a DenseNet on a CPU, that compiling the initialiser takes a while."""
  init_from = config.init_from or 'none'
  source = {
    'imagenet': 'ImageNet weights',
    'none': 'random weights',
  }.get(init_from.lower(), f'the weights in {init_from}')
  if os.path.isdir(init_from):  # A trained run (run_weights.py).
    source = f'the best checkpoint of the run in {init_from}'
  slow = '; compiling its initialiser takes about a minute on a CPU' * is_slow_to_compile(config)
  phase('Building the train state (%s, %s)%s...', config.model, source, slow, stacklevel=3)


def compile_phase(config, step):
  """The line before the first (compiling) train step."""
  slow = '; a DenseNet on a CPU takes minutes' * is_slow_to_compile(config)
  phase('Compiling the train step (first step, %d)%s...', step + 1, slow, stacklevel=3)


def validation_phase(step, num_examples, eval_batch_size, first):
  """The line before each validation pass, with its size; the first pass also
  compiles the evaluation step."""
  batches = -(-num_examples // eval_batch_size)
  phase(
    'step %d: validating on %d images (%d batch%s of %d)%s...',
    step,
    num_examples,
    batches,
    '' if batches == 1 else 'es',
    eval_batch_size,
    '; the first pass compiles the evaluation step' if first else '',
    stacklevel=3,
  )


def small_crop_warning(config):
  """One sentence when training crops a small part of each stored image, or None.

  The rule: 'random_crop' and 'center_crop' keep (image_size / dataset_image_size)^2
  of the stored image's area; below SMALL_CROP_AREA it is named.
  """
  if config.augment not in _CROPPING_AUGMENTS or config.dataset_image_size <= 0:
    return None
  fraction = (config.image_size / config.dataset_image_size) ** 2
  if fraction >= SMALL_CROP_AREA:
    return None
  return (
    f'config.augment={config.augment!r} trains on {config.image_size} px crops of '
    f'{config.dataset_image_size} px records, {fraction:.0%} of each image '
    f'(warned below {SMALL_CROP_AREA:.0%}); to train on whole images set '
    '--config.augment=resize --config.eval_preprocess=resize (the defaults, as in '
    "configs/cpu.py), or build the records at the model's --image_size."
  )


def warn_if_small_crop(config):
  message = small_crop_warning(config)
  if message and jax.process_index() == 0:
    logging.warning('%s', message)


def duration(seconds):
  """'42 s', '3 min 05 s', '2 h 07 min': as a person reads a clock."""
  seconds = int(round(seconds))
  if seconds < 60:
    return f'{seconds} s'
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f'{minutes} min {seconds:02d} s'
  hours, minutes = divmod(minutes, 60)
  return f'{hours} h {minutes:02d} min'


class RunClock:
  """Elapsed time of this process's training and the time left at its pace.

  The pace is measured from the end of the first step, so that its compile
  does not count; it includes the validation passes and saves, which recur.
  """

  def __init__(self, total_steps, now=time.monotonic):
    self._now, self._total = now, total_steps
    self._started = now()
    self._pace_from = None  # (time, step) once the first step has run.

  def first_step_done(self, step):
    self._pace_from = (self._now(), step)

  def elapsed(self):
    return self._now() - self._started

  def remaining(self, step):
    """Seconds left at the pace since the first step, or None before it is known."""
    if self._pace_from is None or step <= self._pace_from[1]:
      return None
    since, from_step = self._pace_from
    per_step = (self._now() - since) / (step - from_step)
    return per_step * (self._total - step)

  def suffix(self, step):
    """'  elapsed 1 min 02 s  ETA 4 min 10 s' for a step line."""
    left = self.remaining(step)
    eta = f'  ETA {duration(left)}' if left is not None else ''
    return f'  elapsed {duration(self.elapsed())}{eta}'
