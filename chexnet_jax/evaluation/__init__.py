"""Scoring a split of a run: the masked exactly-once forward pass (inference), the
Evaluation it makes (scoring), per-label metrics with intervals (metrics),
calibration, test-time augmentation (tta), class activation maps and box
geometry (cam), localisation and the gallery's maps (localization), and the
per-label columns declared once (label_columns). Numbers only: report/ writes them.

May import: chexnet_jax.errors, configs, input_pipeline, chexnet_jax.runtime,
chexnet_jax.model, chexnet_jax.run.
"""
