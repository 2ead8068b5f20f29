"""evaluate --tta tencrop: ten distinct views at the training scale, or refused
in one sentence (chexnet_jax/evaluation/tta.py)."""

import itertools

import numpy as np
import pytest

from chexnet_jax.evaluation import scoring
from chexnet_jax.evaluation import tta
from configs import default


def _config(record, size, augment):
  config = default.get_config()
  config.dataset_image_size, config.image_size, config.augment = record, size, augment
  return config


def test_records_no_larger_than_the_input_are_refused():
  config = default.get_config()  # 224 px records, 224 px model: flip under another name.
  with pytest.raises(tta.TTAError) as error:
    scoring._tta_iteration_config(config, 'tencrop')
  message = str(error.value)
  assert "this run's records are 224 px and its model input 224 px" in message
  assert 'build the dataset at a larger --image_size (256 px' in message
  assert '\n' not in message


def test_whole_image_training_is_refused_on_larger_records():
  with pytest.raises(tta.TTAError, match=r'trained on the whole 256 px record resized to 224 px'):
    tta.check_tencrop(_config(256, 224, 'resize'))


@pytest.mark.parametrize('augment', tta.CROP_AUGMENTS)
def test_crop_trained_runs_get_ten_distinct_views_at_the_record_scale(augment):
  config = scoring._tta_iteration_config(_config(256, 224, augment), 'tencrop')
  assert config.image_size == 256  # The iterator hands over the whole record.
  images = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 1), dtype=np.uint8)
  views = scoring.tta_views(images, 'tencrop', 224)
  assert len(views) == 10 and all(v.shape == (2, 224, 224, 1) for v in views)
  for a, b in itertools.combinations(views, 2):
    assert not np.array_equal(a, b)
  np.testing.assert_array_equal(views[0], images[:, :224, :224])  # Native scale: no resize.
  np.testing.assert_array_equal(views[4], images[:, 16:240, 16:240])  # The centre.
  np.testing.assert_array_equal(views[9], images[:, 16:240, 16:240][:, :, ::-1])


def test_flip_needs_nothing_of_the_records():
  config = scoring._tta_iteration_config(default.get_config(), 'flip')
  assert config.image_size == 224
