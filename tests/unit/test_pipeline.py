"""The grain pipelines on the converted real sample (and the synthetic source):
sharding over 1, 2, 4 simulated processes, determinism, exact restore, eval padding."""

import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import default
from input_pipeline import labels
from input_pipeline import pipeline
from input_pipeline import sources
from input_pipeline import synthetic
from tests.conftest import REPO


@pytest.fixture
def config(nih_sample):
  c = default.get_config()
  c.data_dir, c.dataset_image_size, c.image_size = nih_sample.data_dir, 64, 48
  c.batch_size, c.eval_batch_size, c.prefetch_buffer = 8, 12, 0
  return c


def _indices(iterator, steps):
  return [next(iterator)['index'].tolist() for _ in range(steps)]


def test_dataset_info_and_clear_errors(config):
  info = sources.get_dataset_info(config)
  assert info['splits'] == {'train': 209, 'validation': 23, 'test': 68}
  assert (info['name'], info['dataset_image_size']) == ('chestxray14', 64)
  config.dataset_image_size = 128
  with pytest.raises(ValueError, match=r'at 128px .*built there: \[.64px.\].*--image_size 128'):
    sources.get_dataset_info(config)
  config.dataset_image_size, config.split_seed = 64, 7
  with pytest.raises(ValueError, match='split_seed'):
    sources.get_dataset_info(config)


def test_train_batch_spec(config):
  batch = next(pipeline.create_train_iterator(config, process_index=0, process_count=2))
  assert batch['image'].shape == (4, 48, 48, 1) and batch['image'].dtype == np.uint8
  assert batch['labels'].shape == (4, 14) and batch['labels'].dtype == np.float32
  assert batch['mask'].dtype == bool and batch['mask'].all()
  assert batch['index'].dtype == np.int32


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_read_slices_of_the_same_global_batches(config, process_count):
  """The stream is a function of (seed, global step): P processes together read
  exactly what one process reads, each its rows of every global batch."""
  n = 209
  steps = pipeline.train_steps_per_epoch(config, n, process_count)
  assert steps == 209 // 8
  one = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  parts = [
    pipeline.create_train_iterator(config, process_index=p, process_count=process_count)
    for p in range(process_count)
  ]
  epochs = []
  for _ in range(2):
    epoch = []
    for _ in range(steps):
      want = next(one)
      got = [next(part) for part in parts]
      for key in want:
        np.testing.assert_array_equal(want[key], np.concatenate([g[key] for g in got]))
      epoch += want['index'].tolist()
    assert len(epoch) == len(set(epoch)) == steps * config.batch_size  # Once an epoch.
    epochs.append(epoch)
  assert epochs[0] != epochs[1]  # Reshuffled.


def test_start_step_continues_the_stream(config):
  """A resumed run needs only the global step: on any number of processes."""
  steps = pipeline.train_steps_per_epoch(config, 209, 1)  # 26: cross an epoch boundary.
  it = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  _take(it, steps - 3)
  expected = _take(it, 6)
  parts = [
    pipeline.create_train_iterator(config, process_index=p, process_count=2, start_step=steps - 3)
    for p in range(2)
  ]
  for want in expected:
    got = [next(part) for part in parts]
    for key in want:
      np.testing.assert_array_equal(want[key], np.concatenate([g[key] for g in got]))


def test_same_seed_same_order_other_seed_other_order(config):
  first = _indices(pipeline.create_train_iterator(config, process_index=0, process_count=1), 5)
  again = _indices(pipeline.create_train_iterator(config, process_index=0, process_count=1), 5)
  config.seed = 1
  other = _indices(pipeline.create_train_iterator(config, process_index=0, process_count=1), 5)
  assert first == again and first != other


def _take(iterator, steps):
  return [next(iterator) for _ in range(steps)]


def test_restore_mid_epoch_continues_exactly(config):
  steps = pipeline.train_steps_per_epoch(config, 209, 1)  # 26: cross an epoch boundary.
  it = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  _take(it, steps - 3)
  state = it.get_state()
  expected = _take(it, 6)
  restored = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  restored.set_state(state)
  for want, got in zip(expected, _take(restored, 6)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])  # Crops and flips included.


@pytest.mark.parametrize(
  'process_count, eval_batch', [(1, 12), (2, 12), (4, 12), (4, 8), (3, 8)]
)  # 8 -> 9: any count works.
@pytest.mark.parametrize('split', ['validation', 'test'])
def test_eval_scores_each_example_once(config, split, process_count, eval_batch):
  config.eval_batch_size = eval_batch
  n = {'validation': 23, 'test': 68}[split]
  per_process = []
  for p in range(process_count):
    batches = list(
      pipeline.create_eval_iterator(config, split, process_index=p, process_count=process_count)
    )
    local = -(-eval_batch // process_count)  # Rounded up to a whole number per process.
    assert all(b['image'].shape == (local, 48, 48, 1) for b in batches)
    per_process.append(batches)
  assert len({len(b) for b in per_process}) == 1  # Same number of batches everywhere.
  batches = [b for bs in per_process for b in bs]
  index = np.concatenate([b['index'] for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  assert sorted(index[mask].tolist()) == list(range(n))
  assert (index[~mask] == -1).all() and (~mask).sum() == len(index) - n


def test_eval_labels_and_metadata_match_csv(config, nih_sample):
  from input_pipeline import nih

  entries, _ = nih.read_data_entry(nih_sample.manual_dir + '/Data_Entry_2017_v2020.csv.gz')
  meta = sources.split_metadata(config, 'test')
  assert len(meta) == 68
  for batch in pipeline.create_eval_iterator(config, 'test', process_index=0, process_count=1):
    for index, label_vector in zip(batch['index'][batch['mask']], batch['labels'][batch['mask']]):
      entry = entries[meta[index]['image_name']]
      np.testing.assert_array_equal(label_vector, entry.labels)
      assert meta[index]['patient_id'] == entry.patient_id
  assert (
    sum(
      len(m['boxes'])
      for split in ('train', 'validation', 'test')
      for m in sources.split_metadata(config, split)
    )
    == 6
  )


def test_eval_center_crop_is_the_stored_image_centre(config):
  config.eval_preprocess = 'center_crop'
  batch = next(
    iter(pipeline.create_eval_iterator(config, 'test', process_index=0, process_count=1))
  )
  stored = sources.get_source(config, 'test')[0]['image']
  np.testing.assert_array_equal(batch['image'][0], stored[8:56, 8:56])


def test_eval_resize_is_the_whole_stored_image(config):
  """The default (CheXNet): the whole image, resized to the model's size."""
  assert config.eval_preprocess == 'resize'
  batch = next(
    iter(pipeline.create_eval_iterator(config, 'test', process_index=0, process_count=1))
  )
  stored = sources.get_source(config, 'test')[0]['image']
  whole = np.asarray(Image.fromarray(stored[:, :, 0]).resize((48, 48), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(batch['image'][0, :, :, 0], whole)


@pytest.mark.parametrize('augment', ['resize', 'random_resized_crop', 'random_crop', 'center_crop'])
def test_augment_modes(config, augment):
  config.augment = augment
  image = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64, 1).astype(np.uint8)
  crops = [pipeline.augment(image, np.random.default_rng(s), config) for s in range(8)]
  assert all(c.shape == (48, 48, 1) and c.dtype == np.uint8 for c in crops)
  distinct = {c.tobytes() for c in crops}
  assert len(distinct) > 1  # Flips at least (and crops, but for center_crop).
  config.random_flip = False
  if augment == 'center_crop':
    assert (
      pipeline.augment(image, np.random.default_rng(0), config).tobytes()
      == image[8:56, 8:56].tobytes()
    )
  if augment == 'resize':  # CheXNet: the whole image, only flipped.
    whole = Image.fromarray(image[:, :, 0]).resize((48, 48), Image.Resampling.BILINEAR)
    assert {
      pipeline.augment(image, np.random.default_rng(s), config).tobytes() for s in range(4)
    } == {np.asarray(whole).tobytes()}


def test_bad_batch_sizes_explained(config):
  config.batch_size = 6
  with pytest.raises(ValueError, match='config.batch_size=6 does not divide over 4 processes'):
    pipeline.create_train_iterator(config, process_index=0, process_count=4)
  config.batch_size = 512
  with pytest.raises(ValueError, match='cannot fill one batch of 512'):
    pipeline.create_train_iterator(config, process_index=0, process_count=1)


# ---------------------------------------------------------------- synthetic


@pytest.fixture
def synthetic_config(config):
  config.dataset, config.synthetic_train_size, config.synthetic_eval_size = 'synthetic', 64, 20
  return config


def test_synthetic_same_element_spec(synthetic_config, nih_sample, config):
  fake = synthetic.source(synthetic_config, 'train')[3]
  synthetic_config.dataset = 'chestxray14'
  real = sources.get_source(synthetic_config, 'train')[3]
  assert sorted(fake) == sorted(real)
  for key in ('image', 'labels'):
    assert (fake[key].shape, fake[key].dtype) == (real[key].shape, real[key].dtype)
  assert sorted(fake['boxes']) == sorted(real['boxes'])


def test_synthetic_is_learnable_and_localised(synthetic_config):
  source = synthetic.source(synthetic_config, 'validation')
  for index in range(len(source)):
    example = source[index]
    for k in range(labels.NUM_CLASSES):
      x, y, w, h = synthetic.patch_box(k, 64)
      patch_mean = example['image'][y : y + h, x : x + w].mean()
      # Background noise is < 90; a drawn patch (any class texture) averages far above.
      assert (patch_mean > 120) == bool(example['labels'][k])
  assert (
    synthetic.source(synthetic_config, 'validation')[5]['image'].tobytes()
    == source[5]['image'].tobytes()
  )  # Pure function of (split, index).
  boxes = {synthetic.patch_box(k, 224) for k in range(14)}
  assert len(boxes) == 14 and all(x + w <= 224 and y + h <= 224 for x, y, w, h in boxes)


def test_synthetic_goes_through_the_same_pipeline(synthetic_config):
  assert sources.get_dataset_info(synthetic_config)['splits'] == {
    'train': 64,
    'validation': 20,
    'test': 20,
  }
  it = pipeline.create_train_iterator(synthetic_config, process_index=0, process_count=2)
  batch = next(it)
  assert batch['image'].shape == (4, 48, 48, 1) and batch['labels'].shape == (4, 14)
  evals = list(
    pipeline.create_eval_iterator(synthetic_config, 'test', process_index=1, process_count=2)
  )
  assert sum(b['mask'].sum() for b in evals) == 20 - 12  # Process 1 holds 12..19 + padding.
  assert sources.split_metadata(synthetic_config, 'test')[0]['image_name'].startswith('synthetic')


def test_worker_processes_give_the_same_batches(synthetic_config):
  in_process = pipeline.create_train_iterator(synthetic_config, process_index=0, process_count=1)
  synthetic_config.grain_workers, synthetic_config.prefetch_buffer = 1, 2
  workers = pipeline.create_train_iterator(synthetic_config, process_index=0, process_count=1)
  for want, got in zip(_take(in_process, 3), _take(workers, 3)):
    np.testing.assert_array_equal(want['image'], got['image'])
    np.testing.assert_array_equal(want['index'], got['index'])


# A process that drops its input's batches and exits at once, while grain's
# thread that frees their shared memory is slow (as on a loaded machine).
_CLOSE_THEN_EXIT = """
import time
from grain import multiprocessing as grain_multiprocessing
from configs import cpu_smoke
from input_pipeline import pipeline, workers

free = grain_multiprocessing.SharedMemoryArray.close_shm_async.__func__
def slow_free(cls, shm, unlink):
  time.sleep(0.2)
  free(cls, shm, unlink)
grain_multiprocessing.SharedMemoryArray.close_shm_async = classmethod(slow_free)

def read_and_close():
  config = cpu_smoke.get_config()
  config.grain_workers, config.prefetch_buffer = 2, 2
  iterator = pipeline.create_train_iterator(config, process_index=0, process_count=1)
  for _ in range(4):
    next(iterator)
  for _ in pipeline.create_eval_iterator(config, 'validation', process_index=0, process_count=1):
    pass
  del _
  workers.close(iterator)

read_and_close()
"""


def test_closing_the_input_frees_its_shared_memory_before_exit():
  """Without waiting for grain's frees, such a process left ~50 segments to
  the resource tracker, which warned of "leaked shared_memory objects"."""
  result = subprocess.run(
    [sys.executable, '-c', _CLOSE_THEN_EXIT],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'leaked shared_memory' not in result.stderr, result.stderr[-3000:]
  assert 'grain had not freed' not in result.stderr, result.stderr[-3000:]


def test_dataset_info_gives_positive_fractions_of_train(config):
  """What CheXNet's weighted BCE (config.pos_weight) is computed from."""
  info = sources.get_dataset_info(config)
  source = sources.get_source(config, 'train')
  labels = np.stack([source[i]['labels'] for i in range(len(source))])
  np.testing.assert_allclose(info['train_positive_fraction'], labels.mean(0))
  assert info['splits']['train'] == len(source)


def test_dataset_records_which_label_file_it_read(config):
  """NIH revised the labels in 2020: the dataset says which file it was built from."""
  info = sources.get_dataset_info(config)
  assert info['label_file'].startswith('Data_Entry_2017_v2020.csv')
  assert "NIH's 2020 label revision" in info['label_file']


def test_eval_batch_is_rounded_up_to_the_device_count(config):
  """64 over 3 processes stopped evaluate; now it is padded to 66."""
  config.eval_batch_size = 64
  assert pipeline.global_eval_batch(config, 3) == 66
  assert pipeline.global_eval_batch(config, 4) == 64
  batches = list(pipeline.create_eval_iterator(config, 'test', process_index=2, process_count=3))
  assert {b['image'].shape[0] for b in batches} == {22}
  one = list(
    pipeline.create_eval_iterator(config, 'test', process_index=0, process_count=1, device_count=3)
  )
  assert {b['image'].shape[0] for b in one} == {66}
