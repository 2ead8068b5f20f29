"""A dataset is what its run and its files say it is: evaluate refuses a dataset
with another split than the run's, and a dataset_info.json whose record counts
are not its shards' (edited, torn) is refused in one sentence before use."""

import json
import os

import pytest

from chexnet_jax import evaluate
from chexnet_jax.run import run_dir
from input_pipeline import records
from input_pipeline import sources
from tests.unit import test_records


def _built(data_dir, split_seed=0):
  plan = test_records.tiny_plan()
  if split_seed:  # The same images, cut into other splits.
    plan = records.make_plan(
      name='tiny',
      rows=plan.rows,
      labels=('Left', 'Right'),
      image_size=16,
      val_fraction=0.25,
      test_fraction=0.25,
      split_seed=split_seed,
    )
  records.write(plan, str(data_dir), num_workers=1)
  sources._builder.cache_clear()
  return test_records._config(data_dir, 'tiny')


def _run_of(workdir, config):
  """A workdir recording what training records at its start (no checkpoint needed
  to be refused: the check comes before the weights are read)."""
  os.makedirs(workdir)
  info = sources.get_dataset_info(config)
  names = sources.get_label_names(config)
  run_dir.check_or_write_identity(workdir, run_dir.run_identity(config, names, info))
  run_dir.record_start(workdir, config, sources.split_file(config))


def test_evaluate_refuses_a_dataset_with_another_split(tmp_path, capsys):
  trained_on = _built(tmp_path / 'a')
  workdir = str(tmp_path / 'run')
  _run_of(workdir, trained_on)
  other = _built(tmp_path / 'b', split_seed=7)
  assert json.load(open(sources.split_file(other))) != json.load(
    open(os.path.join(workdir, 'split.json'))
  )
  status = evaluate.main(['--workdir', workdir, '--data_dir', str(tmp_path / 'b')])
  err = capsys.readouterr().err
  assert status == 1 and 'Traceback' not in err
  assert 'trained on another dataset or split' in err and '--data_dir' in err
  # The run's own dataset passes the check.
  run_dir.check_dataset(
    workdir, sources.get_dataset_info(trained_on), sources.split_file(trained_on)
  )


def _edit_info(config, edit):
  path = os.path.join(sources.for_config(config).directory(), 'dataset_info.json')
  with open(path) as f:
    text = f.read()
  with open(path, 'w') as f:
    f.write(edit(text))
  sources._builder.cache_clear()


@pytest.mark.parametrize('claimed', ['3', '9'])
def test_a_dataset_info_claiming_other_counts_is_refused(tmp_path, claimed):
  config = _built(tmp_path)
  info = json.load(open(os.path.join(sources.for_config(config).directory(), 'dataset_info.json')))
  assert info['splits'][0]['name'] == 'train' and info['splits'][0]['shardLengths'] == ['4']

  def claim(text):
    info = json.loads(text)
    info['splits'][0]['shardLengths'] = [claimed]
    return json.dumps(info)

  _edit_info(config, claim)
  with pytest.raises(sources.DatasetError) as refused:
    sources.get_dataset_info(config)
  message = str(refused.value)
  assert f'says the train split has {claimed} records, its shards hold 4' in message
  assert 'rebuild it: python -m input_pipeline.build' in message and '\n' not in message


def test_a_truncated_dataset_info_is_refused(tmp_path):
  config = _built(tmp_path)
  _edit_info(config, lambda text: text[: len(text) // 2])
  with pytest.raises(sources.DatasetError, match='dataset_info.json cannot be read'):
    sources.get_label_names(config)


def test_a_dataset_change_consented_on_resume_is_what_evaluate_checks_against(tmp_path):
  """--config.allow_changes=dataset: the run goes on from another dataset, and
  run.json and split.json then record that one (later steps are of it)."""
  workdir = str(tmp_path / 'run')
  _run_of(workdir, _built(tmp_path / 'a'))
  other = _built(tmp_path / 'b', split_seed=7)
  info, names = sources.get_dataset_info(other), sources.get_label_names(other)
  identity = run_dir.run_identity(other, names, info)
  with pytest.raises(run_dir.RunMismatchError, match='allow_changes=dataset'):
    run_dir.check_or_write_identity(workdir, identity)
  run_dir.check_or_write_identity(workdir, identity, allowed=('dataset',))
  run_dir.record_start(workdir, other, sources.split_file(other))
  assert run_dir.read_identity(workdir)['dataset'] == info
  run_dir.check_dataset(workdir, info, sources.split_file(other))
