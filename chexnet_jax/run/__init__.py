"""A run directory on disk: its lock (workdir_lock), what it is a run of and its
config (run_dir), the orbax checkpoint writer (checkpoints), what a checkpoint
folder holds (checkpoint_files), reading a run without changing it (run_reader),
a run's weights as a training start (run_weights), a published checkpoint written
as a run (imported) and a run exported as ONNX or safetensors (export).

May import: chexnet_jax.errors, configs, input_pipeline, chexnet_jax.runtime,
chexnet_jax.model.
"""
