"""Reading NIH ChestX-ray14 as downloaded: CSVs, split lists, images, patient splits.

Everything here collects problems instead of stopping at the first one, so a build
can report every offending file and row at once (see `InvalidInputError`).
"""

import csv
import dataclasses
import glob
import gzip
import io
import multiprocessing
import os
import tarfile
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image
import tqdm

from input_pipeline import labels as labels_lib

# NIH's full release; a build checks these unless the user allows a subset.
NIH_COUNTS = {'images': 112_120, 'patients': 30_805, 'train_val': 86_524, 'test': 25_596}
DATA_ENTRY_NAMES = ('Data_Entry_2017_v2020.csv', 'Data_Entry_2017.csv')
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
SUPPORTED_MODES = ('L', 'LA', 'RGB', 'RGBA', 'I;16', 'I;16B', 'I;16L', 'I')
_FIX_HINT = (
  'Fix or remove these inputs, or build with --skip_bad to leave them out '
  '(they are then listed in the dataset metadata).'
)


# At most this many problems are listed; the rest are counted (a partial download
# can have 100,000 missing images: a list that long helps no one).
_SHOWN = 20


class InvalidInputError(ValueError):
  """The inputs have problems; the message lists them (the first _SHOWN, then counts)
  and says which ones --skip_bad could leave out."""

  def __init__(self, problems, where):
    problems = list(problems)
    lines = '\n  '.join(str(p) for p in problems[:_SHOWN])
    if len(problems) > _SHOWN:
      lines += f'\n  ... and {len(problems) - _SHOWN:,} more'
    per_image = sum(1 for p in problems if getattr(p, 'image', ''))
    general = len(problems) - per_image
    if general and per_image:
      hint = (
        f'{general} of them concern no single image and must be fixed; the other '
        f'{per_image} can be fixed, or left out with --skip_bad (they are then '
        'counted in the dataset metadata).'
      )
    elif general:
      hint = 'Fix them and build again (--skip_bad cannot leave these out).'
    else:
      hint = _FIX_HINT
    missing = sum(1 for p in problems if 'image not found' in str(p))
    if missing > _SHOWN:
      hint += (
        f' {missing:,} listed images are not on disk: to build from part of the '
        'data, give lists (or a CSV) naming only the images you have.'
      )
    super().__init__(f'{len(problems)} problem(s) in {where}:\n  {lines}\n{hint}')
    self.problems = problems


class Problem(NamedTuple):
  """One bad input. `image` names the image it disqualifies ('' = fatal)."""

  image: str
  message: str

  def __str__(self):
    return self.message


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


@dataclasses.dataclass(frozen=True)
class Box:
  """One row of BBox_List_2017.csv: x, y, w, h in the original 1024 pixels."""

  label: int
  bbox: tuple[float, float, float, float]


class ImageRef(NamedTuple):
  """Where an image lives: a PNG file, or a member of an images_0NN.tar.gz; its
  size in bytes (for the build's fingerprint)."""

  path: str
  member: str = ''
  size: int = 0

  def read(self) -> bytes:
    if not self.member:
      with open(self.path, 'rb') as f:
        return f.read()
    with tarfile.open(self.path, 'r:gz') as tar:  # Slow: tests and one-offs only.
      return tar.extractfile(self.member).read()


# ---------------------------------------------------------------- text files


def _open_text(path: str):
  """Opens a CSV/list as text, gzipped or not (NIH ships plain; copies are gzipped)."""
  if path.endswith('.gz'):
    return io.TextIOWrapper(gzip.open(path), encoding='utf-8', newline='')
  return open(path, encoding='utf-8', newline='')


def find_file(manual_dir: str, names, required: bool = True) -> str:
  """First of `names` (or `name.gz`) in manual_dir; '' or FileNotFoundError if none."""
  for name in names:
    for candidate in (name, name + '.gz'):
      path = os.path.join(manual_dir, candidate)
      if os.path.isfile(path):
        return path
  if required:
    raise FileNotFoundError(
      f'None of {list(names)} (plain or .gz) in {manual_dir}. Download them from '
      'https://nihcc.app.box.com/v/ChestXray-NIHCC (or `python -m '
      'input_pipeline.download`).'
    )
  return ''


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
  with _open_text(path) as f:
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
  with _open_text(path) as f:
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
  with _open_text(path) as f:
    return [line.strip() for line in f if line.strip()]


# ---------------------------------------------------------------- images


def image_problem(data: bytes) -> str:
  """Why these bytes are not a usable X-ray PNG ('' if they are). Cheap: no decode."""
  if not data:
    return 'zero-byte file'
  try:
    with Image.open(io.BytesIO(data)) as image:
      mode = image.mode
      image.verify()  # Walks every chunk and checks CRCs: catches truncation.
  except Exception as e:  # PIL raises several types for broken files.
    return f'unreadable or truncated image ({type(e).__name__}: {e})'
  if mode not in SUPPORTED_MODES:
    return f'unsupported image mode {mode!r} (supported: {SUPPORTED_MODES})'
  return ''


def iter_tar_pngs(tar_path: str) -> Iterator[tuple[str, str, bytes]]:
  """Streams (image name, member name, bytes) from images_0NN.tar.gz, no extraction."""
  with tarfile.open(tar_path, 'r|gz') as tar:
    for member in tar:
      if member.isfile() and member.name.endswith('.png'):
        yield os.path.basename(member.name), member.name, tar.extractfile(member).read()


def _scan_file(path: str) -> list[tuple[str, ImageRef, str]]:
  with open(path, 'rb') as f:
    data = f.read()
  return [(os.path.basename(path), ImageRef(path, '', len(data)), image_problem(data))]


def _scan_tar(path: str) -> list[tuple[str, ImageRef, str]]:
  return [
    (name, ImageRef(path, member, len(data)), image_problem(data))
    for name, member, data in iter_tar_pngs(path)
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


# ---------------------------------------------------------------- splits


def patient_split(
  names: list[str], entries: dict[str, Entry], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
  """Splits train_val names into (train, validation) by patient, reproducibly."""
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
  patients = sorted({entries[n].patient_id for n in names})
  shuffled = np.random.default_rng(seed).permutation(patients)
  # At least one validation patient when asked for any (tiny subsets round to 0).
  num_val = max(round(val_fraction * len(patients)), int(val_fraction > 0 and len(patients) > 1))
  val_patients = set(shuffled[:num_val].tolist())
  validation = [n for n in names if entries[n].patient_id in val_patients]
  train = [n for n in names if entries[n].patient_id not in val_patients]
  return train, validation


def assert_no_patient_overlap(splits: dict[str, list[str]], entries: dict[str, Entry]):
  """Raises if any patient has images in two splits (that would leak labels)."""
  patients = {s: {entries[n].patient_id for n in names} for s, names in splits.items()}
  split_names = sorted(patients)
  for i, a in enumerate(split_names):
    for b in split_names[i + 1 :]:
      shared = patients[a] & patients[b]
      if shared:
        raise AssertionError(
          f'{len(shared)} patient(s) in both {a} and {b}, e.g. '
          f'{sorted(shared)[:10]}; the split must be by patient.'
        )


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


def _remove_names(names: list[str], bad: set[str]) -> list[str]:
  return [n for n in names if n not in bad]


def _split_problems(problems: list[Problem], skip_bad: bool, where: str) -> dict[str, str]:
  """Raises on fatal problems (or any, unless skip_bad); returns skipped name -> why."""
  fatal = [p for p in problems if not p.image or not skip_bad]
  if fatal:
    raise InvalidInputError(fatal if skip_bad else problems, where)
  skipped = {}
  for p in problems:
    skipped.setdefault(p.image, p.message)
  return skipped


@dataclasses.dataclass
class Plan:
  """What a build will write: split -> image names, and where everything is."""

  splits: dict[str, list[str]]
  entries: dict[str, Entry]
  boxes: dict[str, list[Box]]
  refs: dict[str, ImageRef]
  skipped: dict[str, str]  # Image name -> why it was left out (--skip_bad).
  files: dict[str, str]


def _read_metadata_files(manual_dir: str):
  files = {
    'data_entry': find_file(manual_dir, DATA_ENTRY_NAMES),
    'bbox': find_file(manual_dir, (BBOX_NAME,), required=False),
    'train_val': find_file(manual_dir, (TRAIN_VAL_LIST,)),
    'test': find_file(manual_dir, (TEST_LIST,)),
  }
  entries, problems = read_data_entry(files['data_entry'])
  num_rows = len(entries) + len(problems)
  boxes, box_problems = read_bbox_list(files['bbox']) if files['bbox'] else ({}, [])
  return files, entries, num_rows, boxes, problems + box_problems


def plan_build(
  manual_dir: str,
  *,
  val_fraction: float,
  split_seed: int,
  allow_subset: bool,
  skip_bad: bool,
  num_workers: int,
) -> Plan:
  """Reads and checks ALL inputs, then splits; raises InvalidInputError listing every
  problem before anything is written."""
  files, entries, num_rows, boxes, problems = _read_metadata_files(manual_dir)
  train_val = read_image_list(files['train_val'])
  test = read_image_list(files['test'])
  if not allow_subset:
    problems += count_problems(num_rows, entries, train_val, test)
  problems += list_problems(train_val, test, entries, {p.image for p in problems})
  wanted = {n for n in train_val + test if not path_escape(n)}  # Escapes: reported.
  refs, image_problems = scan_images(manual_dir, wanted, num_workers)
  skipped = _split_problems(problems + image_problems, skip_bad, manual_dir)
  bad = set(skipped)
  train_val, test = _remove_names(train_val, bad), _remove_names(test, bad)
  train, validation = patient_split(train_val, entries, val_fraction, split_seed)
  splits = {'train': train, 'validation': validation, 'test': test}
  try:
    assert_no_patient_overlap(splits, entries)
  except AssertionError as e:  # Lists that put a patient in two splits: one error.
    raise InvalidInputError(
      [Problem('', f'{TRAIN_VAL_LIST} and {TEST_LIST}: {e}')], manual_dir
    ) from None
  boxes = {n: b for n, b in boxes.items() if n in refs}
  return Plan(splits, entries, boxes, refs, skipped, files)
