"""4 nodes x 4 V100 32 GB: per-GPU batch 64 (global 1024), large-batch recipe
(linear LR scaling, 1 warmup epoch, cosine decay)."""
from configs import v100x1


def get_config():
  config = v100x1.get_config()
  config.batch_size = 16 * 64
  config.eval_batch_size = 16 * 256
  config.lr_schedule = 'warmup_cosine'
  config.warmup_epochs = 1.0
  return config
