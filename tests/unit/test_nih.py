"""NIH file parsing, image locating (flat, Kaggle, tarballs), image conversion, splits."""

import csv
import gzip
import io
import os
import shutil
import tarfile

import numpy as np
from PIL import Image
import pytest

from input_pipeline import images
from input_pipeline import labels
from input_pipeline import nih
from input_pipeline import records

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_IMAGES = os.path.join(REPO, 'demo_data', 'images')  # 300 real images, 256 px grey.
FULL = os.path.join(REPO, 'tests', 'fixtures', 'nih')  # NIH's CSVs, full-size originals.
RGBA_IMAGES = ('00001369_000.png', '00002578_000.png')
HEADER_2020 = (
  'Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,'
  'View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]\n'
)


def sample_names(count=None):
  return sorted(os.listdir(DEMO_IMAGES))[:count]


@pytest.fixture(scope='module')
def sample_entries():
  entries, problems = nih.read_data_entry(os.path.join(FULL, 'Data_Entry_2017_v2020.csv.gz'))
  assert problems == []
  return entries


def test_labels_canonical_order():
  assert labels.LABELS[0] == 'Atelectasis' and labels.LABELS[-1] == 'Hernia'
  assert len(labels.LABELS) == 14 == len(set(labels.LABELS))
  assert labels.encode('No Finding').sum() == 0
  vector = labels.encode('Cardiomegaly|Hernia')
  assert vector.dtype == np.uint8 and vector.tolist() == [0, 1] + [0] * 11 + [1]
  with pytest.raises(ValueError, match='Pneumonitis'):
    labels.encode('Pneumonitis|Mass')


def test_full_v2020_csv(sample_entries):
  assert len(sample_entries) == nih.NIH_COUNTS['images']
  assert len({e.patient_id for e in sample_entries.values()}) == nih.NIH_COUNTS['patients']
  entry = sample_entries['00000001_001.png']
  assert (
    entry.finding_labels,
    entry.follow_up,
    entry.patient_id,
    entry.age,
    entry.sex,
    entry.view_position,
  ) == ('Cardiomegaly|Emphysema', 1, 1, 58, 'M', 'PA')
  assert np.flatnonzero(entry.labels).tolist() == [1, 10]


def test_labels_equal_csv_for_every_sample_image(sample_entries):
  """Independent reading of the CSV with the csv module: same label vectors."""
  with gzip.open(os.path.join(FULL, 'Data_Entry_2017_v2020.csv.gz'), 'rt') as f:
    findings = {row[0]: row[1] for row in csv.reader(f)}
  for name in sample_names():
    expected = [int(label in findings[name].split('|')) for label in labels.LABELS]
    assert sample_entries[name].labels.tolist() == expected, name


def _write(path, text, gz=False):
  opener = gzip.open if gz else open
  with opener(path, 'wt', newline='') as f:
    f.write(text)
  return str(path)


def test_2017_header_variant_plain_and_gzip(tmp_path):
  """Data_Entry_2017.csv: trailing comma on every line; same parse either way."""
  text = (
    HEADER_2020.rstrip('\n') + ',\n'
    '00000001_000.png,Cardiomegaly,0,1,058,M,PA,2682,2749,0.143,0.143,\n'
    '00000002_000.png,No Finding,0,2,81,F,AP,2500,2048,0.171,0.171,\n'
  )
  for gz in (False, True):
    path = _write(tmp_path / ('Data_Entry_2017.csv' + ('.gz' if gz else '')), text, gz)
    entries, problems = nih.read_data_entry(path)
    assert problems == []
    assert entries['00000001_000.png'].age == 58
    assert entries['00000002_000.png'].labels.sum() == 0
    assert entries['00000002_000.png'].sex == 'F'


def test_csv_problems_all_reported(tmp_path):
  text = (
    HEADER_2020 + '00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143\n'
    '00000002_000.png,Pneumonitis|Mass,0,2,81,F,PA,2500,2048,0.171,0.171\n'
    '00000003_000.png,Mass,zero,3,81,F,PA,2500,2048,0.171,0.171\n'
    '00000004_000.png,Mass,0,4\n'
  )
  entries, problems = nih.read_data_entry(_write(tmp_path / 'Data_Entry_2017_v2020.csv', text))
  assert list(entries) == ['00000001_000.png']
  assert [p.image for p in problems] == ['00000002_000.png', '00000003_000.png', '00000004_000.png']
  assert 'line 3' in problems[0].message and 'Pneumonitis' in problems[0].message
  assert 'line 4' in problems[1].message and 'integers' in problems[1].message
  assert 'line 5' in problems[2].message and 'expected 11 fields, got 4' in problems[2].message


def test_wrong_csv_header_is_fatal(tmp_path):
  _, problems = nih.read_data_entry(_write(tmp_path / 'x.csv', 'name,labels\n'))
  assert len(problems) == 1 and problems[0].image == '' and 'Image Index' in problems[0].message


def test_bbox_list_with_infiltrate_alias():
  boxes, problems = nih.read_bbox_list(os.path.join(FULL, 'BBox_List_2017.csv'))
  assert problems == []
  assert sum(len(b) for b in boxes.values()) == 984 and len(boxes) == 880
  found = {labels.LABELS[b.label] for bs in boxes.values() for b in bs}
  assert 'Infiltration' in found and len(found) == 8
  first = boxes['00013118_008.png'][0]
  assert first.label == 0 and first.bbox[0] == pytest.approx(225.084745762712)


def test_full_size_rgba_and_grey_originals_converted_to_grey():
  names = sorted(os.listdir(os.path.join(FULL, 'images')))
  assert set(RGBA_IMAGES) < set(names)
  for name in names:
    with open(os.path.join(FULL, 'images', name), 'rb') as f:
      data = f.read()
    original = Image.open(io.BytesIO(data))
    assert original.size == (1024, 1024)
    assert original.mode == ('RGBA' if name in RGBA_IMAGES else 'L'), name
    converted = images.decode_and_resize(data, 64)
    expected = np.asarray(original.convert('L').resize((64, 64), images.RESAMPLE))
    assert converted.shape == (64, 64, 1) and converted.dtype == np.uint8
    np.testing.assert_array_equal(converted[:, :, 0], expected)
    assert converted.std() > 10  # A real X-ray, not a blank.


def test_sixteen_bit_scaled_by_range_not_clipped():
  pixels = np.array([[1000, 2000], [3000, 41000]], np.uint16)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format='PNG')
  converted = images.decode_and_resize(buffer.getvalue(), 2)[:, :, 0]
  expected = np.round((pixels.astype(float) - 1000) * 255 / 40000).astype(np.uint8)
  np.testing.assert_array_equal(converted, expected)  # [0, 6, 13, 255]; clipping gives 255s.


def _make_layouts(root, names):
  """names[0:2] flat, names[2:4] Kaggle images_001/images, names[4:] in images_002.tar.gz."""
  flat, kaggle = root / 'images', root / 'images_001' / 'images'
  flat.mkdir(parents=True)
  kaggle.mkdir(parents=True)
  for name, folder in zip(names[:4], (flat, flat, kaggle, kaggle)):
    shutil.copy(os.path.join(DEMO_IMAGES, name), folder / name)
  with tarfile.open(root / 'images_002.tar.gz', 'w:gz') as tar:
    for name in names[4:]:
      tar.add(os.path.join(DEMO_IMAGES, name), arcname=f'images/{name}')


def test_scan_finds_flat_kaggle_and_tarball_images(tmp_path):
  names = sample_names(6)
  _make_layouts(tmp_path, names)
  refs, problems = nih.scan_images(str(tmp_path), set(names) | {'00099999_000.png'}, 2)
  assert sorted(refs) == names
  assert [p.image for p in problems] == ['00099999_000.png']
  assert 'not found' in problems[0].message
  assert refs[names[5]].member == f'images/{names[5]}'
  for name in names:  # Bytes from a tarball are the file's bytes.
    with open(os.path.join(DEMO_IMAGES, name), 'rb') as f:
      assert refs[name].read() == f.read()


@pytest.mark.parametrize(
  'damage, message',
  [
    (lambda data: b'', 'zero-byte'),
    (lambda data: data[: len(data) // 2], 'truncated'),
    (lambda data: b'not a png at all', 'not a PNG, JPEG or DICOM file'),
  ],
)
def test_image_problem(damage, message):
  with open(os.path.join(DEMO_IMAGES, sample_names(1)[0]), 'rb') as f:
    data = f.read()
  assert images.problem(data) == ''
  assert message in images.problem(damage(data))


def test_patient_split_is_by_patient_and_seeded(sample_entries):
  names = [n for n in sample_entries if n < '00001000']  # 999 patients, many images each.
  patient_of = {n: sample_entries[n].patient_id for n in names}

  def cut(seed):
    splits = records.patient_split(names, patient_of, 0.2, 0.0, seed)
    assert splits['test'] == []
    return splits['train'], splits['validation']

  train, val = cut(0)
  assert sorted(train + val) == sorted(names)
  val_patients = {sample_entries[n].patient_id for n in val}
  assert len(val_patients) == round(0.2 * len({sample_entries[n].patient_id for n in names}))
  assert records.leak_problems({'train': train, 'validation': val}, patient_of, 'x', 'y') == []
  assert cut(0) == (train, val)
  assert cut(1)[1] != val


def test_patient_overlap_is_refused(sample_entries):
  # 00000001_000 and 00000001_001 are the same patient.
  patient_of = {n: sample_entries[n].patient_id for n in ('00000001_000.png', '00000001_001.png')}
  (problem,) = records.leak_problems(
    {'train': ['00000001_000.png'], 'test': ['00000001_001.png']}, patient_of, 'lists', 'fix'
  )
  assert problem.image == '' and 'patient' in problem.message
  assert '1 patient(s) in both test and train, e.g. [1]' in problem.message


def test_full_counts_checked(sample_entries):
  problems = nih.count_problems(len(sample_entries), sample_entries, ['a'] * 10, ['b'] * 5)
  assert len(problems) == 2 and all('--allow_subset' in p.message for p in problems)
  full = nih.count_problems(len(sample_entries), sample_entries, ['a'] * 86_524, ['b'] * 25_596)
  assert full == []
