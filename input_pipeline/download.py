"""Downloads NIH ChestX-ray14 (~45 GB), resumably, into a folder `build` reads directly.

  python -m input_pipeline.download --dir NIH_DIR [--only 1 2] [--mirror URL]

Each file goes to NAME.part, resumed with an HTTP Range request after an
interruption, and is renamed to NAME only once its size (and MD5, for the image
tarballs) checks out. The tarballs need not be extracted. NIH serves the CSVs and
split lists only through its web page: fetch those by hand from NIH_PAGE (or give
--mirror, a URL prefix that serves every file by name).
"""

from chexnet_jax import errors

import argparse
import hashlib
import os
import urllib.request

import tqdm

NIH_PAGE = 'https://nihcc.app.box.com/v/ChestXray-NIHCC'
_BOX = 'https://nihcc.box.com/shared/static/'
# NIH's batch_download_zips.py links; MD5s from NIH's published checksum file.
IMAGE_TARBALLS = tuple(
  (f'images_{i + 1:03d}.tar.gz', _BOX + key + '.gz', md5)
  for i, (key, md5) in enumerate(
    (
      ('vfk49d74nhbxq3nqjg0900w5nvkorp5c', 'fe8ed0a6961412fddcbb3603c11b3698'),
      ('i28rlmbvmfjbl8p2n3ril0pptcmcu9d1', 'ab07a2d7cbe6f65ddd97b4ed7bde10bf'),
      ('f1t00wrtdk94satdfb9olcolqx20z2jp', '2301d03bde4c246388bad3876965d574'),
      ('0aowwzs5lhjrceb3qp67ahp0rd1l1etg', '9f1b7f5aae01b13f4bc8e2c44a4b8ef6'),
      ('v5e3goj22zr6h8tzualxfsqlqaygfbsn', '1861f3cd0ef7734df8104f2b0309023b'),
      ('asi7ikud9jwnkrnkj99jnpfkjdes7l6l', '456b53a8b351afd92a35bc41444c58c8'),
      ('jn1b4mw4n6lnh74ovmcjb8y48h8xj07n', '1075121ea20a137b87f290d6a4a5965e'),
      ('tvpxmn7qyrgl0w8wfh9kqfjskv6nmm1j', 'b61f34cec3aa69f295fbb593cbd9d443'),
      ('upyy3ml7qdumlgk2rfcvlb9k6gvqq2pj', '442a3caa61ae9b64e61c561294d1e183'),
      ('l6nilvfa9cg3s28tqv1qc1olm3gnz54p', '09ec81c4c31e32858ad8cf965c494b74'),
      ('hhq8fkdgvcari67vfhs7ppg2w6ni4jze', '499aefc67207a5a97692424cf5dbeed5'),
      ('ioqwiy20ihqwyr8pf4c24eazhh281pbu', 'dc9fda1757c2de0032b63347a7d2895c'),
    )
  )
)
METADATA_FILES = (
  'Data_Entry_2017_v2020.csv',
  'BBox_List_2017.csv',
  'train_val_list.txt',
  'test_list.txt',
)
_CHUNK = 1 << 20


class DownloadError(errors.UserRuntimeError):
  pass


def _md5(path: str) -> str:
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _open_from(url: str, offset: int, timeout: float):
  """Response for bytes [offset, end), and whether the server honoured the Range."""
  request = urllib.request.Request(url, headers={'Range': f'bytes={offset}-'} if offset else {})
  response = urllib.request.urlopen(request, timeout=timeout)
  return response, offset > 0 and response.status == 206


def _total_size(response, offset: int, resumed: bool) -> int | None:
  length = response.headers.get('Content-Length')
  if length is None:
    return None
  return int(length) + (offset if resumed else 0)


def _stream(response, part: str, offset: int, total: int | None, name: str):
  with (
    open(part, 'ab' if offset else 'wb') as f,
    tqdm.tqdm(total=total, initial=offset, unit='B', unit_scale=True, desc=name) as progress,
  ):
    while chunk := response.read(_CHUNK):
      f.write(chunk)
      progress.update(len(chunk))


def _verify(part: str, path: str, total: int | None, md5: str | None):
  size = os.path.getsize(part)
  if total is not None and size != total:
    raise DownloadError(f'{part}: got {size:,} bytes, expected {total:,}; run again to resume')
  if md5 and (actual := _md5(part)) != md5:
    os.remove(part)  # Corrupt: resuming would keep the bad bytes.
    raise DownloadError(f'{path}: MD5 {actual} != expected {md5}; removed, run again')
  os.replace(part, path)


def fetch(url: str, path: str, *, md5: str | None = None, timeout: float = 60) -> str:
  """Downloads url to path via path + '.part', resuming a previous partial download.
  A no-op if path exists. Raises DownloadError on a size or MD5 mismatch."""
  if os.path.exists(path):
    return path
  part = path + '.part'
  offset = os.path.getsize(part) if os.path.exists(part) else 0
  response, resumed = _open_from(url, offset, timeout)
  with response:
    offset = offset if resumed else 0  # Server ignored Range: start over.
    total = _total_size(response, offset, resumed)
    _stream(response, part, offset, total, os.path.basename(path))
  _verify(part, path, total, md5)
  return path


def download_nih(dest: str, *, tarballs=range(1, 13), mirror: str = '') -> list[str]:
  """Fetches the chosen image tarballs (1..12) and, given a mirror, the CSVs and lists.
  Returns the metadata files still missing (to fetch by hand from NIH_PAGE)."""
  os.makedirs(dest, exist_ok=True)
  for name, url, md5 in (IMAGE_TARBALLS[i - 1] for i in tarballs):
    fetch(mirror.rstrip('/') + '/' + name if mirror else url, os.path.join(dest, name), md5=md5)
  for name in METADATA_FILES:
    if mirror:
      fetch(mirror.rstrip('/') + '/' + name, os.path.join(dest, name))
  return [n for n in METADATA_FILES if not os.path.exists(os.path.join(dest, n))]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dir', required=True, help='where to put the files (the manual_dir)')
  p.add_argument(
    '--only',
    type=int,
    nargs='*',
    default=list(range(1, 13)),
    help='tarball numbers to fetch (default: all 12)',
  )
  p.add_argument('--mirror', default='', help='URL prefix serving every file by name')
  args = p.parse_args(argv)
  missing = download_nih(args.dir, tarballs=args.only, mirror=args.mirror)
  if missing:
    print(f'Now download {", ".join(missing)} from {NIH_PAGE} into {args.dir}.')


if __name__ == '__main__':
  main()
