"""Synthetic data, tiny model, 2 CPU cores, well under 2 minutes.

The tiny model learns the synthetic labels to a validation mean AUROC above
0.9 by the end (tests/system/test_main.py holds it to that).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.init_from = ''  # Offline: from scratch.
  config.dataset = 'synthetic'
  config.model = 'tiny'
  config.dataset_image_size = 40
  config.image_size = 32
  config.augment = 'random_crop'
  config.eval_preprocess = 'center_crop'  # Scored as trained: a crop, not the resized whole.
  config.synthetic_train_size = 512
  config.synthetic_eval_size = 128
  config.batch_size = 32
  config.eval_batch_size = 64
  config.learning_rate = 4e-3  # At batch 64; the tiny model likes it high.
  config.num_epochs = 20  # 16 steps an epoch: 320 steps.
  config.eval_every_epochs = 4
  config.log_every_steps = 16
  config.checkpoint_every_steps = 32
  return config
