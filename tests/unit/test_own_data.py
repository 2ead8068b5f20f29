"""Your own data: DICOM reading, the CSV builder, CheXpert's format, end to end.

Real pixels throughout: demo_data's NIH images, written as DICOM by the tests.
"""

import csv
import gzip
import json
import os
import types
import subprocess
import sys

import numpy as np
from PIL import Image
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom import uid
import pytest
from sklearn.metrics import roc_auc_score

from chexnet_jax.model import losses
from chexnet_jax.evaluation import metrics
from chexnet_jax import predict
from input_pipeline import build as build_cli
from input_pipeline import csv_dataset
from input_pipeline import dicom
from input_pipeline import images
from input_pipeline import sources
from tests.support import runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(REPO, 'demo_data')
LABELS3 = ('Effusion', 'Infiltration', 'Atelectasis')


def _demo_rows():
  with gzip.open(os.path.join(DEMO, 'Data_Entry_2017_v2020.csv.gz'), 'rt') as f:
    rows = list(csv.reader(f))[1:]
  return [r for r in rows if os.path.exists(os.path.join(DEMO, 'images', r[0]))]


def _png(name):
  return os.path.join(DEMO, 'images', name)


def _grey(name):
  with open(_png(name), 'rb') as f:
    return images.decode_grey(f.read())


def write_dicom(
  path,
  pixels,
  photometric='MONOCHROME2',
  bits_stored=8,
  window=None,
  rescale=None,
  syntax=uid.ExplicitVRLittleEndian,
):
  """Writes a single-frame DICOM with a patient name that must never leak."""
  ds = Dataset()
  ds.file_meta = FileMetaDataset()
  ds.file_meta.TransferSyntaxUID = syntax
  ds.file_meta.MediaStorageSOPClassUID = uid.DigitalXRayImageStorageForPresentation
  ds.file_meta.MediaStorageSOPInstanceUID = uid.generate_uid()
  ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
  ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
  ds.PatientName, ds.PatientID = 'Doe^Secret', 'SECRET-ID-123'
  if syntax.is_compressed:
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pydicom.encaps.encapsulate([b'\xff\xd8 not really jpeg-ls \xff\xd9'])
  else:
    ds.set_pixel_data(pixels, photometric, bits_stored)
  if window:
    ds.WindowCenter, ds.WindowWidth = window
  if rescale:
    ds.RescaleSlope, ds.RescaleIntercept = rescale
  ds.save_as(path, enforce_file_format=True)
  return path


# ---------------------------------------------------------------- DICOM


def test_dicom_8bit_monochrome2_is_the_png(tmp_path):
  name = _demo_rows()[0][0]
  grey = _grey(name)
  path = write_dicom(str(tmp_path / 'a.dcm'), grey)
  with open(path, 'rb') as f:
    data = f.read()
  assert dicom.is_dicom(data)
  np.testing.assert_array_equal(dicom.decode(data), grey)


def test_dicom_monochrome1_is_inverted(tmp_path):
  grey = _grey(_demo_rows()[1][0])
  path = write_dicom(str(tmp_path / 'm1.dcm'), 255 - grey, photometric='MONOCHROME1')
  with open(path, 'rb') as f:
    np.testing.assert_array_equal(dicom.decode(f.read()), grey)


def test_dicom_12bit_with_full_window_is_the_png(tmp_path):
  grey = _grey(_demo_rows()[2][0])
  stored = grey.astype(np.uint16) * 16 + 8  # 12 bits.
  path = write_dicom(str(tmp_path / 'w.dcm'), stored, bits_stored=12, window=(2048, 4096))
  with open(path, 'rb') as f:
    np.testing.assert_array_equal(dicom.decode(f.read()), grey)


def test_dicom_narrow_window_clips_and_rescale_applies(tmp_path):
  stored = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))  # 256 columns.
  stored[:, -1] = 4095  # The top of the 12-bit range.
  path = write_dicom(str(tmp_path / 'n.dcm'), stored, bits_stored=12, window=(2048, 1024))
  with open(path, 'rb') as f:
    grey = dicom.decode(f.read())
  assert grey[0, 0] == 0 and grey[0, -1] == 255  # Outside the window: clipped.
  assert grey[0, 96] == 0 and grey[0, 160] == 255  # 1536 and 2560: the window's edges.
  assert 100 < grey[0, 128] < 155  # The centre: mid-grey.
  # No window: the stored 12-bit range, through the rescale, scales to 8 bits.
  path = write_dicom(str(tmp_path / 'r.dcm'), stored, bits_stored=12, rescale=(2, -1024))
  with open(path, 'rb') as f:
    grey = dicom.decode(f.read())
  assert grey[0, 0] == 0 and grey[0, -1] == 255 and 126 <= grey[0, 128] <= 129


def test_dicom_compressed_without_decoder_is_refused_naming_the_syntax(tmp_path):
  path = write_dicom(str(tmp_path / 'c.dcm'), np.zeros((8, 8), np.uint8), syntax=uid.JPEGLSLossless)
  with open(path, 'rb') as f:
    why = dicom.problem(f.read())
  assert 'JPEG-LS Lossless' in why and 'install a decoder' in why
  assert 'Secret' not in why and 'SECRET' not in why


def test_predict_on_dicom_gives_the_png_probabilities(tiny_run, tmp_path):
  name = _demo_rows()[0][0]
  grey = _grey(name)
  dicoms = [
    write_dicom(str(tmp_path / 'm2.dcm'), grey),
    write_dicom(str(tmp_path / 'm1.dcm'), 255 - grey, photometric='MONOCHROME1'),
    write_dicom(
      str(tmp_path / 'w16.dcm'),
      grey.astype(np.uint16) * 16 + 8,
      bits_stored=12,
      window=(2048, 4096),
    ),
  ]
  out = tmp_path / 'out'
  assert (
    predict.main(
      [_png(name), *dicoms, '--workdir', tiny_run, '--top_k', '1', '--output_dir', str(out)]
    )
    == 0
  )
  results = json.loads((out / 'predictions.json').read_text())['results']
  png = results[0]['probabilities']
  for result in results[1:]:
    assert result['probabilities'] == png, result['image']
  assert 'SECRET' not in (out / 'predictions.json').read_text()


# ---------------------------------------------------------------- the CSV builder


def write_csv(path, rows, header=('path', 'patient', *LABELS3), encoding='utf-8'):
  with open(path, 'w', newline='', encoding=encoding) as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def own_rows(count=None):
  rows = []
  for r in _demo_rows()[:count]:
    findings = r[1].split('|')
    rows.append([f'images/{r[0]}', r[3], *[int(n in findings) for n in LABELS3]])
  return rows


def _spec(csv_path, **kwargs):
  kwargs.setdefault('labels', LABELS3)
  kwargs.setdefault('patient_column', 'patient')
  return csv_dataset.Spec(csv_paths=(csv_path,), image_root=DEMO, **kwargs)


def _build_own(tmp_path, spec, **kwargs):
  """csv_dataset.build of `spec` as 'own' at 32 px into tmp_path/d."""
  return csv_dataset.build(
    spec, name='own', data_dir=str(tmp_path / 'd'), image_size=32, num_workers=1, **kwargs
  )


def test_bom_csv_builds_and_split_is_by_patient(tmp_path):
  path = write_csv(tmp_path / 'bom.csv', own_rows(60), encoding='utf-8-sig')
  builder, outcome = _build_own(tmp_path, _spec(path))
  assert outcome == 'built'
  assert builder.info.metadata['labels'] == list(LABELS3)
  split = json.loads((tmp_path / 'd/own/32px/1.0.0/split.json').read_text())
  patient = {r[0]: r[1] for r in own_rows(60)}
  seen = [{patient[n] for n in names} for names in split['splits'].values()]
  assert sum(map(len, seen)) == len(set().union(*seen))  # No patient in two splits.
  assert sum(len(v) for v in split['splits'].values()) == 60


def test_problems_are_named_in_one_error(tmp_path):
  rows = own_rows(10)
  rows[1][0] = '../README.md'
  rows[2][2] = 'yes'
  rows[3][0] = 'images/missing.png'
  path = write_csv(tmp_path / 'bad.csv', rows)
  with pytest.raises(csv_dataset.InvalidInputError) as error:
    _build_own(tmp_path, _spec(path))
  message = str(error.value)
  assert message.startswith('3 problem(s)')
  assert "'../README.md' goes outside --image_root" in message
  assert "column 'Effusion' holds 'yes'" in message and 'line 4' in message
  assert 'missing.png: image not found' in message and '--skip_bad' in message
  assert not os.path.exists(tmp_path / 'd' / 'own' / '32px' / '1.0.0')
  builder, _ = _build_own(tmp_path, _spec(path), skip_bad=True)
  assert builder.info.metadata['num_skipped'] == 3
  assert sum(s.num_examples for s in builder.info.splits.values()) == 7


def test_patient_in_two_given_splits_is_one_error_without_skip_hint(tmp_path):
  rows = [r + ['train'] for r in own_rows(6)]
  rows[-1][1] = rows[0][1]  # Same patient as row 1...
  rows[-1][-1] = 'test'  # ...in another split.
  path = write_csv(tmp_path / 's.csv', rows, header=('path', 'patient', *LABELS3, 'split'))
  with pytest.raises(csv_dataset.InvalidInputError) as error:
    _build_own(tmp_path, _spec(path, split_column='split'))
  assert f"patient '{rows[0][1]}' is in test and train" in str(error.value)
  assert 'cannot leave these out' in str(error.value)


def test_no_patient_column_refuses_unless_told_then_warns(tmp_path):
  path = write_csv(
    tmp_path / 'np.csv', [r[:1] + r[2:] for r in own_rows(20)], header=('path', *LABELS3)
  )
  with pytest.raises(csv_dataset.InvalidInputError, match='no --patient_column'):
    _build_own(tmp_path, _spec(path, patient_column=''))
  builder, _ = _build_own(tmp_path, _spec(path, patient_column='', images_are_independent=True))
  assert 'may leak' in builder.info.metadata['warnings'][0]


def own_build_args(csv_path, name, data_dir, image_size, num_workers=1, labels=LABELS3):
  """The build command line of a CSV of `labels` with a patient column."""
  return [
    *('--csv', csv_path, '--image_root', DEMO, '--labels', ','.join(labels)),
    *('--patient_column', 'patient', '--name', name, '--data_dir', data_dir),
    *('--image_size', str(image_size), '--num_workers', str(num_workers)),
  ]


def test_rebuild_with_other_inputs_is_refused_unless_overwrite(tmp_path, capsys):
  data_dir = str(tmp_path / 'd')
  first = write_csv(tmp_path / 'one.csv', own_rows(20))
  args = own_build_args(first, 'own', data_dir, 32)
  build_cli.main(args)
  build_cli.main(args)
  assert 'already built from the same inputs; kept' in capsys.readouterr().out
  write_csv(tmp_path / 'one.csv', own_rows(24))  # The same file, other rows.
  with pytest.raises(SystemExit) as error:
    build_cli.main(args)
  assert 'built from other inputs' in str(error.value) and '--overwrite' in str(error.value)
  build_cli.main(args + ['--overwrite'])
  assert 'rebuilt (--overwrite' in capsys.readouterr().out
  split = json.loads((tmp_path / 'd/own/32px/1.0.0/split.json').read_text())
  assert sum(len(v) for v in split['splits'].values()) == 24


def test_dicom_and_png_rows_build_to_the_same_pixels(tmp_path):
  rows = own_rows(8)
  name = rows[0][0]
  write_dicom(
    str(tmp_path / 'x.dcm'), 255 - _grey(os.path.basename(name)), photometric='MONOCHROME1'
  )
  os.symlink(os.path.join(DEMO, 'images'), tmp_path / 'images')
  rows.append(['x.dcm', 'dicom-patient', 1, 0, 0])
  path = write_csv(tmp_path / 'mixed.csv', rows)
  spec = csv_dataset.Spec(
    csv_paths=(path,),
    image_root=str(tmp_path),
    labels=LABELS3,
    patient_column='patient',
    val_fraction=0.0,
    test_fraction=0.0,
  )
  builder, _ = csv_dataset.build(
    spec, name='mixed', data_dir=str(tmp_path / 'd'), image_size=32, num_workers=1
  )
  source = builder.as_data_source(split='train')
  stored = {e['image_name'].decode(): e['image'] for e in (source[i] for i in range(len(source)))}
  np.testing.assert_array_equal(stored['x.dcm'], stored[name])
  assert 'SECRET' not in (tmp_path / 'd/mixed/32px/1.0.0/metadata.json').read_text()


# ---------------------------------------------------------------- CheXpert


CHEXPERT_LABELS = ('Atelectasis', 'Cardiomegaly', 'Pleural Effusion')
NIH_OF = {
  'Atelectasis': 'Atelectasis',
  'Cardiomegaly': 'Cardiomegaly',
  'Pleural Effusion': 'Effusion',
}


def write_chexpert(tmp_path, count=None):
  """A CheXpert-format CSV of demo images: NIH labels, every 3rd negative left blank,
  every 5th entry made uncertain (-1); images under CheXpert's own directory layout."""
  root = tmp_path / 'root'
  rows = []
  for i, r in enumerate(_demo_rows()[:count]):
    split = 'valid' if int(r[3]) % 5 == 0 else 'train'
    rel = f'CheXpert-v1.0-small/{split}/patient{int(r[3]):05d}/study1/view1_frontal.png'
    os.makedirs(root / os.path.dirname(rel), exist_ok=True)
    target = root / rel
    if not target.exists():
      os.symlink(_png(r[0]), target)
    else:
      continue  # One image per patient here: enough for the test.
    findings = r[1].split('|')
    values = []
    for j, label in enumerate(CHEXPERT_LABELS):
      value = '1.0' if NIH_OF[label] in findings else ('' if (i + j) % 3 == 0 else '0.0')
      values.append('-1.0' if (i + j) % 5 == 0 else value)
    rows.append([rel, 'Female', '60', 'Frontal', 'PA', *values])
  header = ('Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA', *CHEXPERT_LABELS)
  return write_csv(tmp_path / 'train.csv', rows, header=header), str(root), rows


def _build_chexpert(path, root, name, data_dir, **spec):
  """A 32 px dataset `name` built from a CheXpert-format CSV -> its builder."""
  spec = csv_dataset.Spec(
    csv_paths=(path,), image_root=root, format='chexpert', labels=CHEXPERT_LABELS, **spec
  )
  builder, _ = csv_dataset.build(
    spec, name=name, data_dir=str(data_dir), image_size=32, num_workers=1
  )
  return builder


@pytest.mark.parametrize(
  'policy, uncertain_label, uncertain_mask',
  [('ignore', -1.0, 0), ('zeros', 0.0, 1), ('ones', 1.0, 1)],
)
def test_chexpert_policies_reach_the_pipeline(tmp_path, policy, uncertain_label, uncertain_mask):
  path, root, rows = write_chexpert(tmp_path, 60)
  builder = _build_chexpert(
    path, root, 'chex', tmp_path / 'd', uncertainty=policy, test_fraction=0.2
  )
  assert builder.info.metadata['split_by'] == 'given (CheXpert paths)'
  split = json.loads((tmp_path / 'd/chex/32px/1.0.0/split.json').read_text())
  # The usual protocol: valid.csv is test; validation is cut by patient from train.
  assert split['splits']['test'] and split['splits']['validation']
  assert all('/valid/' in n for n in split['splits']['test'])
  assert all('/train/' in n for n in split['splits']['train'] + split['splits']['validation'])
  by_path = {r[0]: r[5:] for r in rows}
  source = builder.as_data_source(split='train')
  checked = 0
  for i in range(len(source)):
    example = source[i]
    labels = sources.labels_of(example)
    for k, value in enumerate(by_path[example['image_name'].decode()]):
      if value == '-1.0':
        assert labels[k] == uncertain_label and example['label_mask'][k] == uncertain_mask
        checked += 1
      else:
        assert labels[k] == (1.0 if value == '1.0' else 0.0)  # Blank = negative.
  assert checked > 0


def test_chexpert_frontal_only_drops_the_lateral_views(tmp_path):
  path, root, rows = write_chexpert(tmp_path, 40)
  laterals = []
  for row in rows[::2]:  # A lateral view of every other study, its own image file.
    rel = row[0].replace('view1_frontal.png', 'view2_lateral.png')
    os.symlink(os.path.realpath(os.path.join(root, row[0])), os.path.join(root, rel))
    laterals.append([rel, row[1], row[2], 'Lateral', '', *row[5:]])
  header = ('Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA', *CHEXPERT_LABELS)
  path = write_csv(tmp_path / 'train.csv', rows + laterals, header=header)
  frontal, lateral = {r[0] for r in rows}, {r[0] for r in laterals}
  assert len(frontal) >= 10 and len(lateral) >= 5 and not frontal & lateral

  def built(frontal_only, name):
    builder = _build_chexpert(path, root, name, tmp_path / 'd', frontal_only=frontal_only)
    split = json.loads((tmp_path / 'd' / name / '32px/1.0.0/split.json').read_text())
    return builder, {n for names in split['splits'].values() for n in names}

  builder, names = built(True, 'frontal')
  assert names == frontal  # Every frontal view kept, every lateral one dropped.
  assert (
    f'{len(lateral)} lateral image(s) left out (--frontal_only).'
    in (builder.info.metadata['warnings'])
  )
  assert builder.info.metadata['frontal_only'] is True
  stored = set()
  for split_name in builder.info.splits:
    source = builder.as_data_source(split=split_name)
    stored |= {source[i]['image_name'].decode() for i in range(len(source))}
  assert stored == frontal
  # Without the flag the same CSV keeps both views: the laterals were valid rows.
  builder, names = built(False, 'both')
  assert names == frontal | lateral
  assert not any('lateral' in w for w in builder.info.metadata.get('warnings', []))


def test_unknown_labels_are_left_out_of_loss_and_auroc():
  logits = np.array([[2.0, -1.0], [0.5, 3.0]], np.float32)
  labels = np.array([[1.0, -1.0], [0.0, 1.0]], np.float32)
  masked = np.asarray(losses.bce_loss(logits, labels))
  only_known = np.asarray(losses.bce_loss(logits[:, :1], labels[:, :1]))
  assert masked[0] == pytest.approx(only_known[0] / 2)  # Its term is 0 of 2 labels.
  probs = np.array([[0.9, 0.9], [0.2, 0.1], [0.4, 0.8], [0.3, 0.2]])
  y = np.array([[1, -1], [0, 0], [0, 1], [-1, 0]], np.float32)
  auroc = metrics.auroc_per_label(y, probs, ('a', 'b'))
  assert auroc == {'a': 1.0, 'b': 1.0}  # Unknown rows would have made both < 1.


# ---------------------------------------------------------------- end to end


def _run(*args):
  result = subprocess.run(
    [sys.executable, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**os.environ, 'PYTHONPATH': REPO},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


# cpu_smoke on an own dataset built at 40 px: 12 steps, one validation per epoch.
SMOKE = ('num_train_steps=12', 'eval_every_epochs=1', 'dataset_image_size=40')


def train(workdir, *overrides):
  """Trains cpu_smoke with SMOKE and `overrides`; the CompletedProcess."""
  return runs.run_trainer(workdir, *SMOKE, *overrides, env={**os.environ, 'PYTHONPATH': REPO})


@pytest.fixture(scope='module')
def own3_run(tmp_path_factory):
  """The 3-label custom CSV dataset built, a run trained on it and evaluated on test
  (by the command lines): {'workdir', 'stdout' (evaluate's)}. Shared by the tests below."""
  root = tmp_path_factory.mktemp('own3')
  path = write_csv(root / 'own.csv', own_rows())
  data_dir, workdir = str(root / 'd'), str(root / 'run')
  _run('-m', 'input_pipeline.build', *own_build_args(path, 'own3', data_dir, 40, 2))
  trained = train(workdir, 'dataset=own3', f'data_dir={data_dir}')
  assert trained.returncode == 0, trained.stderr[-3000:]
  stdout = _run(
    '-m', 'chexnet_jax.evaluate', '--workdir', workdir, '--bootstrap', '20', '--gallery', '2'
  )
  return {'workdir': workdir, 'stdout': stdout}


@pytest.mark.slow
def test_custom_three_label_csv_end_to_end(own3_run, tmp_path):
  workdir, out = own3_run['workdir'], own3_run['stdout']
  run = json.loads(open(os.path.join(workdir, 'run.json')).read())
  assert run['labels'] == list(LABELS3) and run['num_classes'] == 3
  table = out[out.index('Pathology') :]
  assert [line.split()[0] for line in table.splitlines()[2:5]] == list(LABELS3)
  assert table.splitlines()[5].startswith('---')  # Three rows, then the mean.
  metrics_json = json.loads(open(os.path.join(workdir, 'eval/test/metrics.json')).read())
  assert list(metrics_json['per_label']) == list(LABELS3)
  assert list(metrics_json['calibration']['per_label']) == list(LABELS3)
  with open(os.path.join(workdir, 'eval/test/predictions.csv')) as f:
    header = next(csv.reader(f))
  assert header[3:] == [f'prob_{n}' for n in LABELS3] + [f'label_{n}' for n in LABELS3]
  with open(os.path.join(workdir, 'eval/test/auroc.csv')) as f:
    assert [r['pathology'] for r in csv.DictReader(f)] == [*LABELS3, 'mean']
  name = own_rows(1)[0][0]
  grey = np.asarray(Image.open(os.path.join(DEMO, name)).convert('L'))
  dcm = write_dicom(str(tmp_path / 'x.dcm'), grey)
  _run(
    '-m',
    'chexnet_jax.predict',
    os.path.join(DEMO, name),
    dcm,
    '--workdir',
    workdir,
    '--output_dir',
    str(tmp_path / 'p'),
  )
  results = json.loads((tmp_path / 'p/predictions.json').read_text())['results']
  assert list(results[0]['probabilities']) == list(LABELS3)
  assert results[0]['probabilities'] == results[1]['probabilities']


def _evaluation_from_files(workdir):
  """scoring.Evaluation of the test split rebuilt from what evaluate wrote (no model)."""
  from chexnet_jax.evaluation import scoring
  from chexnet_jax.run import run_dir

  out = os.path.join(workdir, 'eval', 'test')
  summary = json.loads(open(os.path.join(out, 'metrics.json')).read())
  with open(os.path.join(out, 'predictions.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  probs = np.array([[float(r[f'prob_{n}']) for n in LABELS3] for r in rows], np.float32)
  labels = np.array([[float(r[f'label_{n}']) for n in LABELS3] for r in rows], np.float32)
  predictions = scoring.Predictions(probs, labels, np.array([int(r['index']) for r in rows]))
  records = [{'image_name': r['image'], 'patient_id': r['patient']} for r in rows]
  run = types.SimpleNamespace(
    config=run_dir.load_config(workdir),
    label_names=run_dir.label_names(workdir),
    step=summary['step'],
  )
  return scoring.Evaluation.from_run(run, 'test', 'none', summary, predictions, records, '')


@pytest.mark.slow
def test_report_of_the_three_label_run_has_its_labels_and_loads_in_chromium(own3_run):
  from chexnet_jax.report import page as report_page
  from input_pipeline import labels as labels_lib
  from tests.support import chromium

  why = chromium.missing()
  if why:
    pytest.fail(why)
  workdir = own3_run['workdir']
  path = os.path.join(workdir, 'eval', 'test', 'report.html')
  page = chromium.inspect(path)
  assert page['console'] == []
  assert page['rows'] == list(LABELS3)  # Exactly the dataset's 3, in its order.
  summary = json.loads(open(os.path.join(workdir, 'eval/test/metrics.json')).read())
  assert len(page['images']) == 3 + len(summary['gallery'])  # ROC, PR, reliability.
  for image in page['images']:
    assert image['complete'] and image['width'] > 0 and image['scheme'] == 'data', image
  assert page['resources'] == []
  assert 'one T for all 3 labels' in page['text'] and 'all 14' not in page['text']
  for nih_only in set(labels_lib.LABELS) - set(LABELS3):
    assert nih_only not in page['text'], nih_only
  # One panel per label in each figure, titled with the dataset's names.
  figures = report_page.curve_figures(_evaluation_from_files(workdir))
  for key in ('roc', 'pr', 'reliability'):
    panels = [a for a in figures[key].axes if a.axison]
    assert [a.get_title().split('\n')[0] for a in panels] == list(LABELS3), key


def _train_chexpert(root, policy):
  """A CheXpert-format dataset built under `policy` and a run trained on it -> workdir."""
  path, image_root, _ = write_chexpert(root)
  data_dir = str(root / 'd')
  _run(
    '-m',
    'input_pipeline.build',
    '--csv',
    path,
    '--image_root',
    image_root,
    '--format',
    'chexpert',
    '--labels',
    ','.join(CHEXPERT_LABELS),
    '--uncertainty',
    policy,
    '--name',
    'chex',
    '--data_dir',
    data_dir,
    '--image_size',
    '40',
    '--num_workers',
    '2',
  )
  workdir = str(root / 'run')
  trained = train(workdir, 'dataset=chex', f'data_dir={data_dir}', 'batch_size=16')
  assert trained.returncode == 0, trained.stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def chex_ignore_run(tmp_path_factory):
  """A run trained on the CheXpert dataset under U-Ignore, evaluated on test by the
  command line: {'workdir', 'stdout' (evaluate's)}."""
  workdir = _train_chexpert(tmp_path_factory.mktemp('chex_ignore'), 'ignore')
  stdout = _run(
    '-m', 'chexnet_jax.evaluate', '--workdir', workdir, '--bootstrap', '20', '--gallery', '2'
  )
  return {'workdir': workdir, 'stdout': stdout}


@pytest.mark.slow
@pytest.mark.parametrize('policy', ['ignore', 'zeros', 'ones'])
def test_chexpert_trains_under_each_policy(request, tmp_path, policy):
  if policy == 'ignore':  # Trained once, for the evaluation test below too.
    workdir = request.getfixturevalue('chex_ignore_run')['workdir']
  else:
    workdir = _train_chexpert(tmp_path, policy)
  run = json.loads(open(os.path.join(workdir, 'run.json')).read())
  assert run['labels'] == list(CHEXPERT_LABELS)
  assert os.listdir(os.path.join(workdir, 'checkpoints'))


@pytest.mark.slow
def test_u_ignore_run_evaluates_on_the_known_entries_only(chex_ignore_run):
  """Uncertain entries are unknown (-1) in predictions.csv, counted in auroc.csv,
  metrics.json, the printed table and the report, and left out of every AUROC."""
  workdir = chex_ignore_run['workdir']
  out = os.path.join(workdir, 'eval', 'test')
  with open(os.path.join(out, 'predictions.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  with open(os.path.join(out, 'auroc.csv'), newline='') as f:
    auroc_csv = {r['pathology']: r for r in csv.DictReader(f)}
  summary = json.loads(open(os.path.join(out, 'metrics.json')).read())
  assert list(auroc_csv) == [*CHEXPERT_LABELS, 'mean']
  with open(os.path.join(out, 'report.html'), encoding='utf-8') as f:
    page = f.read()
  scored = 0
  for name in CHEXPERT_LABELS:
    labels = np.array([int(r[f'label_{name}']) for r in rows])
    probs = np.array([float(r[f'prob_{name}']) for r in rows])
    assert set(labels) <= {-1, 0, 1}
    known = labels >= 0
    num_known, num_unknown = int(known.sum()), int((~known).sum())
    assert num_unknown > 0, name  # write_chexpert makes every 5th entry uncertain.
    assert int(auroc_csv[name]['num_known']) == num_known
    assert int(auroc_csv[name]['num_unknown']) == num_unknown
    assert summary['per_label'][name]['num_known'] == num_known
    assert summary['per_label'][name]['num_unknown'] == num_unknown
    assert f'of {num_known} known; {num_unknown} unknown)' in page
    if len(set(labels[known])) < 2:
      assert auroc_csv[name]['auroc'] == ''
      continue
    expected = roc_auc_score(labels[known], probs[known])
    assert float(auroc_csv[name]['auroc']) == pytest.approx(expected, abs=1e-9)
    assert summary['per_label'][name]['auroc'] == pytest.approx(expected, abs=1e-9)
    scored += 1
  assert scored >= 1  # At least one label has both classes among its known entries.
  # No box in a CheXpert dataset: the gallery note names none (nor NIH).
  assert summary['gallery'] and not any(entry['box'] for entry in summary['gallery'])
  assert 'cyan' not in page and "NIH's annotations" not in page
  table = chex_ignore_run['stdout']
  table = table[table.index('Pathology') :]
  assert 'Unk' in table.splitlines()[0]
  for line in table.splitlines()[2:5]:
    name = next(n for n in CHEXPERT_LABELS if line.startswith(n))
    assert line.split()[-1] == auroc_csv[name]['num_unknown']


def test_a_duplicated_path_names_both_rows(tmp_path):
  rows = own_rows(3)
  path = write_csv(tmp_path / 'dup.csv', rows + [rows[1]])
  _, problems, _ = csv_dataset.read_rows(_spec(path))
  assert [str(p) for p in problems] == [
    f'{path} line 5 ({rows[1][0]}): {rows[1][0]} appears twice (also line 3): both rows'
  ]


def test_dicom_with_corrupt_jpeg_data_is_one_sentence_without_pydicoms_traceback(tmp_path, caplog):
  path = write_dicom(
    str(tmp_path / 'j.dcm'), np.zeros((8, 8), np.uint8), syntax=uid.JPEGBaseline8Bit
  )
  with open(path, 'rb') as f:
    data = f.read()
  with caplog.at_level('DEBUG'):
    why = dicom.problem(data)
  assert 'JPEG Baseline' in why and 'could not be decoded' in why and '\n' not in why, why
  assert not [r for r in caplog.records if r.name.startswith('pydicom')], caplog.text


def test_a_mistyped_dataset_offers_the_built_one_not_tfds_downloads(tmp_path):
  from configs import default  # pylint: disable=g-import-not-at-top
  from input_pipeline import sources  # pylint: disable=g-import-not-at-top

  (tmp_path / 'mydata' / '224px' / '1.0.0').mkdir(parents=True)
  (tmp_path / 'mydata' / '224px' / '1.0.0' / 'dataset_info.json').write_text('{}')  # Built.
  (tmp_path / 'downloads' / 'extracted').mkdir(parents=True)  # TFDS's, beside the datasets.
  config = default.get_config()
  config.dataset, config.data_dir = 'mydat', str(tmp_path)
  with pytest.raises(sources.DatasetError) as error:
    sources.for_config(config).builder()
  message = str(error.value)
  assert 'Did you mean --config.dataset=mydata?' in message
  assert "datasets there: ['mydata']" in message and 'downloads' not in message
