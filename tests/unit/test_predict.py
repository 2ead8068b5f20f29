"""chexnet_jax/predict.py: reading images like the eval pipeline, and the CLI on a tiny run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from chexnet_jax.report import eval_outputs
from chexnet_jax import predict
from input_pipeline import images as images_lib
from input_pipeline import labels as labels_lib
from tests.support import console_lines

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_IMAGES = os.path.join(REPO, 'demo_data', 'images')  # Real NIH images, 256 px grey.
# A full-size NIH original (1024 px, RGBA).
RGBA_SAMPLE = os.path.join(REPO, 'tests', 'fixtures', 'nih', 'images', '00001369_000.png')


def _gradient(height=40, width=40):
  return np.add.outer(np.arange(height) * 3, np.arange(width) * 2).astype(np.uint8)


@pytest.mark.parametrize('mode', ['L', 'RGB', 'RGBA'])
def test_grey_rgb_and_rgba_files_load_alike(tmp_path, mode):
  grey = _gradient()
  path = tmp_path / f'x_{mode}.png'
  Image.fromarray(grey).convert(mode).save(path)
  image, size = predict.load_image(str(path), 32, 28)
  expected, _ = predict.load_image(str(_save(tmp_path / 'ref.png', grey)), 32, 28)
  assert image.shape == (28, 28, 1) and image.dtype == np.uint8 and size == (40, 40)
  np.testing.assert_array_equal(image, expected)


def _save(path, array, **kwargs):
  Image.fromarray(array).save(path, **kwargs)
  return path


def test_sixteen_bit_png_is_scaled_by_its_range(tmp_path):
  values = (np.arange(40 * 40).reshape(40, 40) % 1000 + 3000).astype(np.uint16)
  path = tmp_path / 'x16.png'
  Image.fromarray(values).save(path)
  with Image.open(path) as check:
    assert check.mode.startswith('I')
  image, _ = predict.load_image(str(path), 40, 40)
  assert image.min() == 0 and image.max() == 255


def test_jpeg_loads(tmp_path):
  path = _save(tmp_path / 'x.jpg', _gradient(), quality=95)
  image, _ = predict.load_image(str(path), 32, 32)
  assert image.shape == (32, 32, 1)


def test_non_square_is_resized_to_a_square_like_the_dataset_builder():
  tall = np.zeros((80, 40), np.uint8)
  tall[:20] = 255  # Top quarter: rows 0-4 of 20.
  tall[30:50] = 128  # Rows 7.5-12.5 of 20.
  image = predict.prepare(tall, 20, 16)[..., 0]
  assert image.shape == (16, 16)  # Centre crop drops rows 0-1 and 18-19.
  assert image[0].min() == 255 and image[7:9].min() == 128


def test_prepare_matches_dataset_builder_on_square_images():
  from input_pipeline import images

  grey = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
  stored = images.decode_and_resize(_png_bytes(grey), 32)
  np.testing.assert_array_equal(predict.prepare(grey, 32, 32), stored)
  np.testing.assert_array_equal(predict.prepare(grey, 32, 24), stored[4:28, 4:28])


def _png_bytes(array):
  import io

  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def test_real_rgba_sample_loads():
  with Image.open(RGBA_SAMPLE) as original:
    assert original.mode == 'RGBA'
  image, size = predict.load_image(RGBA_SAMPLE, 64, 56)
  assert image.shape == (56, 56, 1) and size == (1024, 1024) and image.std() > 10


@pytest.mark.parametrize('content', [b'', b'not an image at all', b'\x89PNG\r\n\x1a\n' + b'0' * 50])
def test_unreadable_file_is_a_clear_error(tmp_path, content):
  path = tmp_path / 'broken.png'
  path.write_bytes(content)
  with pytest.raises(predict.ImageLoadError, match='broken.png') as error:
    predict.load_image(str(path), 32, 32)
  assert 'BytesIO' not in str(error.value) and ' at 0x' not in str(error.value)


def test_truncated_png_is_a_clear_error(tmp_path):
  noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
  path = _save(tmp_path / 'whole.png', noise)
  cut = tmp_path / 'cut.png'
  cut.write_bytes(path.read_bytes()[:200])
  with pytest.raises(predict.ImageLoadError, match='cut.png'):
    predict.load_image(str(cut), 32, 32)


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(predict.ImageLoadError, match='no such file'):
    predict.load_image(str(tmp_path / 'absent.png'), 32, 32)


def test_more_pixels_than_the_builders_limit_is_refused(tmp_path, monkeypatch):
  # The one limit the dataset builder applies (input_pipeline.images.MAX_PIXELS).
  path = _save(tmp_path / 'big.png', _gradient())
  monkeypatch.setattr(images_lib, 'MAX_PIXELS', 40 * 40 - 1)
  with pytest.raises(predict.ImageLoadError, match=r'big.png: .*images.MAX_PIXELS'):
    predict.load_image(str(path), 32, 32)
  monkeypatch.setattr(images_lib, 'MAX_PIXELS', 40 * 40)
  assert predict.load_image(str(path), 32, 32)[1] == (40, 40)


def test_a_file_that_is_no_image_says_so(tmp_path):
  (tmp_path / 'notes.png').write_text('a text file')
  with pytest.raises(predict.ImageLoadError, match='not a readable PNG/JPEG/DICOM image'):
    predict.load_image(str(tmp_path / 'notes.png'), 32, 32)
  with pytest.raises(predict.ImageLoadError, match='cannot be read'):
    predict.load_image(str(tmp_path), 32, 32)  # A folder.


def test_top_findings_and_table():
  probs = np.linspace(0.01, 0.14, 14)
  top = predict.top_findings(probs, 3, labels_lib.LABELS)
  assert [t[0] for t in top] == ['Hernia', 'Pleural_Thickening', 'Fibrosis']
  # The run's label names are required: nothing falls back to NIH's.
  with pytest.raises(TypeError):
    predict.top_findings(probs, 3)  # pylint: disable=no-value-for-parameter
  own = ('Effusion', 'Lung Opacity', 'Support Devices')
  assert predict.top_findings(np.array([0.2, 0.7, 0.5]), 2, own) == [
    ('Lung Opacity', 1, pytest.approx(0.7)),
    ('Support Devices', 2, pytest.approx(0.5)),
  ]
  with pytest.raises(ValueError, match='3 probabilities but 14 label names'):
    predict.top_findings(np.array([0.2, 0.7, 0.5]), 2, labels_lib.LABELS)
  table = predict.format_table(
    [{'image': 'a/x.png', 'probabilities': dict(zip(labels_lib.LABELS, probs))}]
  )
  assert len(table.splitlines()) == 15 and 'x.png' in table


def test_help_runs_without_a_run():
  result = subprocess.run(
    [sys.executable, '-m', 'chexnet_jax.predict', '--help'],
    capture_output=True,
    text=True,
    check=True,
  )
  assert '--workdir' in result.stdout and '--top_k' in result.stdout


# ------------------------------------------------ the CLI on the tiny run --

SAMPLES = [
  os.path.join(DEMO_IMAGES, '00000100_000.png'),
  os.path.join(DEMO_IMAGES, '00000129_000.png'),
  RGBA_SAMPLE,
]


def test_predict_real_samples_with_a_corrupt_file_among_them(tiny_run, tmp_path):
  corrupt = tmp_path / 'corrupt.png'
  corrupt.write_bytes(open(SAMPLES[1], 'rb').read()[:1000])  # A truncated PNG.
  out = tmp_path / 'out'
  command = [
    sys.executable,
    '-m',
    'chexnet_jax.predict',
    SAMPLES[0],
    str(corrupt),
    *SAMPLES[1:],
    '--workdir',
    tiny_run,
    '--top_k',
    '2',
    '--output_dir',
    str(out),
  ]
  result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'corrupt.png' in result.stderr and 'error' in result.stderr
  assert console_lines.unexpected_lines(result.stderr) == [], result.stderr[-3000:]
  rows = [
    line.split()
    for line in result.stdout.splitlines()
    if line.split() and line.split()[0] in labels_lib.LABELS
  ]
  assert [row[0] for row in rows] == list(labels_lib.LABELS)
  assert all(len(row) == 1 + len(SAMPLES) for row in rows)  # 14 probabilities per image.
  with open(out / 'predictions.json') as f:
    written = json.load(f)
  assert [r['image'] for r in written['results']] == SAMPLES
  assert [f['image'] for f in written['failures']] == [str(corrupt)]
  for result_row in written['results']:
    probs = result_row['probabilities']
    assert list(probs) == list(labels_lib.LABELS) and all(0 < p < 1 for p in probs.values())
    assert len(result_row['top_findings']) == 2
    for finding in result_row['top_findings']:
      with Image.open(finding['heatmap']) as png:
        assert png.format == 'PNG'


def test_predict_probabilities_equal_the_eval_model(tiny_run):
  """predict's probabilities are make_logits_fn's on the same prepared image."""
  import jax
  from chexnet_jax.evaluation import cam
  from chexnet_jax.run import run_reader
  from chexnet_jax.evaluation import inference

  run = run_reader.load_run(tiny_run, 'latest')
  image, _ = predict.load_image(SAMPLES[0], run.config.dataset_image_size, run.config.image_size)
  probs, _ = cam.make_cam_fn(run.model)(cam.local_copy(run.variables), image[None])
  logits = inference.make_logits_fn(run.model)(cam.local_copy(run.variables), image[None])
  np.testing.assert_allclose(probs, jax.nn.sigmoid(logits), atol=1e-6)


def test_heatmap_stems_stay_distinct():
  seen = set()
  names = ['a/x.png', 'a_x.png', 'my scan.jpg']
  stems = [predict.heatmap_stem(n, i, seen) for i, n in enumerate(names)]
  assert stems == ['a_x', 'a_x_1', 'my_scan']
  assert eval_outputs.safe_file_name('Lung Opacity') == 'Lung_Opacity'


def test_inputs_are_named_by_their_path_below_the_common_folder(tmp_path):
  paths = [str(tmp_path / f'patient1/study{i}/view1_frontal.jpg') for i in (1, 2)]
  paths.append(str(tmp_path / 'patient2/study1/view1_frontal.jpg'))
  assert predict.input_names(paths) == [
    os.path.join('patient1', 'study1', 'view1_frontal.jpg'),
    os.path.join('patient1', 'study2', 'view1_frontal.jpg'),
    os.path.join('patient2', 'study1', 'view1_frontal.jpg'),
  ]
  assert predict.input_names([paths[0]]) == ['view1_frontal.jpg']
  assert predict.input_names([paths[0], paths[0]]) == ['view1_frontal.jpg'] * 2


def test_table_aligns_long_label_names():
  labels = ('Enlarged Cardiomediastinum', 'Effusion')
  results = [
    {
      'image': f'{s}/view1_frontal.jpg',
      'name': f'{s}/view1_frontal.jpg',
      'probabilities': dict(zip(labels, (0.25, 0.5))),
    }
    for s in ('study1', 'study2')
  ]
  lines = predict.format_table(results).splitlines()
  assert len({len(line) for line in lines}) == 1  # Every row as wide as the header.
  assert 'study1/view1_frontal.jpg' in lines[0] and 'study2/view1_frontal.jpg' in lines[0]
  assert lines[1].split() == ['Enlarged', 'Cardiomediastinum', '0.250', '0.250']


def test_inputs_are_checked_before_the_model_is_loaded(tmp_path, capsys):
  (tmp_path / 'notes.png').write_text('not an image')
  # The run does not exist either: the images are the first thing said, and nothing else.
  code = predict.main(
    [str(tmp_path / 'absent.png'), str(tmp_path / 'notes.png'), '--workdir', str(tmp_path / 'no')]
  )
  err = capsys.readouterr().err
  assert code == 1
  assert 'absent.png: no such file' in err and 'notes.png: not a readable PNG/JPEG/DICOM' in err
  assert 'nothing was scored or written' in err and 'workdir' not in err.lower()
  assert not (tmp_path / 'no').exists()


def test_each_call_replaces_its_own_outputs_only(tiny_run, tmp_path, capsys):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'mine.txt').write_text('the user keeps this here')
  first = [os.path.join(DEMO_IMAGES, '00000100_000.png')]
  assert (
    predict.main([*first, '--workdir', tiny_run, '--top_k', '2', '--output_dir', str(out)]) == 0
  )
  assert sorted(os.listdir(out / 'heatmaps'))[0].startswith('00000100_000_')
  second = tmp_path / 'study 2'
  second.mkdir()
  (second / 'scan.png').write_bytes(open(SAMPLES[1], 'rb').read())
  assert (
    predict.main(
      [str(second / 'scan.png'), '--workdir', tiny_run, '--top_k', '1', '--output_dir', str(out)]
    )
    == 0
  )
  heatmaps = os.listdir(out / 'heatmaps')
  assert len(heatmaps) == 1 and heatmaps[0].startswith('scan_') and ' ' not in heatmaps[0]
  assert (out / 'mine.txt').read_text() == 'the user keeps this here'
  written = json.loads((out / 'predictions.json').read_text())
  assert [r['name'] for r in written['results']] == ['scan.png']
  assert os.path.isfile(written['results'][0]['top_findings'][0]['heatmap'])
  assert sorted(os.listdir(out)) == ['heatmaps', 'mine.txt', 'predictions.json']


# ------------------------------------------ refused before the model loads --


@pytest.mark.parametrize(
  'shape, why',
  [((1, 1), 'too small for a radiograph'), ((1, 3000), "not a radiograph's shape")],
)
def test_an_icon_or_a_strip_is_refused_naming_the_rule(tmp_path, shape, why):
  path = _save(tmp_path / 'odd.png', np.full(shape, 128, np.uint8))
  usable, failures = predict.check_inputs([str(path)])
  assert not usable and len(failures) == 1
  assert why in failures[0]['error'] and '\n' not in failures[0]['error']
  width, height = shape[1], shape[0]
  assert f'{width} x {height} pixels' in failures[0]['error']


def test_bad_arguments_are_one_sentence_before_the_model(tmp_path, capsys):
  image = str(_save(tmp_path / 'x.png', _gradient()))
  with pytest.raises(SystemExit) as stopped:
    predict.main([image, '--workdir', str(tmp_path), '--top_k', '-1'])
  assert stopped.value.code == 2
  assert 'argument --top_k: -1 is below 0; give 0 or more' in capsys.readouterr().err
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('x')
  code = predict.main([image, '--workdir', str(tmp_path / 'none'), '--output_dir', str(a_file)])
  err = capsys.readouterr().err
  assert code == 1 and err == (
    f'error: --output_dir {a_file} is a file, not a folder; name a folder (it is '
    'created if missing).\n'
  )


def test_a_mistyped_checkpoint_lists_the_choices(capsys):
  with pytest.raises(SystemExit) as exit_info:
    predict.parse_args(['x.png', '--workdir', 'run', '--checkpoint', 'bset'])
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert exit_info.value.code == 2
  assert error.endswith(
    "argument --checkpoint: 'bset' is not a checkpoint: give 'best', 'latest' or a step "
    "number (did you mean 'best'?)."
  )
  assert 'parse_selector' not in error
