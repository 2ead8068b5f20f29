"""The dataset seam: one records builder fed by adapters, one read side registered by
name; NIH's --label_file, BOM-saved NIH CSVs, the shared pixel limit, the patient
IDs every record carries, CheXpert's protocol in the metadata."""

import gzip
import os
import shutil
import tarfile

import numpy as np
import pytest

from configs import default
from input_pipeline import build
from input_pipeline import chexpert
from input_pipeline import csv_dataset
from input_pipeline import images
from input_pipeline import labels as labels_lib
from input_pipeline import nih
from input_pipeline import pipeline
from input_pipeline import records
from input_pipeline import sources

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_IMAGES = os.path.join(REPO, 'demo_data', 'images')
FULL = os.path.join(REPO, 'tests', 'fixtures', 'nih')
NAMES = sorted(os.listdir(DEMO_IMAGES))[:8]


def _config(data_dir, dataset, size=16):
  c = default.get_config()
  c.dataset, c.data_dir, c.dataset_image_size, c.image_size = dataset, str(data_dir), size, size
  c.batch_size, c.eval_batch_size, c.prefetch_buffer = 2, 4, 0
  return c


# ---------------------------------------------------------------- a new adapter


def tiny_plan(image_root=DEMO_IMAGES):
  """The whole of an adapter: 8 demo images, 2 labels, 4 patients of 2 images each."""
  rows = {}
  for i, name in enumerate(NAMES):
    path = os.path.join(image_root, name)
    rows[name] = records.Row(
      image=name,
      source=records.ImageRef(path, size=os.path.getsize(path)),
      patient=f'p{i // 2}',
      labels=np.array([i % 2, 1 - i % 2], np.uint8),
    )
  return records.make_plan(
    name='tiny',
    rows=rows,
    labels=('Left', 'Right'),
    image_size=16,
    val_fraction=0.25,
    test_fraction=0.25,
    split_seed=0,
  )


def test_a_new_adapter_builds_and_reads_through_the_pipeline(tmp_path):
  builder, outcome = records.write(tiny_plan(), str(tmp_path), num_workers=1)
  assert outcome == 'built' and builder.info.metadata['labels'] == ['Left', 'Right']
  assert records.write(tiny_plan(), str(tmp_path), num_workers=1)[1] == 'unchanged'
  config = _config(tmp_path, 'tiny')
  assert sources.get_label_names(config) == ('Left', 'Right')
  info = sources.get_dataset_info(config)
  assert info['splits'] == {'train': 4, 'validation': 2, 'test': 2}
  assert info['train_positive_fraction'] == [0.5, 0.5]
  seen = {}
  for split in ('train', 'validation', 'test'):
    for row in sources.split_metadata(config, split):
      seen[row['image_name']] = row['patient']
  assert seen == {n: f'p{i // 2}' for i, n in enumerate(NAMES)}  # The adapter's own IDs.
  batches = list(pipeline.create_eval_iterator(config, 'test', process_index=0, process_count=1))
  assert batches[0]['image'].shape == (4, 16, 16, 1) and batches[0]['mask'].sum() == 2
  assert os.path.isfile(sources.split_file(config))


def test_a_registered_source_is_read_without_a_branch_in_the_pipeline():
  class InMemory(sources.Source):
    """Three-label images made on the fly: what a registered source provides."""

    def directory(self):
      return None

    def label_names(self):
      return ('a', 'b', 'c')

    def source(self, split):
      return [
        {'image': np.full((16, 16, 1), i, np.uint8), 'labels': np.eye(3, dtype=np.uint8)[i % 3]}
        for i in range(6)
      ]

    def info(self):
      return {'splits': {'train': 6}}

  sources.register('in_memory')(InMemory)
  try:
    config = _config('unused', 'in_memory')
    assert sources.get_label_names(config) == ('a', 'b', 'c')
    batch = next(pipeline.create_train_iterator(config, process_index=0, process_count=1))
    assert batch['labels'].shape == (2, 3) and batch['image'].shape == (2, 16, 16, 1)
    for image, labels in zip(batch['image'], batch['labels']):
      assert labels.tolist() == np.eye(3)[int(image.max()) % 3].tolist()
  finally:
    del sources._REGISTRY['in_memory']


def test_one_patient_split_and_one_leak_check():
  names = [f'img{i}' for i in range(40)]
  patient_of = {n: i // 4 for i, n in enumerate(names)}  # 10 patients.
  splits = records.patient_split(names, patient_of, 0.2, 0.3, seed=0)
  patients = {s: {patient_of[n] for n in v} for s, v in splits.items()}
  assert [len(patients[s]) for s in ('train', 'validation', 'test')] == [5, 2, 3]
  assert records.leak_problems(splits, patient_of, 'w', 'f') == []
  splits['test'].append(splits['train'][0])
  (leak,) = records.leak_problems(splits, patient_of, 'w', 'fix it')
  assert leak.image == '' and 'in both test and train' in leak.message and 'fix it' in leak.message
  with pytest.raises(records.InvalidInputError, match='--test_fraction must be in'):
    rows = {n: tiny_plan().rows[NAMES[0]] for n in names[:2]}
    records.assign_splits(rows, 0, 0.1, 1.5, where='w', fix='f')


# ---------------------------------------------------------------- NIH


def _manual_dir(root, names, csv_names=('Data_Entry_2017_v2020.csv',), encoding='utf-8'):
  with gzip.open(os.path.join(FULL, 'Data_Entry_2017_v2020.csv.gz'), 'rt') as f:
    lines = f.readlines()
  rows = [line for line in lines[1:] if line.split(',', 1)[0] in names]
  os.makedirs(root / 'images')
  for name in names:
    shutil.copy(os.path.join(DEMO_IMAGES, name), root / 'images' / name)
  for csv_name in csv_names:
    with open(root / csv_name, 'w', encoding=encoding) as f:
      f.write(lines[0] + ''.join(rows))
  (root / 'train_val_list.txt').write_text('\n'.join(names[2:]) + '\n')
  (root / 'test_list.txt').write_text('\n'.join(names[:2]) + '\n')
  return root


def test_label_file_is_chosen_and_recorded(tmp_path):
  root = _manual_dir(tmp_path / 'nih', NAMES, ('Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv'))
  with open(root / 'Data_Entry_2017.csv') as f:
    text = f.read()
  first = text.splitlines()[1].split(',')
  first[1] = 'Hernia'  # The 2017 file says otherwise about one image.
  with open(root / 'Data_Entry_2017.csv', 'w') as f:
    f.write(text.replace(text.splitlines()[1], ','.join(first)))
  default_build = build.build(str(root), str(tmp_path / 'a'), 16, allow_subset=True, num_workers=1)
  assert default_build.info.metadata['label_file'].startswith('Data_Entry_2017_v2020.csv')
  original = build.build(
    str(root),
    str(tmp_path / 'b'),
    16,
    allow_subset=True,
    num_workers=1,
    label_file='Data_Entry_2017.csv',
  )
  assert original.info.metadata['label_file'] == 'Data_Entry_2017.csv (the original 2017 labels)'
  config = _config(tmp_path / 'b', 'chestxray14')
  assert sources.get_dataset_info(config)['label_file'].startswith('Data_Entry_2017.csv')
  labels = {
    m['image_name']: m['labels']
    for s in ('train', 'validation', 'test')
    for m in sources.split_metadata(config, s)
  }
  assert labels[first[0]].tolist() == [0.0] * 13 + [1.0]  # Hernia, from the chosen file.


def test_absent_label_file_is_one_sentence_naming_the_flag(tmp_path):
  root = _manual_dir(tmp_path / 'nih', NAMES, ('Data_Entry_2017_v2020.csv',))
  argv = ['--manual_dir', str(root), '--data_dir', str(tmp_path / 'o'), '--allow_subset']
  with pytest.raises(SystemExit) as error:
    build.main(argv + ['--label_file', 'Data_Entry_2017.csv', '--num_workers', '1'])
  message = str(error.value.code)
  assert message.startswith('Nothing was written. Data_Entry_2017.csv (plain or .gz) is not in')
  assert 'pass --label_file Data_Entry_2017_v2020.csv' in message and '\n' not in message


def test_bom_saved_nih_csv_reads_as_the_csv_mode_does(tmp_path):
  root = _manual_dir(tmp_path / 'nih', NAMES, encoding='utf-8-sig')
  assert (root / 'Data_Entry_2017_v2020.csv').read_bytes().startswith(b'\xef\xbb\xbf')
  builder = build.build(str(root), str(tmp_path / 'o'), 16, allow_subset=True, num_workers=1)
  assert sum(s.num_examples for s in builder.info.splits.values()) == len(NAMES)


def test_nih_records_carry_nih_patient_ids(nih_sample):
  config = _config(nih_sample.data_dir, 'chestxray14', 64)
  entries, _ = nih.read_data_entry(os.path.join(FULL, 'Data_Entry_2017_v2020.csv.gz'))
  for row in sources.split_metadata(config, 'test'):
    assert row['patient'] == str(entries[row['image_name']].patient_id) == str(row['patient_id'])


# ---------------------------------------------------------------- images, CheXpert


def test_one_pixel_limit_for_png_and_dicom(monkeypatch, tmp_path):
  from tests.unit.test_own_data import write_dicom

  with open(os.path.join(DEMO_IMAGES, NAMES[0]), 'rb') as f:
    png = f.read()
  path = write_dicom(str(tmp_path / 'x.dcm'), np.zeros((40, 30), np.uint8))
  with open(path, 'rb') as f:
    dcm = f.read()
  assert images.problem(png) == images.problem(dcm) == ''
  monkeypatch.setattr(images, 'MAX_PIXELS', 1000)
  assert images.problem(png).startswith('256 x 256 = 65,536 pixels, more than the limit of 1,000')
  assert images.problem(dcm).startswith('30 x 40 = 1,200 pixels, more than the limit')
  assert images.pixel_problem(10, 100) == '' and 'MAX_PIXELS' in images.pixel_problem(10, 101)


def test_chexpert_valid_csv_is_the_test_split_in_the_metadata(tmp_path):
  from tests.unit.test_own_data import CHEXPERT_LABELS, write_chexpert

  path, root, rows = write_chexpert(tmp_path, 40)
  spec = csv_dataset.Spec(
    csv_paths=(path,), image_root=root, format='chexpert', labels=CHEXPERT_LABELS
  )
  builder, _ = csv_dataset.build(
    spec, name='chex', data_dir=str(tmp_path / 'd'), image_size=16, num_workers=1
  )
  protocol = builder.info.metadata['protocol']
  assert 'valid.csv (valid/, radiologist-labelled) is the test split' in protocol
  assert 'validation is cut by patient from train/' in protocol
  assert ', '.join(chexpert.COMPETITION_LABELS) in protocol
  config = _config(tmp_path / 'd', 'chex')
  assert sources.get_dataset_info(config)['protocol'] == protocol
  valid = {r[0] for r in rows if '/valid/' in r[0]}
  assert {m['image_name'] for m in sources.split_metadata(config, 'test')} == valid
  for m in sources.split_metadata(config, 'validation'):
    assert m['patient'] == chexpert.patient_of(m['image_name'])  # Not an internal index.


def test_datasets_built_before_schema_2_still_read(tmp_path):
  with tarfile.open(os.path.join(REPO, 'tests', 'fixtures', 'schema1', 'datasets.tar.gz')) as tar:
    tar.extractall(tmp_path, filter='data')
  nih_config, own_config = _config(tmp_path, 'chestxray14', 8), _config(tmp_path, 'own', 8)
  assert sources.get_label_names(nih_config) == labels_lib.LABELS
  assert sources.get_label_names(own_config) == ('Effusion', 'Mass')
  info = sources.get_dataset_info(nih_config)
  assert info['splits'] == {'train': 5, 'validation': 1, 'test': 2}
  assert info['label_file'].startswith('Data_Entry_2017_v2020.csv')
  assert info['protocol'].startswith('not recorded') and info['kind'] == 'chestxray14'
  train = sources.get_source(own_config, 'train')
  positives = np.mean([train[i]['labels'] for i in range(len(train))], axis=0)
  np.testing.assert_allclose(
    sources.get_dataset_info(own_config)['train_positive_fraction'], positives
  )
  for row in sources.split_metadata(nih_config, 'test'):
    assert row['patient'] == str(row['patient_id'])  # NIH's own ID, as today's records.
  (batch,) = pipeline.create_eval_iterator(own_config, 'test', process_index=0, process_count=1)
  assert batch['labels'].shape == (4, 2) and batch['mask'].sum() == 2
