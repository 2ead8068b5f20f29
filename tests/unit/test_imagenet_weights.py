"""config.init_from='imagenet': download from a local HTTP server, verify, cache,
refuse a tampered file, say in one sentence what to do without network; and all
of it without PyTorch (the served file is written as torchvision's 2017 files
were, by tests/support/legacy_pth.py, and read by chexnet_jax.model.torch_pickle)."""

import functools
import hashlib
import http.server
import os
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

from chexnet_jax.model import imagenet_weights
from chexnet_jax.model import densenet
from chexnet_jax.model import weights
from tests.support import legacy_pth
from tests.support import runs
from tests.conftest import REPO

SIZE = 32
BLOCKS = (1, 1, 1, 1)


def _torchvision_layout_file(directory):
  """A torchvision-layout DenseNet file with random weights, in the legacy format
  and old 'norm.1' key style of the published densenet121-a639ec97.pth, named
  like it: <model>-<first 8 hex of its sha256>.pth. Returns (path, state dict)."""
  model = densenet.DenseNet(block_sizes=BLOCKS, num_classes=1000)
  import jax  # pylint: disable=g-import-not-at-top

  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)), train=False)
  )
  rng = np.random.default_rng(0)
  state_dict = {}
  for path, leaf in _flatten(variables).items():
    value = rng.normal(size=leaf.shape).astype(np.float32)
    if path[-1] == 'var':
      value = np.abs(value) + 0.5
    state_dict[_torch_key(path, value)] = (
      np.transpose(value, (3, 2, 0, 1))
      if value.ndim == 4
      else value.T
      if path[-1] == 'kernel'
      else value
    )
  old = {
    re.sub(r'(denselayer\d+\.(?:norm|conv))([12])\.', r'\1.\2.', k): v
    for k, v in state_dict.items()
  }
  assert 'features.denseblock1.denselayer1.norm.1.weight' in old
  tmp = os.path.join(directory, 'w.pth')
  legacy_pth.write(tmp, old)
  digest = hashlib.sha256(open(tmp, 'rb').read()).hexdigest()
  path = os.path.join(directory, f'densenet121-{digest[:8]}.pth')
  os.replace(tmp, path)
  return path, state_dict


def _flatten(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _torch_key(path, value):
  kind, *modules, leaf = path
  modules = [m for m in modules]
  module = '.'.join(modules)
  if module != 'classifier':
    module = 'features.' + module
  name = {'mean': 'running_mean', 'var': 'running_var', 'scale': 'weight', 'bias': 'bias'}.get(
    leaf, 'weight'
  )
  del kind, value
  return f'{module}.{name}'


class _Server:
  """Serves `directory` on localhost; counts GET requests."""

  def __init__(self, directory):
    self.requests = 0
    outer = self

    class Handler(http.server.SimpleHTTPRequestHandler):
      def do_GET(self):  # noqa: N802
        outer.requests += 1
        super().do_GET()

      def log_message(self, *args):
        pass

    self._httpd = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(Handler, directory=directory)
    )
    self.port = self._httpd.server_address[1]
    threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

  def url(self, name):
    return f'http://127.0.0.1:{self.port}/{name}'

  def close(self):
    self._httpd.shutdown()
    self._httpd.server_close()


@pytest.fixture
def served(tmp_path):
  served_dir = tmp_path / 'served'
  served_dir.mkdir()
  path, state_dict = _torchvision_layout_file(str(served_dir))
  server = _Server(str(served_dir))
  yield server, os.path.basename(path), state_dict
  server.close()


def _config(url, cache):
  from configs import cpu_smoke  # pylint: disable=g-import-not-at-top

  config = cpu_smoke.get_config()
  config.init_from = 'imagenet'
  config.imagenet_weights_url = url
  config.weights_cache_dir = str(cache)
  return config


def test_downloads_once_verifies_and_loads(served, tmp_path):
  server, name, state_dict = served
  cache = tmp_path / 'cache'
  config = _config(server.url(name), cache)
  path = imagenet_weights.init_path(config)
  assert path == str(cache / name)
  assert imagenet_weights.sha256_of(path).startswith(name[len('densenet121-') : -4])
  assert imagenet_weights.init_path(config) == path  # Cached: no second GET.
  assert server.requests == 1
  assert sorted(os.listdir(cache)) == [name, name + '.lock']  # No partials.
  # The old-style torchvision file loads onto our model; the ImageNet head is
  # dropped, everything else is the file's.
  model = densenet.DenseNet(block_sizes=BLOCKS, num_classes=14)
  import jax  # pylint: disable=g-import-not-at-top

  fresh = model.init(jax.random.key(1), np.zeros((1, SIZE, SIZE, 3)), train=False)
  loaded = weights.load_pretrained(path, fresh)
  np.testing.assert_array_equal(
    loaded['params']['norm5']['scale'], state_dict['features.norm5.weight']
  )
  np.testing.assert_array_equal(
    loaded['batch_stats']['denseblock1']['denselayer1']['norm1']['var'],
    state_dict['features.denseblock1.denselayer1.norm1.running_var'],
  )
  np.testing.assert_array_equal(
    loaded['params']['classifier']['kernel'], fresh['params']['classifier']['kernel']
  )


def test_a_corrupted_cached_file_is_replaced(served, tmp_path):
  server, name, _ = served
  cache = tmp_path / 'cache'
  cache.mkdir()
  (cache / name).write_bytes(b'truncated')
  path = imagenet_weights.init_path(_config(server.url(name), cache))
  assert imagenet_weights.sha256_of(path).startswith(name[len('densenet121-') : -4])
  assert server.requests == 1


def test_tampered_download_is_refused_and_never_kept(served, tmp_path):
  server, name, _ = served
  served_file = tmp_path / 'served' / name
  data = bytearray(served_file.read_bytes())
  data[-100] ^= 0xFF  # One flipped byte.
  served_file.write_bytes(bytes(data))
  cache = tmp_path / 'cache'
  with pytest.raises(
    imagenet_weights.WeightsDownloadError, match=r'not the prefix [0-9a-f]{8} .*tampered'
  ):
    imagenet_weights.init_path(_config(server.url(name), cache))
  assert [f for f in os.listdir(cache) if not f.endswith('.lock')] == []


_closed_port = runs.free_port  # Nothing listens there: a download is refused.


def test_no_network_names_the_url_and_where_to_put_the_file(tmp_path):
  url = f'http://127.0.0.1:{_closed_port()}/densenet121-a639ec97.pth'
  cache = tmp_path / 'cache'
  with pytest.raises(imagenet_weights.WeightsDownloadError) as error:
    imagenet_weights.init_path(_config(url, cache))
  message = str(error.value)
  assert url in message
  assert str(cache / 'densenet121-a639ec97.pth') in message
  assert os.listdir(cache) == ['densenet121-a639ec97.pth.lock']


def test_main_says_it_in_one_sentence_without_traceback(tmp_path):
  url = f'http://127.0.0.1:{_closed_port()}/densenet121-a639ec97.pth'
  result = runs.run_trainer(
    tmp_path / 'run',
    'model=densenet121',
    'init_from=imagenet',
    f'imagenet_weights_url={url}',
    f'weights_cache_dir={tmp_path / "cache"}',
    'num_train_steps=1',
    timeout=300,
  )
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith('error: Could not download ' + url)
  assert 'by hand' in line


def test_concurrent_processes_download_once(served, tmp_path):
  """Four processes (a Slurm node's tasks) ask at once: one GET, one file."""
  server, name, _ = served
  cache = tmp_path / 'cache'
  code = (
    'import sys; from chexnet_jax.model import imagenet_weights as w; '
    'print(w.fetch(sys.argv[1], sys.argv[2]))'
  )
  procs = [
    subprocess.Popen(
      [sys.executable, '-c', code, server.url(name), str(cache)],
      cwd=REPO,
      stdout=subprocess.PIPE,
      text=True,
      env=dict(os.environ, PYTHONPATH=REPO),
    )
    for _ in range(4)
  ]
  outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
  assert all(p.returncode == 0 for p in procs)
  assert set(outputs) == {str(cache / name)}
  assert server.requests == 1


def test_config_checks_for_imagenet():
  from chexnet_jax.training import config_checks  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  assert config.init_from == 'imagenet'
  assert config.imagenet_weights_url.endswith('/densenet121-a639ec97.pth')
  config_checks.validate(config)  # The default passes.
  config.model = 'densenet169'
  with pytest.raises(config_checks.ConfigError, match='not densenet169 weights'):
    config_checks.validate(config)
  config.model, config.imagenet_weights_url = 'densenet121', 'http://x/densenet121.pth'
  with pytest.raises(config_checks.ConfigError, match='no sha256 prefix'):
    config_checks.validate(config)
  config.model = 'tiny'
  with pytest.raises(config_checks.ConfigError, match='has no ImageNet weights'):
    config_checks.validate(config)
  for scratch in ('', 'none'):
    config.init_from = scratch
    config_checks.validate(config)
    assert imagenet_weights.init_path(config) is None


def test_cache_dir_follows_xdg(monkeypatch):
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  monkeypatch.setenv('XDG_CACHE_HOME', '/somewhere')
  assert imagenet_weights.cache_dir(config) == '/somewhere/chexnet_jax'
  monkeypatch.delenv('XDG_CACHE_HOME')
  assert imagenet_weights.cache_dir(config) == os.path.expanduser('~/.cache/chexnet_jax')
  config.weights_cache_dir = '/elsewhere'
  assert imagenet_weights.cache_dir(config) == '/elsewhere'


# Makes `import torch` fail in the subprocess as in a venv without PyTorch (a
# sys.modules['torch'] = None block would also trip scipy's probe for torch).
NO_TORCH = (
  'import sys\n'
  'class NoTorch:\n'
  '  def find_spec(self, name, path=None, target=None):\n'
  "    if name.split('.')[0] == 'torch':\n"
  "      raise ModuleNotFoundError(f'No module named {name!r}')\n"
  'sys.meta_path.insert(0, NoTorch())\n'
)

_LOAD_WITHOUT_TORCH = NO_TORCH + (
  'import numpy as np, jax\n'
  'from chexnet_jax.model import densenet, imagenet_weights, weights\n'
  'from configs import cpu_smoke\n'
  'url, cache, expected = sys.argv[1:]\n'
  'config = cpu_smoke.get_config()\n'
  "config.init_from, config.imagenet_weights_url = 'imagenet', url\n"
  'config.weights_cache_dir = cache\n'
  'path = imagenet_weights.init_path(config)\n'
  f'model = densenet.DenseNet(block_sizes={BLOCKS}, num_classes=14)\n'
  f'fresh = model.init(jax.random.key(1), np.zeros((1, {SIZE}, {SIZE}, 3)), train=False)\n'
  'loaded = weights.load_pretrained(path, fresh)\n'
  'want = np.load(expected)\n'
  "np.testing.assert_array_equal(loaded['params']['norm5']['scale'], want['norm5'])\n"
  "np.testing.assert_array_equal(loaded['params']['conv0']['kernel'], want['conv0'])\n"
  "assert 'torch' not in sys.modules\n"
  "print('loaded', path)\n"
)


def test_the_default_download_and_read_need_no_torch(served, tmp_path):
  """With torch unimportable: download from the local server, verify, read the
  2017-format file and load it onto a DenseNet."""
  server, name, state_dict = served
  expected = tmp_path / 'expected.npz'
  np.savez(
    expected,
    norm5=state_dict['features.norm5.weight'],
    conv0=np.transpose(state_dict['features.conv0.weight'], (2, 3, 1, 0)),  # OIHW -> HWIO.
  )
  cache = tmp_path / 'cache'
  result = subprocess.run(
    [sys.executable, '-c', _LOAD_WITHOUT_TORCH, server.url(name), str(cache), str(expected)],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO),
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == f'loaded {cache / name}'
  assert server.requests == 1


def test_a_weights_file_with_code_is_one_sentence_from_main(tmp_path):
  """Without torch, main refuses a .pth whose pickle names a function: one line."""
  path = tmp_path / 'evil.pth'
  with open(path, 'wb') as f:
    f.write(b'\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.')
  code = NO_TORCH + (
    'from absl import app\nfrom chexnet_jax import main\n'
    'app.run(main.main, flags_parser=main.parse_flags)\n'
  )
  result = runs.run_trainer(
    tmp_path / 'run',
    f'init_from={path}',
    'num_train_steps=1',
    program=code,
    env=dict(os.environ, PYTHONPATH=REPO),
    timeout=300,
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f'error: Refusing to load {path}: its pickle names os.system'), line
