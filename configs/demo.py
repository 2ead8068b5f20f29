"""`make demo`: DenseNet121 on the bundled real NIH sample, CPU, minutes."""

from configs import default


def get_config():
  config = default.get_config()
  config.init_from = ''  # Offline: from scratch.
  config.data_dir = 'data/demo_tfds'
  config.dataset_image_size = 128
  config.image_size = 112
  config.batch_size = 16
  config.eval_batch_size = 32
  config.num_epochs = 3
  config.log_every_steps = 5
  config.checkpoint_every_steps = 50
  return config
