"""One V100: CheXNet's recipe at the reference's per-GPU batch (64, Adam 1e-3),
float16 with dynamic loss scaling (V100 lacks bfloat16)."""

from configs import default


def get_config():
  config = default.get_config()
  config.dtype = 'float16'
  config.batch_size = 64
  config.eval_batch_size = 256
  config.grain_workers = 8
  return config
