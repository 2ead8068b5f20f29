"""One H100 (or H200): bfloat16 compute, float32 parameters, batch 128 (Adam 1.41e-3 by
the default's square-root rule, 1 warmup epoch)."""

from configs import default


def get_config():
  config = default.get_config()
  config.dtype = 'bfloat16'
  config.batch_size = 128
  config.eval_batch_size = 512
  config.grain_workers = 12
  return config
