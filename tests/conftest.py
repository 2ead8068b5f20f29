"""Shared test set-up: 4 fake CPU devices so the sharded code paths run.

XLA reads the flag when JAX initialises its backend, so it is set here, before
any test module imports jax.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests start `python -m chexnet_jax.main` in subprocesses that compile
# the same small programs: a persistent cache shared by all of them saves minutes.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(REPO, '.cache', 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
if REPO not in sys.path:
  sys.path.insert(0, REPO)


# --------------------------------------------------------------------------
# A tiny trained run shared by the evaluation tests (evaluate, predict, CAM,
# notebook): trained once per session on synthetic data with configs/cpu_smoke.py.


import pytest  # noqa: E402

from tests.support import runs  # noqa: E402

TINY_RUN_STEPS = 48
# Beside (not in) the tiny run's workdir: the console of its training, which
# tests/unit/test_console.py reads for library noise.
TINY_RUN_CONSOLE = 'train.stderr'


# Fixtures that train or convert in a subprocess: a test that uses one is slow
# (make test-fast leaves it out) whether or not it says so itself.
SLOW_FIXTURES = ('tiny_run',)


def pytest_collection_modifyitems(items):
  for item in items:
    if set(SLOW_FIXTURES) & set(getattr(item, 'fixturenames', ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
  """Path of a workdir holding a cpu_smoke run trained for TINY_RUN_STEPS steps;
  its training's stderr is in the workdir's parent, TINY_RUN_CONSOLE.

  Under pytest-xdist the first worker to ask trains it and every worker gets its
  own copy (tests write evaluations into it): one training per session, not one
  per worker."""
  if not os.environ.get('PYTEST_XDIST_WORKER'):
    return _train_tiny_run(tmp_path_factory.mktemp('tiny_run'))
  import fcntl
  import shutil

  shared = tmp_path_factory.getbasetemp().parent / 'tiny_run'  # The session's, all workers'.
  shared.mkdir(exist_ok=True)
  with open(shared / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # The others wait here while the first one trains.
    if not (shared / 'trained').exists():
      _train_tiny_run(shared)
      (shared / 'trained').touch()
  mine = tmp_path_factory.mktemp('tiny_run')
  shutil.copytree(shared / 'run', mine / 'run')
  shutil.copy(shared / TINY_RUN_CONSOLE, mine)
  return str(mine / 'run')


def _train_tiny_run(parent):
  """Trains the tiny run into parent/run, its stderr in parent/TINY_RUN_CONSOLE."""
  workdir = str(parent / 'run')
  result = runs.run_trainer(workdir, f'num_train_steps={TINY_RUN_STEPS}')
  with open(os.path.join(os.path.dirname(workdir), TINY_RUN_CONSOLE), 'w') as f:
    f.write(result.stderr)
  if result.returncode != 0:
    raise RuntimeError(
      f'tests/conftest.py tiny_run: training failed ({" ".join(result.args)}):\n'
      f'{result.stderr[-3000:]}'
    )
  return workdir


# --------------------------------------------------------------------------
# Real NIH data, all in the repository: demo_data/ (300 images shrunk to 256 px)
# and tests/fixtures/nih/ (NIH's full CSVs and a few full-size originals).

import collections  # noqa: E402

DEMO_DATA = os.path.join(REPO, 'demo_data')
NIH_FIXTURES = os.path.join(REPO, 'tests', 'fixtures', 'nih')
NihSample = collections.namedtuple(
  'NihSample', 'manual_dir data_dir image_size sixteen_bit_image names originals'
)


def full_size_originals():
  """Names of the full-size NIH originals in tests/fixtures/nih/images."""
  return sorted(os.listdir(os.path.join(NIH_FIXTURES, 'images')))


def _write_sixteen_bit(source_png, target_png):
  """A 16-bit ('I;16') copy of an 8-bit X-ray: value v -> 1000 + 200 v."""
  import numpy as np
  from PIL import Image

  grey = np.asarray(Image.open(source_png).convert('L'), np.uint16)
  Image.fromarray(1000 + 200 * grey).save(target_png)


def _nih_sample_manual_dir(root, sixteen_bit_image):
  """NIH layout over demo_data's 300 images, the full-size originals in place of
  their shrunk copies, one image re-saved as 16-bit; NIH's full CSVs; split lists
  made by patient."""
  from input_pipeline import make_demo_sample, nih

  images = root / 'images'
  images.mkdir(parents=True)
  names = sorted(os.listdir(os.path.join(DEMO_DATA, 'images')))
  originals = set(full_size_originals())
  for name in names:
    folder = NIH_FIXTURES if name in originals else DEMO_DATA
    source = os.path.join(folder, 'images', name)
    if name == sixteen_bit_image:
      _write_sixteen_bit(source, images / name)
    else:
      (images / name).symlink_to(source)
  for name in ('Data_Entry_2017_v2020.csv.gz', 'BBox_List_2017.csv'):
    (root / name).symlink_to(os.path.join(NIH_FIXTURES, name))
  entries, _ = nih.read_data_entry(str(root / 'Data_Entry_2017_v2020.csv.gz'))
  make_demo_sample.write_split_lists(str(root), entries, names, seed=0)
  return str(root), names


@pytest.fixture(scope='session')
def nih_sample(tmp_path_factory):
  """demo_data's 300 images (3 of them full-size originals, 1 made 16-bit) built
  into a TFDS dataset at 64 px (allow_subset)."""
  from input_pipeline import build

  root = tmp_path_factory.mktemp('nih_sample')
  sixteen_bit_image = '00000129_000.png'
  manual_dir, names = _nih_sample_manual_dir(root / 'manual', sixteen_bit_image)
  data_dir = str(root / 'tfds')
  build.build(manual_dir, data_dir, 64, allow_subset=True, num_workers=2)
  return NihSample(manual_dir, data_dir, 64, sixteen_bit_image, names, full_size_originals())
