"""What an evaluation leaves on disk: its files, written whole (eval_outputs), the
figures (figures), the heatmap gallery (gallery) and the self-contained HTML page
(page).

May import: chexnet_jax.errors, configs, input_pipeline, chexnet_jax.runtime,
chexnet_jax.model, chexnet_jax.run, chexnet_jax.evaluation.
"""
