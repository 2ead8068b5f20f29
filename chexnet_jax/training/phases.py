"""The line before each long phase of training: opening the dataset, building the
state, compiling the step, validating; each says what it is doing and, where it
takes minutes (a DenseNet on a CPU), that it will.
"""

import os

import jax

from chexnet_jax.runtime import console

# What compiling costs, where it is long enough to look like a hang (the
# DenseNets on a CPU: about a minute for the initialiser, minutes for a step).
_SLOW_TO_COMPILE = ('densenet121', 'densenet169', 'densenet201')


def dataset_phase(config):
  """The line before the dataset's files are opened (synthetic data has none)."""
  if config.dataset != 'synthetic':
    console.phase('Opening dataset %r in %s...', config.dataset, config.data_dir, stacklevel=3)


def is_slow_to_compile(config):
  return config.model in _SLOW_TO_COMPILE and jax.default_backend() == 'cpu'


def state_phase(config):
  """The line before the train state is built: where its weights come from
  and, for a DenseNet on a CPU, that compiling the initialiser takes a while."""
  init_from = config.init_from or 'none'
  source = {
    'imagenet': 'ImageNet weights',
    'none': 'random weights',
  }.get(init_from.lower(), f'the weights in {init_from}')
  if os.path.isdir(init_from):  # A trained run (run_weights.py).
    source = f'the best checkpoint of the run in {init_from}'
  slow = '; compiling its initialiser takes about a minute on a CPU' * is_slow_to_compile(config)
  console.phase('Building the train state (%s, %s)%s...', config.model, source, slow, stacklevel=3)


def compile_phase(config, step):
  """The line before the first (compiling) train step."""
  slow = '; a DenseNet on a CPU takes minutes' * is_slow_to_compile(config)
  console.phase('Compiling the train step (first step, %d)%s...', step + 1, slow, stacklevel=3)


def validation_phase(step, num_examples, eval_batch_size, first):
  """The line before each validation pass, with its size; the first pass also
  compiles the evaluation step."""
  batches = -(-num_examples // eval_batch_size)
  console.phase(
    'step %d: validating on %d images (%d batch%s of %d)%s...',
    step,
    num_examples,
    batches,
    '' if batches == 1 else 'es',
    eval_batch_size,
    '; the first pass compiles the evaluation step' if first else '',
    stacklevel=3,
  )
