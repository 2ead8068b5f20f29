"""NIH ChestX-ray14's adapter: its CSVs, split lists and image layouts -> a records plan.

Everything here collects problems instead of stopping at the first one, so a build
can report every offending file and row at once (records.InvalidInputError).
train_val_list.txt's images are cut into train and validation by patient;
test_list.txt's are the test split.
"""

import csv
import dataclasses
import glob
import multiprocessing
import os

import numpy as np
import tqdm

from input_pipeline import chestxray14
from input_pipeline import fingerprints
from input_pipeline import images
from input_pipeline import labels as labels_lib
from input_pipeline import records
from input_pipeline.records import Box, ImageRef, Problem

# NIH's full release; a build checks these unless the user allows a subset.
NIH_COUNTS = {'images': 112_120, 'patients': 30_805, 'train_val': 86_524, 'test': 25_596}
# The label files NIH has published. The 2020 revision is the default because it is
# the one NIH's page serves today (input_pipeline.download fetches it); the original
# 2017 file, which the published CheXNet figures used, is chosen with --label_file.
DATA_ENTRY_NAMES = ('Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv')
DEFAULT_LABEL_FILE = DATA_ENTRY_NAMES[0]
BBOX_NAME = 'BBox_List_2017.csv'
TRAIN_VAL_LIST = 'train_val_list.txt'
TEST_LIST = 'test_list.txt'
# The first seven columns; 2017 says 'Patient Gender', some copies 'Patient Sex'.
_ENTRY_COLUMNS = (
  'Image Index',
  'Finding Labels',
  'Follow-up #',
  'Patient ID',
  'Patient Age',
  ('Patient Gender', 'Patient Sex'),
  'View Position',
)
# csv splits the bracketed names 'OriginalImage[Width,Height]' and
# 'OriginalImagePixelSpacing[x,y]' in two each: 11 fields (the 2017 file adds a
# trailing empty 12th).
_ENTRY_FIELDS = 11


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of Data_Entry_2017*.csv."""

  image_name: str
  finding_labels: str
  follow_up: int
  patient_id: int
  age: int
  sex: str
  view_position: str

  @property
  def labels(self) -> np.ndarray:
    return labels_lib.encode(self.finding_labels)


# ---------------------------------------------------------------- text files


def find_file(manual_dir: str, name: str, required: bool = True) -> str:
  """`name` (or `name.gz`) in manual_dir; '' or MissingInputError if neither is there."""
  for candidate in (name, name + '.gz'):
    path = os.path.join(manual_dir, candidate)
    if os.path.isfile(path):
      return path
  if required:
    raise records.MissingInputError(f'{name} (plain or .gz) is not in {manual_dir}; {_FETCH}')
  return ''


_FETCH = (
  'download it from https://nihcc.app.box.com/v/ChestXray-NIHCC (or `python -m '
  'input_pipeline.download`).'
)


def find_label_file(manual_dir: str, label_file: str) -> str:
  """The chosen Data_Entry CSV; MissingInputError naming --label_file when only the
  other one is there (the build never silently takes another label set)."""
  if path := find_file(manual_dir, label_file, required=False):
    return path
  others = [n for n in DATA_ENTRY_NAMES if n != label_file and find_file(manual_dir, n, False)]
  if not others:
    return find_file(manual_dir, label_file)  # Raises, saying where to get it.
  raise records.MissingInputError(
    f'{label_file} (plain or .gz) is not in {manual_dir}; it has {others[0]}: pass '
    f'--label_file {others[0]} to build from that one, or {_FETCH}'
  )


def _header_problem(path: str, header: list[str]) -> str:
  for i, expected in enumerate(_ENTRY_COLUMNS):
    options = expected if isinstance(expected, tuple) else (expected,)
    if i >= len(header) or header[i].strip() not in options:
      return (
        f'{path} line 1: column {i + 1} should be {" or ".join(options)!r}, '
        f"header is {header}. Is this NIH's Data_Entry_2017(_v2020).csv?"
      )
  return ''


def _parse_age(text: str) -> int:
  # Some copies write ages as '058Y'.
  return int(text[:-1]) if text.endswith('Y') else int(text)


def _parse_entry(row: list[str]) -> Entry:
  """One data-entry row -> Entry; ValueError saying which field is wrong."""
  if len(row) == _ENTRY_FIELDS + 1 and not row[-1].strip():
    row = row[:-1]  # Data_Entry_2017.csv ends every line with a comma.
  if len(row) != _ENTRY_FIELDS:
    raise ValueError(f'expected {_ENTRY_FIELDS} fields, got {len(row)}')
  name, findings, follow_up, patient, age, sex, view = (f.strip() for f in row[:7])
  if why := path_escape(name):
    raise ValueError(f'Image Index {why}')
  if not name.endswith('.png'):
    raise ValueError(f'Image Index {name!r} is not a .png name')
  if sex not in ('M', 'F') or view not in ('PA', 'AP'):
    raise ValueError(f'sex {sex!r} / view position {view!r} not M/F and PA/AP')
  try:
    return Entry(name, findings, int(follow_up), int(patient), _parse_age(age), sex, view)
  except ValueError:
    raise ValueError(
      f'Follow-up # {follow_up!r}, Patient ID {patient!r} and Patient Age {age!r} must be integers'
    ) from None


def read_data_entry(path: str) -> tuple[dict[str, Entry], list[Problem]]:
  """Parses Data_Entry_2017(_v2020).csv(.gz): (entries by image name, problems)."""
  entries, problems = {}, []
  with records.open_text(path) as f:
    rows = csv.reader(f)
    header = next(rows, [])
    if message := _header_problem(path, header):
      return {}, [Problem('', message)]
    for line, row in enumerate(rows, start=2):
      name = row[0].strip() if row else ''
      try:
        entry = _parse_entry(row)
      except ValueError as e:
        problems.append(
          Problem(name, f'{path} line {line} ({name or "no name"}): malformed row: {e}: {row}')
        )
        continue
      if unknown := labels_lib.unknown_labels(entry.finding_labels):
        problems.append(
          Problem(
            name,
            f'{path} line {line} ({name}): unknown label(s) '
            f'{unknown}; known: No Finding, {", ".join(labels_lib.LABELS)}',
          )
        )
      elif name in entries:
        problems.append(Problem(name, f'{path} line {line}: {name} appears twice'))
      else:
        entries[name] = entry
  return entries, problems


def _parse_box(row: list[str]) -> Box:
  if len(row) < 6 or any(f.strip() for f in row[6:]):
    raise ValueError(f'expected 6 fields (name, label, x, y, w, h), got {len(row)}')
  try:
    label = labels_lib.label_index(row[1].strip())
  except KeyError:
    raise ValueError(f'unknown label {row[1]!r}') from None
  return Box(label, tuple(float(v) for v in row[2:6]))


def read_bbox_list(path: str) -> tuple[dict[str, list[Box]], list[Problem]]:
  """Parses BBox_List_2017.csv(.gz): (boxes by image name, problems)."""
  boxes, problems = {}, []
  with records.open_text(path) as f:
    rows = csv.reader(f)
    next(rows, None)  # 'Image Index,Finding Label,Bbox [x,y,w,h],,,'
    for line, row in enumerate(rows, start=2):
      name = row[0].strip() if row else ''
      try:
        boxes.setdefault(name, []).append(_parse_box(row))
      except ValueError as e:
        problems.append(Problem(name, f'{path} line {line} ({name}): malformed box: {e}'))
  return boxes, problems


def path_escape(name: str) -> str:
  """Why `name` is not a bare image file name ('' if it is): NIH's CSV and lists
  name files like 00000001_000.png, never paths (a '../' would point outside the
  image directories)."""
  if name in ('.', '..') or '/' in name or '\\' in name:
    return (
      f'{name!r} is a path, not an image file name: a path escape (NIH names '
      'bare files like 00000001_000.png)'
    )
  return ''


def read_image_list(path: str) -> list[str]:
  """NIH's train_val_list.txt / test_list.txt: one image name per line."""
  with records.open_text(path) as f:
    return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------- images


def _scan_file(path: str) -> list[tuple[str, ImageRef, str]]:
  with open(path, 'rb') as f:
    data = f.read()
  return [(os.path.basename(path), ImageRef(path, '', len(data)), images.problem(data))]


def _scan_tar(path: str) -> list[tuple[str, ImageRef, str]]:
  return [
    (name, ImageRef(path, member, len(data)), images.problem(data))
    for name, member, data in records.iter_tar_images(path)
  ]


def _scan(task: tuple[str, str]):
  kind, path = task
  return _scan_tar(path) if kind == 'tar' else _scan_file(path)


def image_sources(manual_dir: str) -> list[tuple[str, str]]:
  """('file' | 'tar', path) for every PNG and tarball in the layouts NIH users have:
  images/*.png, Kaggle's images_0NN/images/*.png, and images_0NN.tar.gz."""
  files = sorted(
    glob.glob(os.path.join(manual_dir, 'images', '*.png'))
    + glob.glob(os.path.join(manual_dir, 'images_*', 'images', '*.png'))
  )
  tars = sorted(glob.glob(os.path.join(manual_dir, 'images_*.tar.gz')))
  return [('file', p) for p in files] + [('tar', p) for p in tars]


def scan_images(
  manual_dir: str, wanted: set[str], num_workers: int
) -> tuple[dict[str, ImageRef], list[Problem]]:
  """Locates and checks (in parallel) every wanted image: (refs, problems)."""
  refs, problems = {}, []
  sources = image_sources(manual_dir)
  with multiprocessing.Pool(num_workers) as pool:
    results = pool.imap_unordered(_scan, sources, chunksize=16)
    for result in tqdm.tqdm(results, total=len(sources), desc='Checking images', unit='file'):
      for name, ref, problem in result:
        if name not in wanted or name in refs:
          continue
        refs[name] = ref
        if problem:
          problems.append(
            Problem(name, f'{ref.path}{":" + ref.member if ref.member else ""}: {problem}')
          )
  for name in sorted(wanted - refs.keys()):
    problems.append(
      Problem(
        name,
        f'{name}: image not found under {manual_dir} (looked in '
        'images/, images_0NN/images/ and images_0NN.tar.gz)',
      )
    )
  return refs, problems


# ---------------------------------------------------------------- the plan


def count_problems(
  num_rows: int, entries: dict[str, Entry], train_val: list[str], test: list[str]
) -> list[Problem]:
  """Differences from NIH's full release (a partial download or a wrong file)."""
  found = {
    'images': num_rows,
    'patients': len({e.patient_id for e in entries.values()}),
    'train_val': len(train_val),
    'test': len(test),
  }
  return [
    Problem(
      '',
      f"expected {want:,} {key} (NIH's full release), found {found[key]:,}; "
      'pass --allow_subset if you mean to build from part of the data',
    )
    for key, want in NIH_COUNTS.items()
    if found[key] != want
  ]


def list_problems(
  train_val: list[str], test: list[str], entries: dict[str, Entry], bad_rows: set[str] = frozenset()
) -> list[Problem]:
  """Names listed twice, in both lists, or without a data-entry row (those whose row
  is already reported as bad, `bad_rows`, are not reported twice)."""
  problems = []
  for list_name, names in ((TRAIN_VAL_LIST, train_val), (TEST_LIST, test)):
    seen = set()
    for name in names:
      if name in seen:
        problems.append(Problem('', f'{list_name}: {name} listed twice'))
      seen.add(name)
  for name in sorted(set(train_val) & set(test)):
    problems.append(Problem('', f'{name} is in both {TRAIN_VAL_LIST} and {TEST_LIST}'))
  for list_name, names in ((TRAIN_VAL_LIST, train_val), (TEST_LIST, test)):
    for row, name in enumerate(names, start=1):
      if why := path_escape(name):
        problems.append(Problem(name, f'{list_name} entry {row}: {why}'))
      elif name not in entries and name not in bad_rows:
        problems.append(Problem(name, f'{name}: listed but has no valid row in the data-entry CSV'))
  return problems


def _read_metadata_files(manual_dir: str, label_file: str):
  files = {
    'data_entry': find_label_file(manual_dir, label_file),
    'bbox': find_file(manual_dir, BBOX_NAME, required=False),
    'train_val': find_file(manual_dir, TRAIN_VAL_LIST),
    'test': find_file(manual_dir, TEST_LIST),
  }
  entries, problems = read_data_entry(files['data_entry'])
  num_rows = len(entries) + len(problems)
  boxes, box_problems = read_bbox_list(files['bbox']) if files['bbox'] else ({}, [])
  return files, entries, num_rows, boxes, problems + box_problems


def label_file_description(path: str) -> str:
  """'Data_Entry_2017_v2020.csv (NIH's 2020 label revision)' or
  'Data_Entry_2017.csv (the original 2017 labels)'."""
  name = os.path.basename(path)
  revision = "NIH's 2020 label revision" if 'v2020' in name else 'the original 2017 labels'
  return f'{name} ({revision})'


def _row(name: str, entry: Entry, ref: ImageRef, boxes, split: str) -> records.Row:
  return records.Row(
    image=name,
    source=ref,
    patient=entry.patient_id,
    labels=entry.labels,
    split=split,
    boxes=tuple(boxes.get(name, ())),
    age=entry.age,
    sex=entry.sex,
    view=entry.view_position,
    follow_up=entry.follow_up,
  )


def _fingerprint(files, image_size, val_fraction, split_seed, rows) -> str:
  """The inputs a build reads (CSVs, lists, each kept image's name and size) and its
  settings (input_pipeline/fingerprints.py's rule). --allow_subset and --skip_bad
  are left out: what they change shows in the images kept."""
  paths = [files[k] for k in ('data_entry', 'bbox', 'train_val', 'test') if files.get(k)]
  settings = {
    'dataset': chestxray14.NAME,
    'image_size': image_size,
    'val_fraction': val_fraction,
    'split_seed': split_seed,
  }
  sizes = {n: r.source.size for n, r in rows.items()}
  return fingerprints.inputs_fingerprint(paths, settings, sizes)


def plan_build(
  manual_dir: str,
  *,
  image_size: int,
  num_workers: int,
  val_fraction: float = chestxray14.DEFAULT_VAL_FRACTION,
  split_seed: int = chestxray14.DEFAULT_SPLIT_SEED,
  label_file: str = DEFAULT_LABEL_FILE,
  allow_subset: bool = False,
  skip_bad: bool = False,
) -> records.Plan:
  """Reads and checks ALL inputs, then splits; raises InvalidInputError listing every
  problem (MissingInputError for an absent file) before anything is written."""
  if not os.path.isdir(manual_dir):
    raise records.MissingInputError(
      f'--manual_dir {manual_dir} is not a directory; give the folder that holds the NIH '
      'download (python -m input_pipeline.download --dir DIR fetches it).'
    )
  files, entries, num_rows, boxes, problems = _read_metadata_files(manual_dir, label_file)
  train_val = read_image_list(files['train_val'])
  test = read_image_list(files['test'])
  if not allow_subset:
    problems += count_problems(num_rows, entries, train_val, test)
  problems += list_problems(train_val, test, entries, {p.image for p in problems})
  wanted = {n for n in train_val + test if not path_escape(n)}  # Escapes: reported.
  refs, image_problems = scan_images(manual_dir, wanted, num_workers)
  skipped = records.triage(problems + image_problems, skip_bad, manual_dir)
  listed = [(n, '') for n in train_val] + [(n, 'test') for n in test]
  rows = {n: _row(n, entries[n], refs[n], boxes, s) for n, s in listed if n not in skipped}
  splits = records.assign_splits(
    rows,
    split_seed,
    val_fraction,
    0.0,
    where=f'{TRAIN_VAL_LIST} and {TEST_LIST}',
    fix=f'list each patient in one of {TRAIN_VAL_LIST} and {TEST_LIST}',
  )
  return records.Plan(
    kind=chestxray14.NAME,
    name=chestxray14.NAME,
    config_name=chestxray14.config_name(image_size, val_fraction, split_seed),
    image_size=image_size,
    labels=labels_lib.LABELS,
    with_mask=False,
    rows=rows,
    splits=splits,
    split_by='patient',
    settings={
      'val_fraction': val_fraction,
      'split_seed': split_seed,
      'allow_subset': allow_subset,
      'inputs': {k: os.path.basename(v) for k, v in files.items()},
      # Which label file: NIH revised labels in 2020 (Data_Entry_2017_v2020.csv).
      'label_file': label_file_description(files['data_entry']),
      'protocol': f"NIH's official split: {TEST_LIST} is test; {TRAIN_VAL_LIST} is cut by "
      f'patient into train and validation ({val_fraction:g} of its patients, seed {split_seed})',
    },
    skipped=skipped,
    fingerprint=_fingerprint(files, image_size, val_fraction, split_seed, rows),
  )
