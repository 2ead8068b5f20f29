"""GPU tests: skipped unless JAX sees a GPU.

The parent conftest pins JAX to the CPU (JAX_PLATFORMS=cpu) unless the caller
set JAX_PLATFORMS first; benchmarks/device_check.sh runs these tests with
JAX_PLATFORMS=cuda,cpu so that both backends are visible.
"""

import jax
import pytest


def _has_gpu():
  try:
    return bool(jax.devices('gpu'))
  except RuntimeError:  # No GPU backend: CPU-only machine or JAX_PLATFORMS=cpu.
    return False


def pytest_collection_modifyitems(config, items):
  del config
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason='no GPU visible to JAX')
  for item in items:
    if '/tests/gpu/' in str(item.fspath):
      item.add_marker(skip)
