"""One H100 (or H200): bfloat16 compute, float32 parameters, batch 256 (Adam 2e-3 by the
default's square-root rule, 1 warmup epoch from 2.5e-4). Batch 256 rather than 128: the
step compiled for an H100 is modelled 10-13% faster per image (14-16% on an H200), and its
11.6 GiB of temporary memory fits either card (benchmarks/RESULTS.md)."""

from configs import default


def get_config():
  config = default.get_config()
  config.dtype = 'bfloat16'
  config.batch_size = 256
  config.eval_batch_size = 512
  config.grain_workers = 12
  return config
