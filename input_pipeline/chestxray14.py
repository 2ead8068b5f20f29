"""NIH ChestX-ray14's dataset: its name, its configs (one per stored size and validation
cut) and its TFDS builder class, input_pipeline.records' builder under NIH's name.

Python:  Chestxray14(data_dir=..., config='256px').as_data_source('test')
CLI:     python -m input_pipeline.build --manual_dir NIH_DIR --data_dir OUT
(The `tfds build` CLI of tfds 4.9.10 imports TensorFlow at start-up, so it cannot
run here; the builder itself, and input_pipeline.build, need no TensorFlow.)
Any '<N>px' (or '<N>px_val<F>_seed<S>') config name works; 224/256/512px are predefined.
"""

import dataclasses
import os
import re

import tensorflow_datasets as tfds

from configs import default as default_config
from input_pipeline import labels as labels_lib
from input_pipeline import records

NAME = 'chestxray14'
DEFAULT_VAL_FRACTION = default_config.VAL_FRACTION
DEFAULT_SPLIT_SEED = default_config.SPLIT_SEED
_NAME = re.compile(r'(\d+)px(?:_val([\d.]+)_seed(\d+))?')


@dataclasses.dataclass(kw_only=True)
class Chestxray14Config(tfds.core.BuilderConfig):
  """One stored image size, plus how train_val is cut into train/validation."""

  image_size: int = 256
  val_fraction: float = DEFAULT_VAL_FRACTION
  split_seed: int = DEFAULT_SPLIT_SEED


def config_name(
  image_size: int, val_fraction: float = DEFAULT_VAL_FRACTION, split_seed: int = DEFAULT_SPLIT_SEED
) -> str:
  """'256px' for the default validation cut, else e.g. '256px_val0.2_seed3': another
  cut is another dataset, in its own directory."""
  if (val_fraction, split_seed) == (DEFAULT_VAL_FRACTION, DEFAULT_SPLIT_SEED):
    return f'{image_size}px'
  return f'{image_size}px_val{val_fraction:g}_seed{split_seed}'


def make_config(
  image_size: int, val_fraction: float = DEFAULT_VAL_FRACTION, split_seed: int = DEFAULT_SPLIT_SEED
) -> Chestxray14Config:
  return Chestxray14Config(
    name=config_name(image_size, val_fraction, split_seed),
    image_size=image_size,
    val_fraction=val_fraction,
    split_seed=split_seed,
    description=f'{image_size}x{image_size} grey uint8, validation {val_fraction:g} of '
    f'train_val patients (seed {split_seed})',
  )


class Chestxray14(records.Records):
  """NIH ChestX-ray14 (Wang et al., CVPR 2017), 14 pathologies, patient-wise splits."""

  name = NAME
  BUILDER_CONFIGS = [make_config(224), make_config(256), make_config(512)]
  DEFAULT_CONFIG_NAME = '256px'
  LABELS, WITH_MASK = labels_lib.LABELS, False
  HOMEPAGE = 'https://nihcc.app.box.com/v/ChestXray-NIHCC'
  CITATION = 'Wang et al., ChestX-ray8, CVPR 2017.'

  def __init__(self, *, config=None, plan: records.Plan | None = None, **kwargs):
    """config: a Chestxray14Config or any '<N>px[_val<F>_seed<S>]' name (default: the
    plan's). plan: what to write (input_pipeline.nih.plan_build)."""
    if config is None and plan is not None:
      config = plan.config_name
    predefined = {c.name for c in self.BUILDER_CONFIGS}  # TFDS wants those by name.
    if isinstance(config, Chestxray14Config) and config.name in predefined:
      config = config.name
    if isinstance(config, str) and config not in predefined and (match := _NAME.fullmatch(config)):
      size, fraction, seed = match.groups()  # Any '<N>px[_val<F>_seed<S>]' is valid.
      config = make_config(
        int(size), float(fraction or DEFAULT_VAL_FRACTION), int(seed or DEFAULT_SPLIT_SEED)
      )
    super().__init__(config=config, plan=plan, **kwargs)


def dataset_dir(
  data_dir: str,
  image_size: int,
  val_fraction: float = DEFAULT_VAL_FRACTION,
  split_seed: int = DEFAULT_SPLIT_SEED,
) -> str:
  """Where a built dataset lives (records, dataset_info.json, split.json)."""
  return records.dataset_dir(data_dir, NAME, config_name(image_size, val_fraction, split_seed))


def split_file(*args) -> str:
  """Path of the split.json written beside a built dataset (dataset_dir's arguments)."""
  return os.path.join(dataset_dir(*args), records.SPLIT_FILE)
