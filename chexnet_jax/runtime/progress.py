"""Step lines' clock: elapsed time of a run and the time left at its pace."""

import time


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
