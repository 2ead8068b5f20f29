"""Training: the loop with its guards (train), the state and optimizer
(train_state), the sharded step (train_step), the learning rate at a batch size
(lr_scaling) and every config field checked before anything starts (config_checks).

May import: chexnet_jax.errors, configs, input_pipeline, and every other
subpackage (runtime, model, run, evaluation, report).
"""
