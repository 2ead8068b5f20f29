"""A build that meets a full disk or a concurrent build of the same dataset stops
in one sentence; an interrupted build's leftovers go with the next good build and
are never listed as a built dataset."""

import os
import subprocess
import sys
import time

import pytest

from input_pipeline import records
from input_pipeline import sources
from tests.unit import test_records

REPO = test_records.REPO

_BUILD = """
import sys
from chexnet_jax import errors
from input_pipeline import records
from tests.unit import test_records
try:
  records.write(test_records.tiny_plan(), sys.argv[1], num_workers=1)
except errors.UserError as error:
  sys.exit(f'Nothing was written. {error}')
"""


def test_a_full_disk_during_a_build_is_one_sentence(tmp_path):
  """RLIMIT_FSIZE stands in for a full disk (writes fail as they do then, EFBIG
  instead of ENOSPC; it works as root, unlike a small read-only mount)."""
  data_dir = tmp_path / 'data'
  result = subprocess.run(
    ['bash', '-c', 'ulimit -f 1; exec "$@"', 'bash', sys.executable, '-c', _BUILD, str(data_dir)],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO, PYTHONDONTWRITEBYTECODE='1'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]  # After the progress bars' last redraw.
  assert line.endswith('then build again.') and line.count('Nothing was written.') == 1, line
  assert f'Nothing was written. {data_dir} ran out of space' in line, line
  assert 'free space' in line
  assert not sources._complete(str(data_dir))  # Nothing listed as built.


def test_the_loser_of_two_concurrent_builds_is_one_sentence(tmp_path, monkeypatch):
  """The other build finishes while this one converts (the race, made certain)."""
  generate = records.Records._split_generators
  raced = []

  def racing(self, dl_manager):
    if not raced:
      raced.append(True)
      assert records.write(test_records.tiny_plan(), str(tmp_path), num_workers=1)[1] == 'built'
    return generate(self, dl_manager)

  monkeypatch.setattr(records.Records, '_split_generators', racing)
  with pytest.raises(records.BuildError) as lost:
    records.write(test_records.tiny_plan(), str(tmp_path), num_workers=1)
  message = str(lost.value)
  assert 'another build of it finished first' in message and '\n' not in message, message
  sources._builder.cache_clear()
  config = test_records._config(tmp_path, 'tiny')
  assert sources.get_dataset_info(config)['splits']['train'] == 4  # The winner's is intact.


def test_an_interrupted_builds_folder_goes_with_the_next_good_build(tmp_path):
  size_dir = tmp_path / 'tiny' / '16px'
  left = size_dir / 'incomplete.ABC123_1.0.0'  # What kill -9 of a build leaves.
  left.mkdir(parents=True)
  (left / 'tiny-train.array_record-00000-of-00001').write_bytes(b'half')
  old = time.time() - 3600
  os.utime(left / 'tiny-train.array_record-00000-of-00001', (old, old))
  os.utime(left, (old, old))
  config = test_records._config(tmp_path, 'tiny')
  with pytest.raises(sources.DatasetError) as missing:
    sources.get_dataset_info(config)
  assert 'sizes built: none; datasets there: none' in str(missing.value)
  records.write(test_records.tiny_plan(), str(tmp_path), num_workers=1)
  assert sorted(os.listdir(size_dir)) == ['1.0.0']
  assert sources._complete(str(tmp_path)) == ['tiny']
