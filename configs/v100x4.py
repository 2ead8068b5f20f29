"""One node, 4 V100s: per-GPU batch 64 (global 256); square-root LR scaling (Adam 2e-3)
with 1 warmup epoch (the default's rule: benchmarks/LARGE_BATCH.md)."""

from configs import v100x1


def get_config():
  config = v100x1.get_config()
  config.batch_size = 4 * 64
  config.eval_batch_size = 4 * 256
  return config
