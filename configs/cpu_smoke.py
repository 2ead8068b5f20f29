"""Synthetic data, tiny model, 2 CPU cores, well under 2 minutes."""
from configs import default


def get_config():
  config = default.get_config()
  config.dataset = 'synthetic'
  config.model = 'tiny'
  config.dataset_image_size = 40
  config.image_size = 32
  config.augment = 'random_crop'
  config.synthetic_train_size = 512
  config.synthetic_eval_size = 128
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_epochs = 4
  config.log_every_steps = 4
  config.checkpoint_every_steps = 8
  return config
