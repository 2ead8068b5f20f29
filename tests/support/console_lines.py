"""What counts as noise on a tool's console, and the lines a normal run may show.

A line is a warning or an error if absl (or XLA's C++ logging) prefixes it
W, E or F, if Python's logging or warnings module wrote it, if it is a
traceback, or if it says WARNING or ERROR. A normal run of the trainer,
evaluate or predict shows none of them except those allowed below, each with
the reason it is not noise.
"""

import re

_NOISE = re.compile(
  r'^[WEF]\d{4} |(^|:)(WARNING|ERROR|CRITICAL)\b|\w+Warning: |^Traceback |\bWARNING\b|\bERROR\b'
  r'|^error: |illegal|file a bug'
)

# (pattern, why a normal run may show it). Keep each entry's reason true.
ALLOWED = (
  (
    re.compile(r'An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib'),
    "JAX's one hint on a machine with an NVIDIA driver but a CPU-only jaxlib: "
    'the tests train on the CPU on purpose, a user may not.',
  ),
  (
    re.compile(r'^error: .*: not a readable PNG/JPEG/DICOM image'),
    'predict names each input it cannot read and goes on with the others.',
  ),
)


def unexpected_lines(console, allowed=ALLOWED):
  """The warning and error lines of `console` (a tool's stderr) not allowed;
  a progress bar's carriage returns separate lines too."""
  lines = [line for chunk in console.splitlines() for line in chunk.split('\r')]
  return [
    line
    for line in lines
    if _NOISE.search(line) and not any(pattern.search(line) for pattern, _ in allowed)
  ]
