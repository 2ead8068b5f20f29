"""4 nodes x 4 V100 32 GB: per-GPU batch 64 (global 1024). The LR rule is the
default's (square-root scaling: Adam 4e-3, 1 warmup epoch, plateau cuts):
benchmarks/LARGE_BATCH.md."""

from configs import v100x1


def get_config():
  config = v100x1.get_config()
  config.batch_size = 16 * 64
  config.eval_batch_size = 16 * 256
  return config
