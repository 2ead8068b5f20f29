"""Training on a CPU: DenseNet121 on whole images at 128 px, batch 16.

For a dataset built at 128 px (`python -m input_pipeline.build ... --image_size 128`):
the model reads each whole stored image as CheXNet does (augment and
eval_preprocess stay 'resize', the defaults; at the records' own size that is
no resize at all), at a quarter of the pixels of 224 px. Everything else is
configs/default.py's: ImageNet weights, the plateau schedule, 10 epochs.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.dataset_image_size = 128  # Built with --image_size 128.
  config.image_size = 128  # The whole record.
  config.batch_size = 16  # At lr_base_batch_size 64: the LR is scaled to it.
  config.eval_batch_size = 32
  config.log_every_steps = 10
  return config
