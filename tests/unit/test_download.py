"""Resumable downloads against a local HTTP server (127.0.0.1, no internet)."""

import hashlib
import http.server
import os
import re
import threading

import pytest

from input_pipeline import download

PAYLOAD = os.urandom(3 * (1 << 20) + 123)  # Spans several read chunks.


class _RangeHandler(http.server.BaseHTTPRequestHandler):
  """Serves PAYLOAD at any path, honouring 'Range: bytes=N-' unless told not to."""

  honour_range = True
  requests = []

  def do_GET(self):  # noqa: N802 (http.server's name)
    match = re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range', ''))
    start = int(match.group(1)) if match and self.honour_range else 0
    type(self).requests.append((self.path, start))
    self.send_response(206 if start else 200)
    if start:
      self.send_header('Content-Range', f'bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}')
    self.send_header('Content-Length', str(len(PAYLOAD) - start))
    self.end_headers()
    self.wfile.write(PAYLOAD[start:])

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  _RangeHandler.requests, _RangeHandler.honour_range = [], True
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _RangeHandler)
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()
  httpd.server_close()


def test_fetch_verifies_and_renames(server, tmp_path):
  path = str(tmp_path / 'images_001.tar.gz')
  download.fetch(server + '/f', path, md5=hashlib.md5(PAYLOAD).hexdigest())
  assert open(path, 'rb').read() == PAYLOAD and not os.path.exists(path + '.part')
  download.fetch(server + '/f', path)  # Present: no request.
  assert len(_RangeHandler.requests) == 1


def test_fetch_resumes_partial_with_range(server, tmp_path):
  path = str(tmp_path / 'f.bin')
  with open(path + '.part', 'wb') as f:
    f.write(PAYLOAD[:1_000_000])
  download.fetch(server + '/f', path, md5=hashlib.md5(PAYLOAD).hexdigest())
  assert _RangeHandler.requests == [('/f', 1_000_000)]
  assert open(path, 'rb').read() == PAYLOAD


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
  _RangeHandler.honour_range = False
  path = str(tmp_path / 'f.bin')
  with open(path + '.part', 'wb') as f:
    f.write(b'stale bytes')
  download.fetch(server + '/f', path)
  assert open(path, 'rb').read() == PAYLOAD


def test_fetch_bad_md5_removes_part(server, tmp_path):
  path = str(tmp_path / 'f.bin')
  with pytest.raises(download.DownloadError, match='MD5'):
    download.fetch(server + '/f', path, md5='0' * 32)
  assert not os.path.exists(path) and not os.path.exists(path + '.part')


def test_download_nih_from_mirror(server, tmp_path, monkeypatch):
  monkeypatch.setattr(
    download,
    'IMAGE_TARBALLS',
    tuple(
      (name, url, hashlib.md5(PAYLOAD).hexdigest()) for name, url, _ in download.IMAGE_TARBALLS
    ),
  )
  missing = download.download_nih(str(tmp_path), tarballs=[2], mirror=server + '/nih/')
  assert missing == []
  assert sorted(os.listdir(tmp_path)) == sorted(['images_002.tar.gz', *download.METADATA_FILES])
  assert ('/nih/images_002.tar.gz', 0) in _RangeHandler.requests


def test_twelve_nih_tarballs():
  assert [n for n, _, _ in download.IMAGE_TARBALLS] == [
    f'images_{i:03d}.tar.gz' for i in range(1, 13)
  ]
  assert all(
    u.startswith('https://nihcc.box.com/shared/static/') and len(m) == 32
    for _, u, m in download.IMAGE_TARBALLS
  )
