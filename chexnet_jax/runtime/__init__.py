"""How a job runs: joining the processes (distributed), the device mesh (sharding),
what a person reads while it runs (progress, metric_logging) and a lost peer told
in one sentence (stderr_guard).

May import: chexnet_jax.errors, configs, input_pipeline.
"""
