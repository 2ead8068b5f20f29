"""The training loss: sigmoid cross-entropy over the 14 labels, optionally weighted.

`config.pos_weight` names the weighting, each by what it computes, with P and N
the numbers of positive and negative training images of a label (train split):

- 'none': unweighted BCE. CheXNet's 14-label model: "we modify the loss function
  to optimize the sum of unweighted binary cross entropy losses" (Rajpurkar et al.
  2017, section 3, extension to 14 diseases). We average over labels instead of
  summing: a constant factor of 14, which Adam's normalisation all but removes.
- 'chexnet_paper': the paper's weighted BCE (its pneumonia-only model),
  w+ = |N| / (|P| + |N|) on positives and w- = |P| / (|P| + |N|) on negatives.
- 'negatives_over_positives': PyTorch's BCEWithLogitsLoss(pos_weight=N/P) form:
  positives weighted N/P, negatives 1. Often called "CheXNet's weighted BCE",
  but it is not the paper's formula: it is (P+N)/P times the paper's weights, so
  it also scales the loss, by 1/f for a label with positive fraction f.

The validation loss that drives the plateau rule and the best checkpoint uses
the same weights as training (see inference.evaluate_split), so the schedule
watches the loss the model is trained on.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

POS_WEIGHTS = ('none', 'chexnet_paper', 'negatives_over_positives')


def is_known(labels):
  """Element-wise: whether a label is known. A label below 0 is unknown (e.g.
  CheXpert's uncertain under U-Ignore): left out of the loss and of every number,
  curve and calibration fit of its label. The one statement of the rule (numpy
  or jax arrays alike)."""
  return labels >= 0


def bce_loss(logits, labels, weights=None):
  """Sigmoid cross-entropy averaged over labels; per-example, shape [B].

  `weights`: None, or (w_pos, w_neg), each broadcastable to [C]: the loss of a
  label is -(w_pos * y * log p + w_neg * (1 - y) * log(1 - p)). A label below 0
  is unknown (CheXpert's uncertain under U-Ignore): its term is 0.
  """
  logits = logits.astype(jnp.float32)
  known = is_known(labels)
  labels = jnp.where(known, labels, 0)
  if weights is None:
    losses = optax.sigmoid_binary_cross_entropy(logits, labels)
  else:
    w_pos, w_neg = weights
    losses = -(
      w_pos * labels * jax.nn.log_sigmoid(logits)
      + w_neg * (1 - labels) * jax.nn.log_sigmoid(-logits)
    )
  return jnp.where(known, losses, 0).mean(axis=-1)


def label_weights(pos_weight, positive_fraction):
  """(w_pos, w_neg) float32 [C] arrays for `pos_weight`, or None for 'none'.

  `positive_fraction`: P / (P + N) per label over the train split.
  """
  if pos_weight in ('none', '', None, False):
    return None
  fraction = np.clip(np.asarray(positive_fraction, np.float64), 1e-6, 1 - 1e-6)
  if pos_weight == 'chexnet_paper':
    w_pos, w_neg = 1 - fraction, fraction  # |N|/(|P|+|N|), |P|/(|P|+|N|).
  elif pos_weight == 'negatives_over_positives':
    w_pos, w_neg = (1 - fraction) / fraction, np.ones_like(fraction)
  else:
    raise ValueError(
      f'config.pos_weight={pos_weight!r} is not one of '
      f'{POS_WEIGHTS}; set --config.pos_weight to one of them.'
    )
  return w_pos.astype(np.float32), w_neg.astype(np.float32)
