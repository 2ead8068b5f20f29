"""Scoring a split: the jitted forward pass and the masked, exactly-once pass.

Evaluation batches are padded to whole global batches; padding has mask False,
so each example of a split is scored exactly once, on any number of processes.
"""

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from chexnet_jax.model import losses
from chexnet_jax.evaluation import metrics as metrics_lib
from chexnet_jax.model import densenet
from chexnet_jax.model import preprocessing
from chexnet_jax.runtime import sharding
from input_pipeline import pipeline


from input_pipeline import sources


def make_logits_fn(model, dtype=jnp.float32):
  """jitted (variables, uint8 images [B,H,W,1]) -> logits float32 [B, C].

  Shardings follow the inputs: variables replicated, images on 'data'.
  """

  @jax.jit
  def logits(variables, images):
    return model.apply(variables, preprocessing.normalize(images, dtype), train=False).astype(
      jnp.float32
    )

  return logits


def gather_scores(batches, score, mesh):
  """Runs `score(local batch) -> global [B, C]` over padded evaluation batches.

  Returns (scores, labels, indices) of the real examples only, gathered from
  every process and ordered by example index: each example exactly once.
  """
  scores, labels, indices = [], [], []
  for batch in batches:
    rest = sharding.to_global({k: batch[k] for k in ('labels', 'mask', 'index')}, mesh)
    gathered = multihost_utils.process_allgather(
      (score(batch), rest['labels'], rest['mask'], rest['index']), tiled=True
    )
    keep = np.asarray(gathered[2])
    for rows, part in zip((scores, labels, indices), gathered[:2] + gathered[3:]):
      rows.append(np.asarray(part)[keep])
  scores, labels, indices = (np.concatenate(x) for x in (scores, labels, indices))
  order = np.argsort(indices)
  return scores[order], labels[order], indices[order]


def gather_split_scores(config, split, score, mesh, progress=None):
  """gather_scores over this process's share of `split`'s padded eval batches;
  `progress` (an iterator wrapper, e.g. a progress bar) sees every batch."""
  batches = pipeline.create_eval_iterator(
    config,
    split,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    device_count=jax.device_count(),
  )
  if progress is not None:
    batches = progress(batches)
  with sources.reading(config, split):
    return gather_scores(batches, score, mesh)


def evaluate_split(
  config,
  label_names,
  model,
  variables,
  mesh,
  split,
  logits_fn=None,
  loss_weights=None,
  progress=None,
):
  """One masked pass over `split`: every example scored exactly once.

  Returns (metrics, probs, labels, indices) with rows ordered by example index.
  Pass `logits_fn` (from make_logits_fn) to reuse its compilation across calls.
  metrics['loss'] is weighted by `loss_weights` like the training loss (the one
  the plateau rule watches); metrics['bce'] is always unweighted.
  """
  logits_fn = logits_fn or make_logits_fn(model, densenet.DTYPES[config.dtype])
  logits, labels, indices = gather_split_scores(
    config,
    split,
    lambda b: logits_fn(variables, sharding.to_global(b, mesh)['image']),
    mesh,
    progress,
  )
  probs = np.asarray(jax.nn.sigmoid(logits))
  auroc = metrics_lib.auroc_per_label(labels, probs, label_names)
  logits = jnp.asarray(logits)
  result = {
    'loss': float(np.mean(losses.bce_loss(logits, labels, loss_weights))),
    'bce': float(np.mean(losses.bce_loss(logits, labels))),
    'auroc': auroc,
    'mean_auroc': float(np.nanmean(list(auroc.values()))),
  }
  return result, probs, labels, indices
