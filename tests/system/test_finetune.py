"""Fine-tuning a trained run: `--config.init_from=RUN_DIR`.

The source is the session's tiny synthetic run (tests/conftest.py tiny_run, NIH's
14 labels); the fine-tuned state is read before any step, in process.
"""

import glob
import json
import logging
import os
import shutil

from flax import traverse_util
import jax
import numpy as np
import pytest

from chexnet_jax.run import run_reader
from chexnet_jax.training import config_checks
from chexnet_jax.run import run_weights
from chexnet_jax.runtime import sharding
from chexnet_jax.training import train_state
from configs import cpu_smoke
from input_pipeline import labels as labels_lib
from tests.conftest import REPO
from tests.support import runs
from tests.unit import test_own_data


def _config(init_from, label_names=labels_lib.LABELS, **overrides):
  """cpu_smoke starting from `init_from`, for a dataset of `label_names`."""
  config = cpu_smoke.get_config()
  config.init_from = init_from
  config.num_classes = len(label_names)
  for key, value in overrides.items():
    config[key] = value
  return config, tuple(label_names)


def _initial_variables(config_and_names):
  """The train state's variables before the first step, on the host."""
  config, label_names = config_and_names
  mesh = sharding.make_mesh()
  model = train_state.build_model(config, for_training=True)
  tx, _ = train_state.create_optimizer(config, 1, 1)
  state = train_state.create_train_state(config, model, mesh, tx, label_names)
  assert int(state.step) == 0
  return jax.device_get(state.variables)


def _flat(variables):
  return traverse_util.flatten_dict(jax.device_get(variables))


def _best(run):
  restored = run_reader.load_run(run, 'best')
  return _flat(restored.variables), restored.step


def test_same_labels_start_exactly_from_the_best_checkpoint(tiny_run):
  best, _ = _best(tiny_run)
  start = _flat(_initial_variables(_config(tiny_run)))
  assert set(start) == set(best)
  for key in best:
    np.testing.assert_array_equal(start[key], best[key], err_msg='/'.join(key))


def test_reading_the_source_logs_no_orbax_warning(tiny_run, caplog):
  with caplog.at_level(logging.WARNING):
    run_weights.read_best(tiny_run)
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_read_best_is_the_run_s_best_step(tiny_run):
  best, step = _best(tiny_run)
  variables, read_step = run_weights.read_best(tiny_run)
  assert read_step == step
  for key, value in _flat(variables).items():
    np.testing.assert_array_equal(value, best[key])


def test_new_label_set_keeps_backbone_and_maps_head_by_name(tiny_run, caplog):
  best, _ = _best(tiny_run)
  names = ('Hernia', 'Fresh finding', 'Effusion')  # Reordered subset + a new one.
  config = _config(tiny_run, label_names=names)
  fresh = _flat(_initial_variables(_config('', label_names=names)))
  with caplog.at_level(logging.INFO):
    start = _flat(_initial_variables(config))
  head_kernel, head_bias = ('params', 'classifier', 'kernel'), ('params', 'classifier', 'bias')
  assert start[head_kernel].shape[1] == 3
  for key in best:
    if key not in (head_kernel, head_bias):
      np.testing.assert_array_equal(start[key], best[key], err_msg='/'.join(key))
  for column, name in ((0, 'Hernia'), (2, 'Effusion')):
    row = labels_lib.LABELS.index(name)
    np.testing.assert_array_equal(start[head_kernel][:, column], best[head_kernel][:, row])
    assert start[head_bias][column] == best[head_bias][row]
  # The new label starts as the model initialises it (from scratch, same seed).
  np.testing.assert_array_equal(start[head_kernel][:, 1], fresh[head_kernel][:, 1])
  assert start[head_bias][1] == fresh[head_bias][1]
  assert 'labels carried over: Hernia, Effusion; starting fresh: Fresh finding' in caplog.text


def test_other_architecture_or_not_a_run_is_one_sentence(tiny_run, tmp_path):
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(_config(tiny_run, model='densenet121')[0])
  message = str(error.value)
  assert 'is a tiny run' in message and "config.model='densenet121'" in message
  assert '\n' not in message
  with pytest.raises(config_checks.ConfigError, match='not a chexnet_jax run'):
    config_checks.validate(_config(str(tmp_path))[0])


@pytest.mark.slow
def test_fine_tune_onto_an_own_dataset_end_to_end(tiny_run, tmp_path):
  """From the synthetic NIH-label run onto a CSV dataset with one new label."""
  labels = ('Effusion', 'Atelectasis', 'Nodule plus')
  rows = []
  for r in test_own_data._demo_rows():
    findings = r[1].split('|')
    rows.append(
      [
        f'images/{r[0]}',
        r[3],
        int('Effusion' in findings),
        int('Atelectasis' in findings),
        int('Nodule' in findings),
      ]
    )
  path = test_own_data.write_csv(tmp_path / 'own.csv', rows, header=('path', 'patient', *labels))
  data_dir, workdir = str(tmp_path / 'd'), str(tmp_path / 'run')
  test_own_data._run(
    '-m',
    'input_pipeline.build',
    *test_own_data.own_build_args(path, 'own3', data_dir, 40, 2, labels),
  )
  result = test_own_data.train(
    workdir,
    'dataset=own3',
    f'data_dir={data_dir}',
    f'init_from={os.path.relpath(tiny_run, REPO)}',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'labels carried over: Effusion, Atelectasis; starting fresh: Nodule plus' in result.stderr
  run = json.loads(open(os.path.join(workdir, 'run.json')).read())
  assert run['labels'] == list(labels)
  config = json.loads(open(os.path.join(workdir, 'config.json')).read())
  assert config['init_from'] == os.path.abspath(tiny_run)


# A damaged source run: one sentence naming the run, the step and what to do;
# the source run itself is left as it is (it is not this run's to repair).


def _damaged_copy(tiny_run, tmp_path):
  """A copy of the tiny run and its best step's directory."""
  source = tmp_path / 'source'
  shutil.copytree(tiny_run, source)
  _, step = run_weights.read_best(tiny_run)
  return str(source), step, source / 'checkpoints' / str(step)


def _one_sentence(source, step):
  """The FineTuneError of starting from `source`; checks what every such one says."""
  listing = sorted(os.listdir(os.path.join(source, 'checkpoints')))
  with pytest.raises(run_weights.FineTuneError) as error:
    _initial_variables(_config(source))
  message = str(error.value)
  assert message.startswith(f'config.init_from={source}: checkpoint step {step} of that run is ')
  assert f'move {os.path.join(source, "checkpoints", str(step))} aside' in message
  assert 'or fine-tune from another run.' in message
  assert '\n' not in message and 'Traceback' not in message
  assert sorted(os.listdir(os.path.join(source, 'checkpoints'))) == listing  # Untouched.
  return message


def test_corrupt_best_step_of_the_source_is_one_sentence(tiny_run, tmp_path):
  source, step, step_dir = _damaged_copy(tiny_run, tmp_path)
  largest = max(
    (p for p in step_dir.glob('state/**/*') if p.is_file()), key=lambda p: p.stat().st_size
  )
  data = bytearray(largest.read_bytes())
  data[len(data) // 2] ^= 0x10
  largest.write_bytes(bytes(data))
  message = _one_sentence(source, step)
  relative = os.path.relpath(largest, step_dir)
  assert f'is corrupt ({relative} does not match its checksum)' in message


def test_torn_metrics_of_the_source_is_one_sentence(tiny_run, tmp_path):
  source, _, _ = _damaged_copy(tiny_run, tmp_path)
  metrics = sorted(glob.glob(os.path.join(source, 'checkpoints', '*', 'metrics', 'metrics')))[0]
  step = int(os.path.basename(os.path.dirname(os.path.dirname(metrics))))
  with open(metrics) as f:
    text = f.read()
  with open(metrics, 'w') as f:
    f.write(text[: len(text) // 2])  # Torn mid-write.
  message = _one_sentence(source, step)
  assert 'is torn (metrics: JSONDecodeError)' in message


def test_unreadable_unverified_step_of_the_source_is_one_sentence(tiny_run, tmp_path, caplog):
  source, step, step_dir = _damaged_copy(tiny_run, tmp_path)
  os.remove(step_dir / 'checksums.json')  # Saved before checksums were part of saves...
  data = json.loads((step_dir / 'data' / 'metadata').read_text())
  del data['checksums']
  (step_dir / 'data' / 'metadata').write_text(json.dumps(data))
  shutil.rmtree(step_dir / 'state' / 'ocdbt.process_0')  # ...and its arrays lost.
  with caplog.at_level(logging.WARNING):
    message = _one_sentence(source, step)
  assert 'is unreadable (' in message
  assert f'Checkpoint step {step} of {source} has no checksums.json' in caplog.text


def test_corrupt_source_through_the_command_line_is_one_line(tiny_run, tmp_path):
  source, step, step_dir = _damaged_copy(tiny_run, tmp_path)
  (step_dir / 'data' / 'metadata').write_text('{}')
  result = runs.run_trainer(
    tmp_path / 'run', f'init_from={source}', env={**os.environ, 'PYTHONPATH': REPO}
  )
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert errors == [
    f'error: config.init_from={source}: checkpoint step {step} of that run is corrupt '
    f'(data/metadata does not match its checksum); move '
    f'{os.path.join(source, "checkpoints", str(step))} aside (rename it to {step}.corrupt, '
    "as training does) so that the run's best remaining step is used, or fine-tune from "
    'another run.'
  ]
  assert 'Traceback' not in result.stderr
