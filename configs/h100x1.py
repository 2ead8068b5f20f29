"""One H100: bfloat16 compute, float32 parameters, larger per-GPU batch."""
from configs import default


def get_config():
  config = default.get_config()
  config.dtype = 'bfloat16'
  config.batch_size = 128
  config.eval_batch_size = 512
  config.grain_workers = 12
  return config
