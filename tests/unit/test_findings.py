"""What the outputs present as a finding, and whose images they name: the dataset's own
identifiers in every row, and the numbers flagged that rest on too little
(label_columns.cautions, the gallery at the validation threshold)."""

import csv

import numpy as np
import pytest

from chexnet_jax.report import eval_outputs
from chexnet_jax.report import figures
from chexnet_jax.evaluation import label_columns
from chexnet_jax.evaluation import localization
from chexnet_jax.report import page as report_page
from chexnet_jax.evaluation import scoring
from input_pipeline import sources
from tests.support import evaluations

NAMES = ('Effusion', 'Mass')


def _evaluation(labels, probs, records, thresholds):
  return evaluations.without_a_model(labels, probs, records, thresholds, NAMES)


def _record(example):
  """A stored record's metadata as the read side gives it (sources.record_metadata)."""
  base = {
    'image_name': example.pop('image_name'),
    'patient_id': example.pop('patient_id'),
    'age': 50,
    'sex': 'F',
    'view_position': 'PA',
    'follow_up': 0,
    'labels': np.zeros(2, np.uint8),
    'boxes': {'label': [], 'bbox': []},
  }
  return sources.record_metadata({**base, **example})


@pytest.mark.parametrize(
  'example, image, patient',
  [
    # NIH: the Image Index, and the Patient ID of Data_Entry.
    (
      {'image_name': b'00000100_000.png', 'patient_id': 0, 'patient': b'100'},
      '00000100_000.png',
      '100',
    ),
    # A CSV dataset: its path below the image root, and its own patient column.
    (
      {'image_name': b'p7/study2/view1_frontal.jpg', 'patient_id': 3, 'patient': b'patient-07'},
      'p7/study2/view1_frontal.jpg',
      'patient-07',
    ),
  ],
)
def test_predictions_csv_carries_the_datasets_own_identifiers(tmp_path, example, image, patient):
  records = [_record(dict(example)), _record({**example, 'image_name': b'other.png'})]
  evaluation = _evaluation(
    [[1, 0], [0, 1]], [[0.9, 0.2], [0.1, 0.8]], records, {n: 0.5 for n in NAMES}
  )
  eval_outputs.write_predictions_csv(tmp_path / 'p.csv', evaluation)
  with open(tmp_path / 'p.csv', newline='') as f:
    first = next(csv.DictReader(f))
  assert (first['image'], first['patient']) == (image, patient)
  assert evaluation.patient_note == ''


def test_a_dataset_built_before_falls_back_to_the_builders_number_and_says_so_once(tmp_path):
  old = [_record({'image_name': f'{i}.png'.encode(), 'patient_id': 40 + i}) for i in range(2)]
  evaluation = _evaluation([[1, 0], [0, 1]], [[0.9, 0.2], [0.1, 0.8]], old, {n: 0.5 for n in NAMES})
  assert scoring.patients_of(old) == ['40', '41']
  assert evaluation.patient_note == scoring.PATIENT_FALLBACK_NOTE
  identity = dict(report_page.identity(evaluation))
  assert identity['patient IDs'] == scoring.PATIENT_FALLBACK_NOTE


def test_cautions_state_one_rule_for_few_positives_and_degenerate_thresholds():
  few = {'num_positive': label_columns.MIN_POSITIVES - 1, 'threshold': 0.4, 'sensitivity': 0.5}
  enough = {'num_positive': label_columns.MIN_POSITIVES, 'threshold': 0.4, 'sensitivity': 0.5}
  assert 'fewer than 10' in label_columns.cautions(few)[0]
  assert label_columns.cautions(enough) == []
  for degenerate in (
    {'threshold': 1.0, 'sensitivity': 0.1},
    {'threshold': 0.3, 'sensitivity': 0.0},
  ):
    (text,) = label_columns.cautions({'num_positive': 50, **degenerate})
    assert text.startswith(f'degenerate threshold {degenerate["threshold"]:.3f}')


def test_flagged_labels_show_in_the_table_the_csv_and_the_console(tmp_path, capsys):
  from chexnet_jax import evaluate

  rng = np.random.default_rng(0)
  labels = np.zeros((60, 2), np.float32)
  labels[:30, 0] = 1  # Effusion: 30 positives, a sound threshold.
  labels[:3, 1] = 1  # Mass: 3 positives, and a threshold no image reaches.
  probs = np.clip(labels * 0.5 + rng.random((60, 2)) * 0.5, 0, 0.99)
  records = [{'image_name': f'{i}.png', 'patient': f'p{i}'} for i in range(60)]
  evaluation = _evaluation(labels, probs, records, {'Effusion': 0.5, 'Mass': 1.0})
  rows = {row['label']: row for row in report_page.per_label_rows(evaluation)}
  assert rows['Effusion']['caution'] == ''
  assert 'only 3 positive images' in rows['Mass']['caution']
  assert 'degenerate threshold 1.000' in rows['Mass']['caution']
  page = report_page.per_label_table_html(list(rows.values()))
  assert '<th>Caution</th>' in page and 'only 3 positive images' in page
  eval_outputs.write_auroc_csv(tmp_path / 'auroc.csv', evaluation.report)
  with open(tmp_path / 'auroc.csv', newline='') as f:
    table = {row['pathology']: row for row in csv.DictReader(f)}
  assert table['Effusion']['caution'] == '' and 'fewer than 10' in table['Mass']['caution']
  evaluate.print_notes(evaluation)
  printed = capsys.readouterr().out
  assert 'Mass: only 3 positive images' in printed and 'Effusion' not in printed


def test_gallery_picks_true_positives_at_the_validation_threshold():
  labels = np.array([[1, 1], [1, 0], [0, 0]], np.float32)
  probs = np.array([[0.6, 0.3], [0.4, 0.2], [0.9, 0.95]], np.float32)
  records = [{'image_name': f'{i}.png', 'patient': f'p{i}', 'boxes': []} for i in range(3)]
  # Effusion: row 0 reaches 0.5 (row 2 is more confident, but a negative).
  # Mass: its positive, row 0, is scored 0.3 < 0.5: no true positive, no entry.
  evaluation = _evaluation(labels, probs, records, {'Effusion': 0.5, 'Mass': 0.5})
  assert localization.gallery_choices(evaluation, 8) == [(0, 0)]
  unreachable = _evaluation(labels, probs, records, {'Effusion': 0.99, 'Mass': 0.99})
  assert localization.gallery_choices(unreachable, 8) == []
  assert 'No true positive in this split' in report_page.gallery_html('', [])


def test_reliability_panels_count_the_images_of_each_bin():
  labels = np.array([[1], [0], [0], [1], [1]], np.float32)
  probs = np.array([[0.05], [0.05], [0.55], [0.95], [0.97]], np.float32)
  figure = figures.reliability_figure(labels, probs, 1.0, ('Effusion',), 'test')
  texts = [t.get_text() for t in figure.axes[0].texts]
  assert sorted(texts) == ['1', '2', '2']  # Bins 0.0-0.1, 0.5-0.6 and 0.9-1.0.


def test_a_region_of_the_whole_image_is_drawn_inside_it():
  x, y, w, h = figures._inside((0, 0, 56, 56), (56, 56))
  assert x > 0 and y > 0 and x + w < 56 and y + h < 56
  assert figures._inside((10, 12, 20, 22), (56, 56)) == (10, 12, 20, 22)  # Not at an edge.
