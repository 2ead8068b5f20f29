"""Converting NIH into the TFDS ArrayRecord dataset: end to end on the real sample, bad
inputs (every offender named), --skip_bad, atomicity, tarball input."""

import gzip
import json
import os
import shutil
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from input_pipeline import build
from input_pipeline import chestxray14
from input_pipeline import images
from input_pipeline import labels
from input_pipeline import nih
from input_pipeline import records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_IMAGES = os.path.join(REPO, 'demo_data', 'images')  # 300 real images, 256 px grey.
FULL = os.path.join(REPO, 'tests', 'fixtures', 'nih')  # NIH's CSVs, full-size originals.
HEADER = (
  'Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,'
  'View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n'
)


def _sample_csv_rows():
  with gzip.open(os.path.join(FULL, 'Data_Entry_2017_v2020.csv.gz'), 'rt') as f:
    return {line.split(',', 1)[0]: line for line in f}


def _dataset(data_dir, size):
  return tfds.builder_from_directory(
    os.path.join(data_dir, 'chestxray14', f'{size}px', records.VERSION)
  )


def _all_examples(data_dir, size):
  builder = _dataset(data_dir, size)
  return {
    split: {ex['image_name'].decode(): ex for ex in builder.as_data_source(split=split)}
    for split in records.SPLITS
  }


@pytest.fixture(scope='module')
def sample_examples(nih_sample):
  return _all_examples(nih_sample.data_dir, nih_sample.image_size)


def test_sample_end_to_end(nih_sample, sample_examples):
  names = set(os.listdir(DEMO_IMAGES))
  assert len(names) == 300
  found = [n for split in sample_examples.values() for n in split]
  assert sorted(found) == sorted(names)  # Each image once, in one split.
  with open(os.path.join(nih_sample.manual_dir, 'test_list.txt')) as f:
    assert set(sample_examples['test']) == set(f.read().split())
  example = next(iter(sample_examples['train'].values()))
  assert example['image'].shape == (64, 64, 1) and example['image'].dtype == np.uint8
  assert example['labels'].shape == (14,)


def test_labels_and_fields_equal_csv(sample_examples):
  rows = _sample_csv_rows()
  for split in sample_examples.values():
    for name, ex in split.items():
      fields = rows[name].strip().split(',')
      expected = [int(label in fields[1].split('|')) for label in labels.LABELS]
      assert ex['labels'].tolist() == expected, name
      assert (int(fields[2]), int(fields[3]), int(fields[4]), fields[5], fields[6]) == (
        ex['follow_up'],
        ex['patient_id'],
        ex['age'],
        ex['sex'].decode(),
        ex['view_position'].decode(),
      )


def _by_name(sample_examples, name):
  return next(split[name] for split in sample_examples.values() if name in split)


def test_full_size_rgba_and_sixteen_bit_images(nih_sample, sample_examples):
  modes = set()
  for name in nih_sample.originals:  # 1024 px, built beside demo_data's 256 px images.
    original = Image.open(os.path.join(FULL, 'images', name))
    assert original.size == (1024, 1024)
    modes.add(original.mode)
    expected = np.asarray(original.convert('L').resize((64, 64), images.RESAMPLE))
    np.testing.assert_array_equal(_by_name(sample_examples, name)['image'][..., 0], expected)
  assert modes == {'RGBA', 'L'}
  # The 16-bit copy (1000 + 200 v) scales back by its range to the 8-bit original.
  sixteen = Image.open(os.path.join(nih_sample.manual_dir, 'images', nih_sample.sixteen_bit_image))
  assert sixteen.mode in ('I;16', 'I')
  grey = np.asarray(Image.open(os.path.join(DEMO_IMAGES, nih_sample.sixteen_bit_image)), float)
  rescaled = np.round((grey - grey.min()) * 255 / (grey.max() - grey.min())).astype(np.uint8)
  expected = np.asarray(Image.fromarray(rescaled).resize((64, 64), images.RESAMPLE))
  np.testing.assert_array_equal(
    _by_name(sample_examples, nih_sample.sixteen_bit_image)['image'][..., 0], expected
  )


def test_boxes_attached(sample_examples):
  boxes, _ = nih.read_bbox_list(os.path.join(FULL, 'BBox_List_2017.csv'))
  with_boxes = {
    name: ex
    for split in sample_examples.values()
    for name, ex in split.items()
    if len(ex['boxes']['label'])
  }
  assert len(with_boxes) == 6 and set(with_boxes) <= set(boxes)
  for name, ex in with_boxes.items():
    assert [int(k) for k in ex['boxes']['label']] == [b.label for b in boxes[name]]
    np.testing.assert_allclose(
      np.stack(ex['boxes']['bbox']), [b.bbox for b in boxes[name]], rtol=1e-6
    )


def test_split_recorded_beside_dataset(nih_sample, sample_examples):
  path = chestxray14.split_file(nih_sample.data_dir, 64)
  with open(path) as f:
    record = json.load(f)
  assert (record['val_fraction'], record['split_seed'], record['by']) == (0.1, 0, 'patient')
  for split, names in record['splits'].items():
    assert sorted(names) == sorted(sample_examples[split])
  metadata = _dataset(nih_sample.data_dir, 64).info.metadata
  assert (metadata['val_fraction'], metadata['split_seed'], metadata['skipped']) == (0.1, 0, {})
  patients = {
    s: {int(ex['patient_id']) for ex in exs.values()} for s, exs in sample_examples.items()
  }
  assert (
    not (patients['train'] & patients['validation'])
    and not (patients['train'] & patients['test'])
    and not (patients['validation'] & patients['test'])
  )


# ---------------------------------------------------------------- bad inputs


def _small_manual_dir(root, names, extra_rows=(), layout='flat'):
  """Real images `names` in `layout`, their real CSV rows plus `extra_rows`, lists."""
  rows = _sample_csv_rows()
  os.makedirs(root / 'images')
  if layout == 'flat':
    for name in names:
      shutil.copy(os.path.join(DEMO_IMAGES, name), root / 'images' / name)
  else:
    with tarfile.open(root / 'images_001.tar.gz', 'w:gz') as tar:
      for name in names:
        tar.add(os.path.join(DEMO_IMAGES, name), arcname=f'images/{name}')
  with open(root / 'Data_Entry_2017_v2020.csv', 'w') as f:
    f.write(HEADER + ''.join(rows[n] for n in names) + ''.join(extra_rows))
  listed = list(names) + [r.split(',', 1)[0] for r in extra_rows]
  (root / 'train_val_list.txt').write_text('\n'.join(listed[2:]) + '\n')
  (root / 'test_list.txt').write_text('\n'.join(listed[:2]) + '\n')
  return root


GOOD = sorted(os.listdir(DEMO_IMAGES))[:6]


def _png_with_bad_pixels(path):
  """A PNG whose chunks and CRCs are valid (it passes the pre-check) but whose
  compressed pixel data are garbage, so decoding fails mid-build."""
  data = bytearray(open(path, 'rb').read())
  at = data.index(b'IDAT') - 4
  length = struct.unpack('>I', data[at : at + 4])[0]
  data[at + 8 : at + 8 + length] = b'\xff' * length
  data[at + 8 + length : at + 12 + length] = struct.pack(
    '>I', zlib.crc32(data[at + 4 : at + 8 + length])
  )
  return bytes(data)


@pytest.fixture
def bad_manual_dir(tmp_path):
  """One of each: truncated PNG, zero-byte file, missing image, unknown label, malformed row."""
  extra = [
    '00090001_000.png,Mass,0,90001,40,M,PA,2048,2048,0.14,0.14\n',  # image missing
    '00090002_000.png,Pneumonitis,0,90002,40,M,PA,2048,2048,0.14,0.14\n',  # label
    '00090003_000.png,Mass,0,90003,40,M\n',
  ]  # malformed
  root = _small_manual_dir(tmp_path / 'nih', GOOD, extra)
  for name in ('00090002_000.png', '00090003_000.png'):
    shutil.copy(os.path.join(DEMO_IMAGES, GOOD[0]), root / 'images' / name)
  truncated = root / 'images' / GOOD[1]
  truncated.write_bytes(truncated.read_bytes()[:5000])
  (root / 'images' / GOOD[2]).write_bytes(b'')
  return root


def test_bad_inputs_every_offender_named(bad_manual_dir, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    build.main(
      [
        '--manual_dir',
        str(bad_manual_dir),
        '--data_dir',
        str(tmp_path / 'out'),
        '--image_size',
        '32',
        '--allow_subset',
        '--num_workers',
        '2',
      ]
    )
  message = str(exit_info.value.code)
  assert message.startswith('Nothing was written. 5 problem(s)')
  for needle in (
    f'{GOOD[1]}: unreadable or truncated',
    f'{GOOD[2]}: zero-byte file',
    '00090001_000.png: image not found',
    "unknown label(s) ['Pneumonitis']",
    '(00090003_000.png): malformed row: expected 11 fields, got 6',
    '--skip_bad',
  ):
    assert needle in message, needle
  assert not list((tmp_path / 'out' / 'chestxray14' / '32px').rglob('*'))  # Empty or absent.


def test_skip_bad_lists_skipped_in_metadata(bad_manual_dir, tmp_path):
  builder = build.build(
    str(bad_manual_dir), str(tmp_path / 'out'), 32, allow_subset=True, skip_bad=True, num_workers=2
  )
  skipped = builder.info.metadata['skipped']
  assert sorted(skipped) == sorted(
    [GOOD[1], GOOD[2], '00090001_000.png', '00090002_000.png', '00090003_000.png']
  )
  assert 'zero-byte' in skipped[GOOD[2]]
  total = sum(info.num_examples for info in builder.info.splits.values())
  assert total == len(GOOD) - 2


def test_full_release_counts_required_without_allow_subset(tmp_path):
  root = _small_manual_dir(tmp_path / 'nih', GOOD[:3])
  with pytest.raises(records.InvalidInputError, match='allow_subset') as error:
    build.build(str(root), str(tmp_path / 'out'), 32, num_workers=2)
  assert '112,120 images' in str(error.value) and '25,596 test' in str(error.value)


def test_interrupted_build_leaves_nothing_prepared(tmp_path):
  root = _small_manual_dir(tmp_path / 'nih', GOOD)
  bad = root / 'images' / GOOD[3]
  bad.write_bytes(_png_with_bad_pixels(bad))
  assert images.problem(bad.read_bytes()) == ''  # Passes the pre-check...
  out = tmp_path / 'out'
  with pytest.raises(RuntimeError, match=f'{GOOD[3]}: cannot decode'):  # ...fails mid-build.
    build.build(str(root), str(out), 32, allow_subset=True, num_workers=2)
  builder = chestxray14.Chestxray14(data_dir=str(out), config='32px')
  assert not builder.is_prepared()
  leftovers = [
    p for p in (out / 'chestxray14').rglob('*') if p.is_file() and not p.parent.name == '.config'
  ]
  assert leftovers == []
  version_dir = out / 'chestxray14' / '32px' / records.VERSION
  with pytest.raises(
    tfds.core.dataset_info.DatasetInfoFileError,
    match=f'Could not read dataset info from {version_dir}/dataset_info.json',
  ):
    tfds.builder_from_directory(str(version_dir))


def test_tarball_input_gives_same_dataset(tmp_path):
  flat = _small_manual_dir(tmp_path / 'flat', GOOD)
  tar = _small_manual_dir(tmp_path / 'tar', GOOD, layout='tar')
  assert not os.listdir(tar / 'images')
  for root in (flat, tar):
    build.build(str(root), str(root / 'out'), 32, allow_subset=True, num_workers=2)
  from_flat, from_tar = _all_examples(flat / 'out', 32), _all_examples(tar / 'out', 32)
  for split in records.SPLITS:
    assert sorted(from_flat[split]) == sorted(from_tar[split])
    for name, ex in from_flat[split].items():
      np.testing.assert_array_equal(ex['image'], from_tar[split][name]['image'])


def test_any_size_config_name():
  builder = chestxray14.Chestxray14(data_dir='/nonexistent', config='48px')
  assert builder.builder_config.image_size == 48
  assert builder.info.features['image'].shape == (48, 48, 1)


def test_other_validation_cut_is_another_dataset(tmp_path):
  root = _small_manual_dir(tmp_path / 'nih', GOOD)
  for seed in (0, 3):
    build.build(
      str(root),
      str(tmp_path / 'out'),
      256,
      val_fraction=0.4,
      split_seed=seed,
      allow_subset=True,
      num_workers=2,
    )
  built = sorted(os.listdir(tmp_path / 'out' / 'chestxray14'))
  assert [b for b in built if not b.startswith('.')] == ['256px_val0.4_seed0', '256px_val0.4_seed3']
  record = json.load(open(chestxray14.split_file(str(tmp_path / 'out'), 256, 0.4, 3)))
  assert record['split_seed'] == 3 and len(record['splits']['validation']) == 2
  assert chestxray14.Chestxray14(
    config='256px_val0.4_seed3', data_dir=str(tmp_path / 'out')
  ).is_prepared()


def test_predefined_size_by_name_or_config():
  for config in ('256px', chestxray14.make_config(256)):
    builder = chestxray14.Chestxray14(data_dir='/nonexistent', config=config)
    assert builder.builder_config.name == '256px'


# ---------------------------------------------------------------- rebuilding, lists


def _main(root, out, *extra):
  build.main(
    [
      '--manual_dir',
      str(root),
      '--data_dir',
      str(out),
      '--image_size',
      '32',
      '--allow_subset',
      '--num_workers',
      '1',
      *extra,
    ]
  )


def test_rebuild_from_other_inputs_is_refused_unless_overwrite(tmp_path, capsys):
  root, out = _small_manual_dir(tmp_path / 'nih', GOOD), tmp_path / 'out'
  _main(root, out)
  _main(root, out)
  assert 'already built from the same inputs; kept' in capsys.readouterr().out
  (root / 'train_val_list.txt').write_text('\n'.join(GOOD[2:-1]) + '\n')  # One image fewer.
  with pytest.raises(SystemExit) as error:
    _main(root, out)
  message = str(error.value.code)
  assert message.startswith('Nothing was written.') and 'built from other inputs' in message
  assert '--overwrite' in message and '\n' not in message
  assert sum(i.num_examples for i in _dataset(out, 32).info.splits.values()) == len(GOOD)
  _main(root, out, '--overwrite')
  assert 'rebuilt (--overwrite: the inputs differed)' in capsys.readouterr().out
  assert sum(i.num_examples for i in _dataset(out, 32).info.splits.values()) == len(GOOD) - 1
  assert _dataset(out, 32).info.metadata['fingerprint']


def test_list_row_with_a_path_is_a_path_escape(tmp_path):
  root = _small_manual_dir(tmp_path / 'nih', GOOD)
  with open(root / 'train_val_list.txt', 'a') as f:
    f.write('../secret.png\n')
  with pytest.raises(SystemExit) as error:
    _main(root, tmp_path / 'out')
  message = str(error.value.code)
  assert message.startswith('Nothing was written. 1 problem(s)')
  assert (
    f"train_val_list.txt entry {len(GOOD) - 1}: '../secret.png' is a path, not an "
    'image file name: a path escape'
  ) in message
  assert 'no valid row' not in message and 'image not found' not in message


def test_patient_in_two_splits_is_one_sentence(tmp_path, capsys):
  """The lists put patient 100's second image in train_val, the first in test."""
  assert GOOD[0] == '00000100_000.png'
  extra = ['00000100_001.png,No Finding,1,100,58,M,PA,2048,2048,0.14,0.14\n']
  root = _small_manual_dir(tmp_path / 'nih', GOOD, extra)
  shutil.copy(os.path.join(DEMO_IMAGES, GOOD[1]), root / 'images' / '00000100_001.png')
  with pytest.raises(SystemExit) as error:
    _main(root, tmp_path / 'out')
  message = str(error.value.code)
  assert message.startswith('Nothing was written. 1 problem(s)')
  assert 'train_val_list.txt and test_list.txt: 1 patient(s) in both' in message
  assert '[100]' in message and 'the split must be by patient' in message
  assert 'AssertionError' not in message + capsys.readouterr().err


def test_skip_bad_names_what_it_left_out_on_the_console(bad_manual_dir, tmp_path, capsys):
  build.main(
    ['--manual_dir', str(bad_manual_dir), '--data_dir', str(tmp_path / 'out'), '--image_size']
    + ['32', '--allow_subset', '--skip_bad', '--num_workers', '2']
  )
  err = capsys.readouterr().err
  skipped = [line for line in err.splitlines() if line.startswith('skipped: ')]
  assert len(skipped) == 5, err
  assert any(GOOD[2] in line and 'zero-byte' in line for line in skipped), err


def test_skipped_lines_show_the_first_then_a_count():
  metadata = {'num_skipped': 25, 'skipped': {f'{i:02d}.png': 'zero-byte' for i in range(25)}}
  lines = build.skipped_lines(metadata)
  assert lines[0] == 'skipped: 00.png: zero-byte' and len(lines) == 21
  assert lines[-1] == 'skipped: 5 more (the dataset metadata lists up to 25).'


def test_missing_manual_dir_is_named_as_such(tmp_path):
  with pytest.raises(SystemExit) as error:
    build.main(['--manual_dir', str(tmp_path / 'nope'), '--data_dir', str(tmp_path / 'out')])
  assert str(error.value) == (
    f'Nothing was written. --manual_dir {tmp_path / "nope"} is not a directory; give the folder '
    'that holds the NIH download (python -m input_pipeline.download --dir DIR fetches it).'
  )
