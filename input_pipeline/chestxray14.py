"""TFDS builder for NIH ChestX-ray14: pre-resized grey uint8 records in ArrayRecord.

Python:  Chestxray14(data_dir=..., config='256px', file_format='array_record')
             .download_and_prepare(download_config=tfds.download.DownloadConfig(
                 manual_dir=NIH_DIR))
CLI:     python -m input_pipeline.build --manual_dir NIH_DIR --data_dir OUT
(The `tfds build` CLI of tfds 4.9.10 imports TensorFlow at start-up, so it cannot
run here; the builder itself, and input_pipeline.build, need no TensorFlow.)
Any '<N>px' (or '<N>px_val<F>_seed<S>') config name works; 224/256/512px are predefined.
"""

import dataclasses
import inspect
import itertools
import json
import logging
import multiprocessing
import os
import re

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from configs import default as default_config
from input_pipeline import fingerprints
from input_pipeline import images
from input_pipeline import labels as labels_lib
from input_pipeline import nih

VERSION = '1.0.0'
SPLITS = ('train', 'validation', 'test')
SPLIT_FILE = 'split.json'  # Written beside the records: the exact split used.
# Tasks handed to the pool at once. Pool.imap would drain the whole task generator
# (tarball bytes included) into memory; windows keep memory flat.
_WINDOW = 512


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


class _NoCustomConfigWarning(logging.Filter):
  """Any size but 224/256/512px is a 'custom data configuration' to TFDS,
  which warns about it; here it is the ordinary way to ask for a size."""

  def filter(self, record):
    return not record.getMessage().startswith('Using custom data configuration')


logging.getLogger('absl').addFilter(_NoCustomConfigWarning())


def record_features(size, num_labels, with_label_mask=False):
  """The record of every dataset this project builds (NIH's and users' CSVs)."""
  labels = {'labels': tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8)}
  if with_label_mask:  # 0 where a label is unknown (CheXpert's uncertain under U-Ignore).
    labels['label_mask'] = tfds.features.Tensor(shape=(num_labels,), dtype=np.uint8)
  return tfds.features.FeaturesDict(
    {
      # Raw bytes, no PNG: decoding PNG in the input pipeline is ~45x slower.
      # encoding='bytes': without it TFDS stores uint8 as an int64 list, ~10x
      # slower to parse without TensorFlow.
      'image': tfds.features.Tensor(
        shape=(size, size, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
      ),
      **labels,
      'image_name': tfds.features.Text(),
      'patient_id': tfds.features.Scalar(dtype=np.int32),
      'age': tfds.features.Scalar(dtype=np.int32),
      'sex': tfds.features.Text(),
      'view_position': tfds.features.Text(),
      'follow_up': tfds.features.Scalar(dtype=np.int32),
      # Original x, y, w, h in source pixels; label is an index into the label names.
      'boxes': tfds.features.Sequence(
        {
          'label': tfds.features.Scalar(dtype=np.int32),
          'bbox': tfds.features.Tensor(shape=(4,), dtype=np.float32),
        }
      ),
    }
  )


class Chestxray14(tfds.core.GeneratorBasedBuilder):
  """NIH ChestX-ray14 (Wang et al., CVPR 2017), 14 pathologies, patient-wise splits."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): 'Raw uint8 images, patient-wise validation, boxes.'}
  BUILDER_CONFIGS = [make_config(224), make_config(256), make_config(512)]
  DEFAULT_CONFIG_NAME = '256px'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put NIH's files (https://nihcc.app.box.com/v/ChestXray-NIHCC, or run
  `python -m input_pipeline.download --dir NIH_DIR`) in manual_dir:
  Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv, either may be .gz),
  BBox_List_2017.csv, train_val_list.txt, test_list.txt, and the images as
  images/*.png, images_0NN/images/*.png (Kaggle) or the 12 images_0NN.tar.gz.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS's own lookup needs the `importlib_resources` backport for builders that
    # live in a package; the file path is all it needs (for checksums.tsv).
    return epath.Path(inspect.getfile(cls))

  def __init__(
    self,
    *,
    config=None,
    allow_subset: bool = False,
    skip_bad: bool = False,
    num_workers: int | None = None,
    plan: nih.Plan | None = None,
    **kwargs,
  ):
    """allow_subset: accept fewer images than NIH's full release (the lists name the
    subset). skip_bad: leave bad inputs out (listed in metadata) instead of failing.
    plan: the checked inputs, when the caller already read them (input_pipeline.build
    does, to compare their fingerprint with a dataset already there)."""
    predefined = {c.name for c in self.BUILDER_CONFIGS}  # TFDS wants those by name.
    if isinstance(config, Chestxray14Config) and config.name in predefined:
      config = config.name
    if isinstance(config, str) and config not in predefined and (match := _NAME.fullmatch(config)):
      size, fraction, seed = match.groups()  # Any '<N>px[_val<F>_seed<S>]' is valid.
      config = make_config(
        int(size), float(fraction or DEFAULT_VAL_FRACTION), int(seed or DEFAULT_SPLIT_SEED)
      )
    self._allow_subset, self._skip_bad, self._plan = allow_subset, skip_bad, plan
    self._num_workers = num_workers or os.cpu_count()
    super().__init__(config=config, **kwargs)

  def _log_download_bytes(self):
    # TFDS's line ('Downloading and preparing dataset Unknown size') is wrong
    # here: nothing downloads, the manual_dir is converted.
    print(f'Converting {self.builder_config.name} into {self.data_dir}')

  def _log_download_done(self):
    pass  # input_pipeline.build prints a summary of what it wrote.

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
      features=record_features(size, labels_lib.NUM_CLASSES),
      metadata=tfds.core.MetadataDict(),
      homepage='https://nihcc.app.box.com/v/ChestXray-NIHCC',
      citation='Wang et al., ChestX-ray8, CVPR 2017.',
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    plan = self._plan or nih.plan_build(
      os.fspath(dl_manager.manual_dir),
      val_fraction=cfg.val_fraction,
      split_seed=cfg.split_seed,
      allow_subset=self._allow_subset,
      skip_bad=self._skip_bad,
      num_workers=self._num_workers,
    )
    self._record_split(plan)
    # TFDS cannot write an empty split (e.g. val_fraction=0): such a split is absent.
    return {split: self._generate_examples(plan, split) for split in SPLITS if plan.splits[split]}

  def _record_split(self, plan: nih.Plan):
    """Split and skipped inputs go into metadata.json; image names into split.json
    (self.data_path is TFDS's temporary dir here, so both appear atomically)."""
    cfg = self.builder_config
    patients = {
      s: len({plan.entries[n].patient_id for n in names}) for s, names in plan.splits.items()
    }
    # Positives per label and split: the trainer's weighted BCE reads them.
    positives = {
      s: np.sum([plan.entries[n].labels for n in names], axis=0, dtype=np.int64).tolist()
      for s, names in plan.splits.items()
      if names
    }
    self.info.metadata.update(
      {
        'val_fraction': cfg.val_fraction,
        'split_seed': cfg.split_seed,
        'image_size': cfg.image_size,
        'allow_subset': self._allow_subset,
        'resample': images.RESAMPLE.name,
        'patients': patients,
        'positives': positives,
        'inputs': {k: os.path.basename(v) for k, v in plan.files.items()},
        # Which label file: NIH revised labels in 2020 (Data_Entry_2017_v2020.csv).
        'label_file': label_file_description(plan.files['data_entry']),
        'skipped': plan.skipped,
        'fingerprint': fingerprint(plan, cfg),
      }
    )
    split_record = {
      'val_fraction': cfg.val_fraction,
      'split_seed': cfg.split_seed,
      'by': 'patient',
      'splits': plan.splits,
      'skipped': plan.skipped,
    }
    (self.data_path / SPLIT_FILE).write_text(json.dumps(split_record, indent=1))

  def _generate_examples(self, plan: nih.Plan, split: str):
    names = plan.splits[split]
    size = self.builder_config.image_size
    tasks = _conversion_tasks(plan, names, size)
    with (
      multiprocessing.Pool(self._num_workers) as pool,
      tqdm.tqdm(total=len(names), desc=f'Converting {split}', unit='img') as progress,
    ):
      while window := list(itertools.islice(tasks, _WINDOW)):
        for name, image in pool.imap_unordered(_convert, window, chunksize=4):
          progress.update()
          yield name, _example(plan, name, image)


def fingerprint(plan: nih.Plan, config: Chestxray14Config) -> str:
  """The inputs a build reads (CSVs, lists, each kept image's name and size) and
  its settings; the rule is input_pipeline/fingerprints.py's, shared with the CSV
  builder. --allow_subset and --skip_bad are left out: what they change shows in
  the images kept."""
  files = [plan.files[k] for k in ('data_entry', 'bbox', 'train_val', 'test') if plan.files.get(k)]
  settings = {
    'dataset': 'chestxray14',
    'image_size': config.image_size,
    'val_fraction': config.val_fraction,
    'split_seed': config.split_seed,
  }
  kept = {n for names in plan.splits.values() for n in names}
  return fingerprints.inputs_fingerprint(files, settings, {n: plan.refs[n].size for n in kept})


def label_file_description(path: str) -> str:
  """'Data_Entry_2017_v2020.csv (NIH's 2020 label revision)' or
  'Data_Entry_2017.csv (the original 2017 labels)'."""
  name = os.path.basename(path)
  revision = "NIH's 2020 label revision" if 'v2020' in name else 'the original 2017 labels'
  return f'{name} ({revision})'


def _example(plan: nih.Plan, name: str, image: np.ndarray) -> dict:
  entry = plan.entries[name]
  boxes = plan.boxes.get(name, [])
  return {
    'image': image,
    'labels': entry.labels,
    'image_name': name,
    'patient_id': entry.patient_id,
    'age': entry.age,
    'sex': entry.sex,
    'view_position': entry.view_position,
    'follow_up': entry.follow_up,
    'boxes': {
      'label': np.array([b.label for b in boxes], np.int32),
      'bbox': np.array([b.bbox for b in boxes], np.float32).reshape(-1, 4),
    },
  }


def _conversion_tasks(plan: nih.Plan, names: list[str], size: int):
  """(name, path, bytes, size): files are read by the workers; tarballs are streamed
  once each, here, in bounded windows so memory stays flat."""
  by_tar = {}
  for name in names:
    ref = plan.refs[name]
    if ref.member:
      by_tar.setdefault(ref.path, set()).add(name)
    else:
      yield name, ref.path, b'', size
  for tar_path, tar_names in sorted(by_tar.items()):
    members = ((n, d) for n, _, d in nih.iter_tar_pngs(tar_path) if n in tar_names)
    yield from ((n, '', d, size) for n, d in members)


def _convert(task) -> tuple[str, np.ndarray]:
  name, path, data, size = task
  try:
    if path:
      with open(path, 'rb') as f:
        data = f.read()
    return name, images.decode_and_resize(data, size)
  except Exception as e:
    # Passed the pre-check but fails to decode (e.g. corrupt pixel data): stop
    # the build; TFDS removes its temporary dir, so nothing reads as prepared.
    raise RuntimeError(
      f'{path or name}: cannot decode ({type(e).__name__}: {e}); '
      'the build was aborted and nothing was written.'
    ) from None


def dataset_dir(
  data_dir: str,
  image_size: int,
  val_fraction: float = DEFAULT_VAL_FRACTION,
  split_seed: int = DEFAULT_SPLIT_SEED,
) -> str:
  """Where a built dataset lives (records, dataset_info.json, split.json)."""
  return os.path.join(
    data_dir, 'chestxray14', config_name(image_size, val_fraction, split_seed), VERSION
  )


def split_file(
  data_dir: str,
  image_size: int,
  val_fraction: float = DEFAULT_VAL_FRACTION,
  split_seed: int = DEFAULT_SPLIT_SEED,
) -> str:
  """Path of the split.json written beside a built dataset."""
  return os.path.join(dataset_dir(data_dir, image_size, val_fraction, split_seed), SPLIT_FILE)
