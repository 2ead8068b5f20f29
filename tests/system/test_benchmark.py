"""chexnet_jax.benchmark: runs on cpu_smoke and reports consistent numbers.

The run happens in a subprocess where grain, TFDS, clu, array_record (and
tensorboardX, h5py, keras) cannot be imported, as on a bare GPU machine, so
these tests also guard the benchmark's import path.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from chexnet_jax import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs the benchmark module with the GPU machine's missing packages blocked.
BLOCKED_RUNNER = """
import runpy, sys
MISSING = {'grain', 'tensorflow_datasets', 'clu', 'array_record',
           'tensorflow', 'tensorboardX', 'h5py', 'keras'}
class Missing:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in MISSING:
      raise ImportError(f'{name} is not installed on the GPU machine')
sys.meta_path.insert(0, Missing())
sys.path.insert(0, '')
sys.argv = ['benchmark'] + sys.argv[1:]
runpy.run_module('chexnet_jax.benchmark', run_name='__main__')
"""


@pytest.fixture(scope='module')
def smoke_result(tmp_path_factory):
  """(stdout, result dict) of a short benchmark of configs/cpu_smoke.py."""
  out = str(tmp_path_factory.mktemp('benchmark') / 'result.json')
  command = [
    sys.executable,
    '-c',
    BLOCKED_RUNNER,
    '--config',
    'configs/cpu_smoke.py',
    '--config.batch_size=64',
    # Weights that do not exist: the benchmark times random ones, reads nothing.
    '--config.init_from=/nonexistent/densenet121.pth',
    '--steps',
    '3',
    '--warmup',
    '1',
    '--json_out',
    out,
  ]
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  wall_s = time.perf_counter() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(out) as f:
    result = json.load(f)
  result['test_wall_s'] = wall_s
  return proc.stdout, result


def test_prints_reference_table(smoke_result):
  stdout, result = smoke_result
  assert '| images/s | time to train 10 epochs |' in stdout
  assert f'| {result["devices"]} | {result["images_per_s"]:.2f} |' in stdout
  assert 'MFU' in stdout and 'peak device memory | n/a' in stdout


def test_numbers_positive(smoke_result):
  _, r = smoke_result
  for key in (
    'images_per_s',
    'images_per_s_per_device',
    'step_time_median_s',
    'step_time_p10_s',
    'step_time_p90_s',
    'epoch_s',
    'ten_epochs_s',
    'flops_per_step_per_device',
    'compile_s',
  ):
    assert r[key] > 0, key
  assert r['input_time_median_s'] >= 0
  assert r['steps'] == 3


def test_measured_times_fit_in_the_run(smoke_result):
  """The reported times are seconds of this run: compile, warm-up and timed steps
  all happened inside the subprocess's wall time."""
  _, r = smoke_result
  assert r['model'] == 'tiny' and r['global_batch'] == 64  # --config.batch_size=64
  assert r['devices'] == 4 and r['per_device_batch'] == 16
  ran = r['compile_s'] + (1 + r['steps']) * r['step_time_min_s']  # 1 warm-up step.
  assert ran < r['test_wall_s']
  assert r['step_time_min_s'] <= r['step_time_median_s'] <= r['step_time_max_s']


def test_summary_of_known_timings(monkeypatch):
  """Step times 0.5 s (median) at batch 64 on 4 devices, 1e12 FLOPs per step on a
  device that peaks at 4e12 FLOP/s: the numbers worked out by hand."""
  from configs import cpu_smoke

  config = cpu_smoke.get_config()
  config.batch_size = 64
  monkeypatch.setattr(benchmark, 'peak_flops', lambda kind, dtype: 4e12)
  r = benchmark.summarize(
    config, 'random', [0.25, 0.5, 1.0, 0.5, 2.0], [0.01, 0.03, 0.02, 0.02, 0.02], 0.7, 1e12, 3.0
  )
  assert r['steps'] == 5 and r['devices'] == 4 and r['per_device_batch'] == 16
  assert (r['step_time_median_s'], r['step_time_min_s'], r['step_time_max_s']) == (0.5, 0.25, 2.0)
  assert r['input_time_median_s'] == 0.02 and r['host_cpu_s_per_step'] == 0.7
  assert r['images_per_s'] == 128 and r['images_per_s_per_device'] == 32
  assert r['tflops_per_s_per_device'] == 2 and r['mfu'] == 0.5
  assert r['train_examples'] == 77_872
  assert r['epoch_s'] == pytest.approx(608.375)  # 77,872 / 128
  assert r['ten_epochs_s'] == pytest.approx(6083.75)
  assert benchmark.hms(r['ten_epochs_s']) == '1:41:24'


def test_cpu_has_no_peak_or_mfu(smoke_result):
  _, r = smoke_result
  assert r['platform'] == 'cpu'
  assert r['mfu'] is None and r['peak_flops_per_device'] is None
  assert r['peak_memory_bytes'] is None


@pytest.mark.parametrize(
  'kind, dtype, peak',
  [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989e12),
    ('NVIDIA H100 PCIe', 'bfloat16', 756e12),
    ('NVIDIA H200', 'bfloat16', 989e12),
    ('NVIDIA A100-SXM4-80GB', 'float32', 156e12),
    ('Tesla V100-SXM2-16GB', 'float16', 125e12),
    ('Tesla V100-SXM2-16GB', 'bfloat16', None),
    ('cpu', 'float32', None),
  ],
)
def test_peak_flops_by_device_kind(kind, dtype, peak):
  assert benchmark.peak_flops(kind, dtype) == peak


def test_in_flight_throughput_beside_synced_latency(smoke_result):
  """Both timings of the same steps: their ratio is the synced median over the
  in-flight step time, and dispatch is part of the in-flight wall time."""
  stdout, r = smoke_result
  assert r['in_flight_images_per_s'] == pytest.approx(
    r['global_batch'] / r['in_flight_step_time_s']
  )
  assert r['synced_over_in_flight'] == pytest.approx(
    r['step_time_median_s'] / r['in_flight_step_time_s']
  )
  assert 0 < r['dispatch_s_per_step_mean'] <= r['in_flight_step_time_s']
  assert 'images/s, steps in flight' in stdout and 'host dispatch time per step' in stdout


def test_in_flight_fields_by_hand():
  fields = benchmark.in_flight_fields(64, 0.5, (0.25, [0.01, 0.03, 0.02]))
  assert fields['in_flight_images_per_s'] == 256 and fields['synced_over_in_flight'] == 2
  assert fields['dispatch_s_per_step_median'] == 0.02
  assert benchmark.in_flight_fields(64, 0.5, None) == {}


def test_profile_summary_counts_stream_kernels_per_step(tmp_path):
  """A GPU trace: kernels on a stream line count, the 'XLA Ops' line repeating them does not."""
  import gzip

  events = [
    {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
    {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 7, 'args': {'name': 'Stream #13(Compute)'}},
    {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 8, 'args': {'name': 'XLA Ops'}},
    {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
  ]
  for _ in range(2):  # Two steps: a 3 ms convolution, two 0.5 ms fusions.
    events += [
      {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'cudnn_conv', 'dur': 3000},
      {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'loop_add_fusion', 'dur': 500},
      {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'loop_add_fusion', 'dur': 500},
      {'ph': 'X', 'pid': 1, 'tid': 8, 'name': 'fusion.1', 'dur': 4000},
      {'ph': 'X', 'pid': 2, 'tid': 3, 'name': 'PjitFunction', 'dur': 9000},
    ]
  run_dir = tmp_path / 'plugins' / 'profile' / 'run'
  run_dir.mkdir(parents=True)
  with gzip.open(run_dir / 'perfetto_trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)
  p = benchmark.profile_summary(str(tmp_path), steps=2)
  assert p['source'] == 'device' and p['ops_per_step'] == 3
  assert p['busy_s_per_step'] == pytest.approx(4e-3)
  assert [t['name'] for t in p['top']] == ['cudnn_conv', 'loop_add_fusion']
  assert p['top'][0]['share'] == pytest.approx(0.75) and p['top'][1]['calls_per_step'] == 2
  assert 'cudnn_conv | 3.000 | 75.0% | 1 |' in benchmark.format_profile(p)
