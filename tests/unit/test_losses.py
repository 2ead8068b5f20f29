"""The loss weightings of config.pos_weight, each checked against its formula,
and the validation loss the plateau rule watches."""

import jax
import numpy as np
import pytest

from input_pipeline import labels as labels_lib
from chexnet_jax.evaluation import inference
from chexnet_jax.model import losses
from chexnet_jax.runtime import sharding
from chexnet_jax.training import train_state
from configs import cpu_smoke


def _bce(p, y):
  return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def test_unweighted_is_the_mean_bce_over_labels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 14)).astype(np.float32)
  labels = (rng.random((3, 14)) < 0.3).astype(np.float32)
  p = 1 / (1 + np.exp(-logits))
  np.testing.assert_allclose(losses.bce_loss(logits, labels), _bce(p, labels).mean(-1), rtol=1e-5)


def test_chexnet_paper_weights_are_fractions_of_the_training_set():
  """w+ = |N|/(|P|+|N|), w- = |P|/(|P|+|N|): here P = 1, N = 3 of 4 images."""
  w_pos, w_neg = losses.label_weights('chexnet_paper', [0.25] * 14)
  np.testing.assert_allclose(w_pos, 0.75)
  np.testing.assert_allclose(w_neg, 0.25)
  logits = np.zeros((1, 14), np.float32)
  labels = np.eye(1, 14, dtype=np.float32)  # Label 0 positive, 13 negative.
  got = float(losses.bce_loss(logits, labels, (w_pos, w_neg))[0])
  assert got == pytest.approx(np.log(2) * (0.75 + 13 * 0.25) / 14, rel=1e-6)


def test_negatives_over_positives_is_pytorchs_pos_weight():
  torch = pytest.importorskip('torch')
  fractions = np.linspace(0.02, 0.5, 14)
  w_pos, w_neg = losses.label_weights('negatives_over_positives', fractions)
  np.testing.assert_allclose(w_pos, (1 - fractions) / fractions, rtol=1e-6)
  np.testing.assert_allclose(w_neg, 1.0)
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 14)).astype(np.float32)
  labels = (rng.random((4, 14)) < 0.3).astype(np.float32)
  expected = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(w_pos))(
    torch.tensor(logits), torch.tensor(labels)
  ).item()
  got = float(losses.bce_loss(logits, labels, (w_pos, w_neg)).mean())
  assert got == pytest.approx(expected, rel=1e-5)


def test_the_two_weightings_differ_by_a_per_label_factor():
  fractions = np.linspace(0.02, 0.5, 14)
  paper = losses.label_weights('chexnet_paper', fractions)
  pytorch = losses.label_weights('negatives_over_positives', fractions)
  for a, b in zip(paper, pytorch):
    np.testing.assert_allclose(b / a, 1 / fractions, rtol=1e-5)


def test_none_and_clipping_and_unknown():
  assert losses.label_weights('none', [0.1] * 14) is None
  w_pos, _ = losses.label_weights('negatives_over_positives', [0.0] * 14)
  assert np.all(np.isfinite(w_pos))  # A label never seen is clipped, not inf.
  with pytest.raises(ValueError, match='pos_weight'):
    losses.label_weights('weighted', [0.1] * 14)


def test_validation_loss_uses_the_training_weights(monkeypatch):
  """evaluate_split's 'loss' (the plateau rule's input) is weighted like
  training; 'bce' stays the plain BCE."""
  config = cpu_smoke.get_config()
  config.synthetic_eval_size, config.eval_batch_size = 64, 64
  config.num_classes = len(labels_lib.LABELS)
  mesh = sharding.make_mesh()
  model = train_state.build_model(config)
  variables = train_state.init_variables(config, model, jax.random.key(0))
  weights = losses.label_weights('chexnet_paper', [0.25] * 14)
  names = labels_lib.LABELS
  weighted, *_ = inference.evaluate_split(
    config, names, model, variables, mesh, 'validation', loss_weights=weights
  )
  plain, *_ = inference.evaluate_split(config, names, model, variables, mesh, 'validation')
  assert weighted['bce'] == pytest.approx(plain['loss'], rel=1e-6)
  assert weighted['loss'] < 0.8 * plain['loss']  # Weights below 1 here.
