"""Which stderr lines of evaluate and predict count as noise: every WARNING or ERROR
line a tool prints must be one it means, listed here with the reason."""

import re

# A line that reads as a warning or a fault: Python logging / absl ('WARNING:absl:',
# 'W1201 10:00:00 ...', 'E1201 ...'), a Python warning, a traceback.
_ALARMING = re.compile(
  r'(^|:)(WARNING|ERROR|CRITICAL)\b|^[WEF]\d{4} \d\d:\d\d|Warning:|^Traceback', re.IGNORECASE
)

# (pattern, why it is expected).
ALLOWED = (
  # predict reports each input it cannot read and goes on with the others.
  (re.compile(r'^error: .*: not a readable PNG/JPEG/DICOM image'), 'a bad input, named'),
)


def unexpected_lines(stderr):
  """The stderr lines that look like a warning or an error and are not ALLOWED."""
  lines = [line for chunk in stderr.splitlines() for line in chunk.split('\r')]
  return [
    line
    for line in lines
    if _ALARMING.search(line) and not any(pattern.search(line) for pattern, _ in ALLOWED)
  ]
