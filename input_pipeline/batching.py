"""How a global batch splits over devices or processes: the one rule, in one place.

Pure Python, so the benchmark (which imports no grain) applies it too.
"""

from chexnet_jax import errors


class BatchSizeError(errors.UserValueError):
  """A global batch size that does not split evenly."""


def split_batch(
  global_batch: int, parts: int, *, field: str = 'batch_size', unit: str = 'processes'
) -> int:
  """global_batch // parts; BatchSizeError naming the field and a fix otherwise."""
  if global_batch <= 0 or global_batch % parts:
    fix = max(parts, global_batch - global_batch % parts)
    raise BatchSizeError(
      f'config.{field}={global_batch} does not divide over {parts} {unit}; '
      f'set --config.{field} to a multiple of {parts} (e.g. {fix}).'
    )
  return global_batch // parts
