"""Shared by the Keras parity tests (models, weights)."""

import numpy as np

from chexnet_jax.model import weights


def randomize_keras_weights(model, seed):
  """Random weights everywhere, BN moving statistics included."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if layer.__class__.__name__ == 'BatchNormalization':
      c = layer.gamma.shape[0]
      layer.set_weights(
        [
          rng.uniform(0.5, 1.5, c),
          rng.normal(0, 0.2, c),
          rng.normal(0, 0.2, c),
          rng.uniform(0.5, 1.5, c),
        ]
      )
    elif layer.weights:
      layer.set_weights(
        [rng.normal(0, np.sqrt(2 / np.prod(w.shape[:-1])), w.shape) for w in layer.get_weights()]
      )


def keras_model_to_state_dict(model):
  """torchvision-style state dict from a live Keras DenseNet."""
  layers = [layer.get_weights() for layer in model.layers if layer.weights]
  return weights.keras_layers_to_state_dict(layers, source=f'Keras model {model.name}')
