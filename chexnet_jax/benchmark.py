"""Train-step throughput of chexnet_jax on the devices at hand.

    python -m chexnet_jax.benchmark --config configs/cpu_smoke.py [--config.field=value ...]
        [--steps 20] [--warmup 3] [--data random|pipeline] [--json_out FILE]

Runs the real train step (train_step.make_train_step: forward, backward, gradient
all-reduce, Adam) on all devices, excludes compilation and `--warmup` steps,
then reports images/s, step time, host input time, peak device memory, MFU and
the time 10 epochs of the official training set would take, in the reference's
table format (GPUs | images/s | time to train 10 epochs).

The steps are timed twice. Synced, one at a time (the table's images/s and MFU):
each step's latency. Then in flight, as the trainer runs them (each loss read
one step late): the loop's throughput, with the host's dispatch time per step
(time in the jitted call; `host_cpu_s_per_step` also counts CUDA's spin-wait).

The weights are random whatever config.init_from says (a step's time does not
depend on them), so nothing is downloaded or read.

`--data random` (default) feeds uint8 batches made once in host memory, so the
numbers are the step's own; it imports no input pipeline. `--data pipeline`
reads `config.dataset` through input_pipeline.pipeline (grain), i.e. real
records when config.dataset='chestxray14'.

Needs only jax, flax, optax and ml_collections (pure Python; benchmarks/device_check.sh
installs it from carried wheels on a machine without network): with
`--data random` nothing imports grain, TFDS or array_record.
"""

import collections
import functools
import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from chexnet_jax.runtime import distributed
from chexnet_jax.run import run_dir
from chexnet_jax.runtime import sharding
from chexnet_jax.training import train_state
from chexnet_jax.training import train_step
from input_pipeline import batching
from input_pipeline import labels as labels_lib

# Training-set size for the epoch estimate: the official train_val list has
# 86,524 images; our validation is ~10% of it, carved by patient, leaving
# round(0.9 * 86,524) = 77,872 (the reference trained on 77,824).
TRAIN_EXAMPLES = 77_872
EPOCHS = 10

# The reference's published throughput (TF 1.12 + Horovod, V100, 256 px, batch 64 per GPU).
REFERENCE_IMAGES_PER_S = {1: 185.12, 2: 315.26, 4: 589.36, 8: 1116.99, 16: 1912.82}

# Peak dense FLOP/s per device from NVIDIA datasheets (no sparsity).
# 'float32' is the rate XLA reaches with its default precision: TF32 tensor
# cores on A100/H100/H200, plain FP32 on V100 (no TF32, no bf16 tensor cores).
# Order matters: the first key found in device_kind wins.
PEAK_FLOPS = (
  ('H200 NVL', {'bfloat16': 835e12, 'float16': 835e12, 'float32': 418e12}),
  ('H200', {'bfloat16': 989e12, 'float16': 989e12, 'float32': 495e12}),
  ('H100 NVL', {'bfloat16': 835e12, 'float16': 835e12, 'float32': 418e12}),
  ('H100 PCIe', {'bfloat16': 756e12, 'float16': 756e12, 'float32': 378e12}),
  ('H100', {'bfloat16': 989e12, 'float16': 989e12, 'float32': 495e12}),
  ('A100', {'bfloat16': 312e12, 'float16': 312e12, 'float32': 156e12}),
  ('V100-PCIE', {'float16': 112e12, 'float32': 14e12}),
  ('V100', {'float16': 125e12, 'float32': 15.7e12}),
)


# -------------------------------------------------------------------- data --


def _label_set(config, data):
  """NIH's 14 for random batches; the dataset's own labels when reading its records."""
  if data != 'pipeline':
    return labels_lib.LABELS
  from input_pipeline import sources  # pylint: disable=g-import-not-at-top  (grain)

  return sources.get_label_names(config)


def random_batches(config, local_batch, count=2, seed=0):
  """`count` host batches of the contract's element spec (uint8 images)."""
  rng = np.random.default_rng(seed)
  size = config.image_size
  return [
    {
      'image': rng.integers(0, 256, (local_batch, size, size, 1), np.uint8),
      'labels': rng.integers(0, 2, (local_batch, config.num_classes)).astype(np.float32),
      'mask': np.ones((local_batch,), bool),
      'index': np.arange(local_batch, dtype=np.int32),
    }
    for _ in range(count)
  ]


def host_batches(config, data, local_batch):
  """Infinite iterator of process-local numpy batches."""
  if data == 'random':
    pool = random_batches(config, local_batch)
    return (pool[i % len(pool)] for i in range(sys.maxsize))
  # Imported here: --data random must run where grain is not installed.
  from input_pipeline import pipeline  # pylint: disable=g-import-not-at-top

  return iter(
    pipeline.create_train_iterator(
      config, process_index=jax.process_index(), process_count=jax.process_count()
    )
  )


def train_examples(config, data):
  """The real training-split size when reading real records, else 77,872."""
  if data == 'pipeline' and config.dataset == 'chestxray14':
    from input_pipeline import sources  # pylint: disable=g-import-not-at-top  (grain)

    return sources.get_dataset_info(config)['splits']['train']
  return TRAIN_EXAMPLES


# ------------------------------------------------------------------ device --


def peak_flops(device_kind, dtype):
  for key, table in PEAK_FLOPS:
    if key.lower() in device_kind.lower():
      return table.get(dtype)
  return None


def peak_memory_bytes(device):
  """Peak bytes in use on `device`, or None where the backend keeps no stats."""
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def step_flops(lowered):
  """FLOPs of one step on one device, from XLA's cost analysis (or None).

  Counted on the lowered (unoptimised) program: after GPU compilation the
  convolutions are cuDNN custom calls, which the compiled module's cost
  analysis counts as zero (it reported 1.1 of DenseNet121's 16.8 GFLOP per
  224 px training image on an H200).
  """
  try:
    cost = lowered.cost_analysis()
  except Exception:  # Not every backend implements it.
    return None
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per module.
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


# ---------------------------------------------------------------- the run --


def build_step(config, mesh, label_names):
  """(state, compiled step fn) for `config`, via the trainer's own functions."""
  model = train_state.build_model(config, for_training=True)
  tx, schedule = train_state.create_optimizer(config, steps_per_epoch=1, total_steps=1_000_000)
  state = train_state.create_train_state(config, model, mesh, tx, label_names)
  step = train_step.StepWithFallback(
    config, lambda config: train_step.make_train_step(config, model, mesh, tx, schedule)
  )
  return state, step


def process_batch(config):
  """This process's share of the global batch, which must split over devices."""
  batching.split_batch(config.batch_size, jax.device_count(), unit='devices')
  return batching.split_batch(config.batch_size, jax.process_count())


def timed_steps(step, state, batches, to_global, steps):
  """Runs `steps` steps; the next batch is fetched while the device computes.

  Step time is completion to completion (one step in flight at a time); input
  time is the host's time in next() + to_global, overlapped with the step.
  Also returns the process's CPU seconds per step (all threads): on a shared
  CPU it is steadier than wall time.
  """
  step_times, input_times = [], []
  if steps < 1:
    return state, step_times, input_times, 0.0
  batch = to_global(next(batches))
  last, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(steps):
    state, metrics = step(state, batch)
    t = time.perf_counter()
    batch = to_global(next(batches))
    input_times.append(time.perf_counter() - t)
    loss = float(jax.block_until_ready(metrics['train_loss']))
    now = time.perf_counter()
    step_times.append(now - last)
    last = now
  if not np.isfinite(loss):
    raise FloatingPointError(f'non-finite training loss {loss}')
  return state, step_times, input_times, (time.process_time() - cpu_start) / steps


def steps_in_flight(step, state, batches, to_global, steps):
  """Runs `steps` steps as the trainer does: each loss is read one step late.

  So the host feeds and dispatches step n+1 while the device still runs step n,
  and the wall time per step is the training loop's throughput, not one step's
  latency. Also returns the host's dispatch time per step (inside the jitted
  call only): what launching costs the host, without CUDA's spin-wait.
  """
  if steps < 1:
    return state, 0.0, []
  dispatch_times, previous = [], None
  start = time.perf_counter()
  for _ in range(steps):
    batch = to_global(next(batches))
    t = time.perf_counter()
    state, metrics = step(state, batch)
    dispatch_times.append(time.perf_counter() - t)
    if previous is not None:
      float(previous)  # The trainer's check of the previous loss: waits for it.
    previous = metrics['train_loss']
  loss = float(jax.block_until_ready(previous))
  wall_s = time.perf_counter() - start
  if not np.isfinite(loss):
    raise FloatingPointError(f'non-finite training loss {loss}')
  return state, wall_s / steps, dispatch_times


# ----------------------------------------------------------------- profile --

PROFILE_STEPS = 5  # Steps traced: enough for a per-step mean, a small trace.
PROFILE_TOP = 15


def profiled_steps(step, state, batches, to_global, profile_dir):
  """Traces PROFILE_STEPS steps in flight -> (state, `profile_summary` of them)."""
  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    state = steps_in_flight(step, state, batches, to_global, PROFILE_STEPS)[0]
  return state, profile_summary(profile_dir, PROFILE_STEPS)


def _trace_events(profile_dir):
  """(process name, event) of each complete event of the newest perfetto trace."""
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top

  paths = glob.glob(os.path.join(profile_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  names = {
    e['pid']: e['args']['name']
    for e in events
    if e.get('ph') == 'M' and e.get('name') == 'process_name'
  }
  threads = {
    (e['pid'], e['tid']): e['args']['name']
    for e in events
    if e.get('ph') == 'M' and e.get('name') == 'thread_name'
  }
  for e in events:
    if e.get('ph') == 'X':
      yield names.get(e['pid'], ''), threads.get((e['pid'], e['tid']), ''), e


def profile_summary(profile_dir, steps):
  """The top ops of a trace per step, and the device's busy time per step.

  GPU kernels where the trace has a device; on a CPU (a rehearsal) the XLA ops
  of the host's compute threads instead (not the Python thread).
  """
  rows = list(_trace_events(profile_dir))
  # A GPU's kernels are on its stream lines; its 'XLA Ops' line repeats them by HLO name.
  on_device = [
    e for process, thread, e in rows if 'device:' in process.lower() and thread.startswith('Stream')
  ]
  source = 'device' if on_device else 'host'
  if not on_device:  # The CPU backend's compute threads, less their executor's own spans.
    on_device = [
      e for _, thread, e in rows if thread.startswith('tf_XLA') and 'ThunkExecutor' not in e['name']
    ]
  durations, counts = collections.Counter(), collections.Counter()
  for e in on_device:
    durations[e['name']] += e.get('dur', 0) * 1e-6
    counts[e['name']] += 1
  busy = sum(durations.values())
  return {
    'source': source,
    'steps': steps,
    'busy_s_per_step': busy / steps,
    'ops_per_step': sum(counts.values()) / steps,
    'top': [
      {
        'name': name,
        's_per_step': seconds / steps,
        'share': seconds / busy,
        'calls_per_step': counts[name] / steps,
      }
      for name, seconds in durations.most_common(PROFILE_TOP)
    ],
  }


def run_benchmark(config, *, steps=20, warmup=3, data='random', profile_dir=''):
  """Benchmarks the train step; returns a dict of plain numbers and strings."""
  label_names = _label_set(config, data)
  config = run_dir.with_label_count(config, label_names)
  # A step takes as long from any weights: never a download (a GPU node may have no
  # network) or a file to read.
  config.init_from = ''
  mesh = sharding.make_mesh()
  batches = host_batches(config, data, process_batch(config))
  to_global = functools.partial(sharding.to_global, mesh=mesh)
  state, step = build_step(config, mesh, label_names)
  t = time.perf_counter()
  lowered = step.compile(state, to_global(next(batches)))
  compile_s = time.perf_counter() - t
  progress(f'compiled in {compile_s:.1f} s')
  # At least the guarded calls run before timing: a failed capture falls back here.
  warmup = max(warmup, train_step.GUARDED_CALLS if config.gpu_command_buffers else 0)
  state = timed_steps(step, state, batches, to_global, warmup)[0]
  progress(f'{warmup} warm-up steps done')
  state, step_times, input_times, cpu_s = timed_steps(step, state, batches, to_global, steps)
  state, *in_flight = steps_in_flight(step, state, batches, to_global, steps)
  result = summarize(
    config, data, step_times, input_times, cpu_s, step_flops(lowered), compile_s, in_flight
  )
  result['gpu_command_buffers'] = step.config.gpu_command_buffers
  result['command_buffer_fallback'] = step.fallback_reason
  if profile_dir:
    result['profile'] = profiled_steps(step, state, batches, to_global, profile_dir)[1]
  return result


def progress(message):
  """A line on stdout at once: a run cut short still shows how far it got."""
  if jax.process_index() == 0:
    print(f'benchmark: {message}', flush=True)


def summarize(config, data, step_times, input_times, cpu_s, flops, compile_s, in_flight=None):
  """Turns the raw timings into the reported numbers.

  `in_flight`: (wall seconds per step, dispatch times) from `steps_in_flight`.
  """
  device = jax.local_devices()[0]
  n_dev = jax.device_count()
  median = statistics.median(step_times)
  images_per_s = config.batch_size / median
  peak = peak_flops(device.device_kind, config.dtype)
  n_train = train_examples(config, data)
  return {
    'model': config.model,
    'image_size': config.image_size,
    'dtype': config.dtype,
    'bn_sync': bool(config.bn_sync),
    'data': data,
    'platform': device.platform,
    'device_kind': device.device_kind,
    'devices': n_dev,
    'processes': jax.process_count(),
    'jax': jax.__version__,
    'global_batch': config.batch_size,
    'per_device_batch': config.batch_size // n_dev,
    'steps': len(step_times),
    'compile_s': compile_s,
    'step_time_median_s': median,
    'step_time_p10_s': float(np.percentile(step_times, 10)),
    'step_time_p90_s': float(np.percentile(step_times, 90)),
    'step_time_min_s': min(step_times),
    'step_time_max_s': max(step_times),
    'input_time_median_s': statistics.median(input_times),
    'host_cpu_s_per_step': cpu_s,
    'images_per_s': images_per_s,
    'images_per_s_per_device': images_per_s / n_dev,
    'peak_memory_bytes': peak_memory_bytes(device),
    'flops_per_step_per_device': flops,
    'tflops_per_s_per_device': flops / median / 1e12 if flops else None,
    'peak_flops_per_device': peak,
    'mfu': flops / median / peak if (flops and peak) else None,
    'train_examples': n_train,
    'epoch_s': n_train / images_per_s,
    'ten_epochs_s': EPOCHS * n_train / images_per_s,
    **in_flight_fields(config.batch_size, median, in_flight),
  }


def in_flight_fields(global_batch, synced_median_s, in_flight):
  """Throughput with steps in flight, beside the synced step's latency."""
  if not in_flight or not in_flight[1]:
    return {}
  step_s, dispatch_times = in_flight
  return {
    'in_flight_step_time_s': step_s,
    'in_flight_images_per_s': global_batch / step_s,
    'dispatch_s_per_step_median': statistics.median(dispatch_times),
    'dispatch_s_per_step_mean': statistics.fmean(dispatch_times),
    # > 1: keeping steps in flight hides per-step host and sync time.
    'synced_over_in_flight': synced_median_s / step_s,
  }


# ------------------------------------------------------------------ output --


def hms(seconds):
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def fmt(value, spec, unit=''):
  return 'n/a' if value is None else f'{value:{spec}}{unit}'


def format_table(r):
  """The reference's table, then the details."""
  gpus = 'GPUs' if r['platform'] == 'gpu' else f'devices ({r["platform"]})'
  ref = REFERENCE_IMAGES_PER_S.get(r['devices'])
  lines = [
    f'chexnet_jax train step: {r["model"]}, {r["image_size"]} px, '
    f'{r["dtype"]}, bn_sync={r["bn_sync"]}, global batch {r["global_batch"]}'
    f' ({r["per_device_batch"]} per device), data={r["data"]}',
    f'{r["devices"]} x {r["device_kind"]}, {r["processes"]} process(es), '
    f'jax {r["jax"]}, {r["steps"]} timed steps after warm-up',
    '',
    f'| {gpus} | images/s | time to train {EPOCHS} epochs |',
    '| --- | --- | --- |',
    f'| {r["devices"]} | {r["images_per_s"]:.2f} | '
    f'{r["ten_epochs_s"]:.1f} s ({hms(r["ten_epochs_s"])}) |',
  ]
  if ref:
    lines.append(
      f'| {r["devices"]} (reference: TF 1.12 + Horovod, V100, '
      f'256 px, batch 64/GPU) | {ref:.2f} | '
      f'{EPOCHS * 77_824 / ref:.1f} s ({EPOCHS} x 77,824 images) |'
    )
  lines += ['', '| metric | value |', '| --- | --- |']
  lines += [f'| {k} | {v} |' for k, v in detail_rows(r)]
  return '\n'.join(lines)


def detail_rows(r):
  mem = r['peak_memory_bytes']
  return [
    ('images/s (global)', f'{r["images_per_s"]:.2f}'),
    ('images/s per device', f'{r["images_per_s_per_device"]:.2f}'),
    ('step time median (s)', f'{r["step_time_median_s"]:.4f}'),
    ('step time p10 / p90 (s)', f'{r["step_time_p10_s"]:.4f} / {r["step_time_p90_s"]:.4f}'),
    ('step time min / max (s)', f'{r["step_time_min_s"]:.4f} / {r["step_time_max_s"]:.4f}'),
    ('host input time per step, median (s)', f'{r["input_time_median_s"]:.4f}'),
    ('host CPU time per step, all threads (s)', f'{r["host_cpu_s_per_step"]:.4f}'),
    ('peak device memory', fmt(mem and mem / 2**30, '.2f', ' GiB')),
    ('FLOPs per step per device (XLA cost analysis)', fmt(r['flops_per_step_per_device'], '.3e')),
    ('achieved TFLOP/s per device', fmt(r['tflops_per_s_per_device'], '.2f')),
    (
      f'MFU vs {r["dtype"]} peak of {r["device_kind"]}',
      fmt(r['mfu'] and 100 * r['mfu'], '.1f', ' %'),
    ),
    ('compile time (s)', f'{r["compile_s"]:.1f}'),
    *in_flight_rows(r),
    (f'one epoch of {r["train_examples"]:,} images', f'{r["epoch_s"]:.1f} s ({hms(r["epoch_s"])})'),
  ]


def format_profile(p):
  lines = [
    f'Profile of {p["steps"]} steps in flight ({p["source"]} ops): busy '
    f'{p["busy_s_per_step"] * 1e3:.2f} ms per step in {p["ops_per_step"]:.0f} ops',
    '',
    '| op | ms per step | share | calls per step |',
    '| --- | --- | --- | --- |',
  ]
  lines += [
    f'| {t["name"][:80]} | {t["s_per_step"] * 1e3:.3f} | {100 * t["share"]:.1f}% | '
    f'{t["calls_per_step"]:.0f} |'
    for t in p['top']
  ]
  return '\n'.join(lines)


def in_flight_rows(r):
  if 'in_flight_step_time_s' not in r:
    return []
  return [
    ('images/s, steps in flight (as the trainer runs them)', f'{r["in_flight_images_per_s"]:.2f}'),
    ('step time, steps in flight (s)', f'{r["in_flight_step_time_s"]:.4f}'),
    ('host dispatch time per step, median (s)', f'{r["dispatch_s_per_step_median"]:.4f}'),
    ('synced step time / in-flight step time', f'{r["synced_over_in_flight"]:.2f}'),
  ]


_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.', lower_bound=0)
_DATA = flags.DEFINE_enum(
  'data',
  'random',
  ['random', 'pipeline'],
  'random: in-memory uint8 batches; pipeline: config.dataset through input_pipeline (grain).',
)
_JSON_OUT = flags.DEFINE_string('json_out', '', 'Also write the result here.')
_PROFILE_DIR = flags.DEFINE_string(
  'profile_dir', '', 'Also trace a few steps here and summarise their top ops.'
)
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file, e.g. configs/h100x1.py.', lock_config=True
)
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  distributed.quiet_backend_probe()
  result = run_benchmark(
    _CONFIG.value,
    steps=_STEPS.value,
    warmup=_WARMUP.value,
    data=_DATA.value,
    profile_dir=_PROFILE_DIR.value,
  )
  if jax.process_index() == 0:
    print(format_table(result), flush=True)
    if 'profile' in result:
      print(format_profile(result['profile']), flush=True)
    if _JSON_OUT.value:
      os.makedirs(os.path.dirname(os.path.abspath(_JSON_OUT.value)), exist_ok=True)
      with open(_JSON_OUT.value, 'w') as f:
        json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
