"""The train step compiled for an H100 (sm_90) on a machine without a GPU: what it launches.

    make compile-report     # installs the CUDA plugin of the installed jax, writes the rows
    python -m benchmarks.compile_report --config configs/h100x1.py [--batch 128]
        [--devices 4 | --topology 1x4x4] [--name LABEL] [--config.field=value ...]

XLA compiles for a GPU it cannot see when given the GPU's description
(benchmarks/h100_sxm_cuda13.txtpb) and the CUDA plugin of the installed jax's
version (on PYTHONPATH, never in the project's environment; ptxas from a CUDA 13
toolkit on PATH). The real `train_step.make_train_step` is lowered on shapes
only and compiled; the dumped program then says per step:
- launches: kernels, cuDNN convolutions and copies (its thunk sequence);
- host launches: what the host still issues once XLA has put runs of launches
  into command buffers (CUDA graphs), and the command buffers among them;
- kernels under 32 blocks (a 132-SM chip left mostly idle) and single-block ones;
- temp and argument memory (XLA's memory analysis);
- operand + output bytes of every launch (no cache reuse: an upper bound on DRAM
  traffic), and the time that traffic takes at COPY_BANDWIDTH;
- with K > 1 devices, the all-reduces and their bytes;
- a MODELLED step time and images/s per device on an H100 SXM and an H200, optimistic
  and pessimistic, with a per-class breakdown (benchmarks/time_model.py: the compiled
  program times datasheet rates; a model, never a measurement).
`--batch` is per device; the global batch is K times it. Each run adds (or
replaces, by name, batch and devices) one row of benchmarks/results/compile_report.json.
"""

import collections
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET_FILE = os.path.join(HERE, 'h100_sxm_cuda13.txtpb')
RESULTS_FILE = os.path.join(HERE, 'results', 'compile_report.json')
# Device-to-device copy rate measured on an H200 (jnp copy of 1 GiB buffers);
# the H100 SXM's datasheet figure is 3.35 TB/s.
COPY_BANDWIDTH = 4.3e12
SMALL_GRID = 32  # Blocks: below this a kernel leaves most of 132 SMs idle.
# Compile faster; the program's launches and buffers do not change.
FAST_COMPILE_FLAGS = (
  '--xla_llvm_disable_expensive_passes=true --xla_gpu_disable_gpuasm_optimizations=true'
)
TARGETS = {'launches_per_step': 1000, 'host_launches_per_step': 10}
USER_XLA_FLAGS = ''  # The caller's XLA_FLAGS (e.g. a combiner threshold), kept in each row.

DTYPE_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  's16': 2,
  'u16': 2,
  'f16': 2,
  'bf16': 2,
  's32': 4,
  'u32': 4,
  'f32': 4,
  's64': 8,
  'u64': 8,
  'f64': 8,
}
_SHAPE = re.compile(r'\b(' + '|'.join(DTYPE_BYTES) + r')\[([\d,]*)\]')
# `%name = SHAPE opcode(operands), attributes`; SHAPE may be a tuple.
_INSTRUCTION = re.compile(
  r'^\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\w+\[[\d,]*\](?:\{[^}]*\})?|\w+\[\]) ([a-z][\w\-]*)\((.*)$'
)
_COMPUTATION = re.compile(r'^(ENTRY )?%([\w.\-]+) \(.*\{\s*$')
_THUNK = re.compile(r'^(\s*)\d+: (\w+)')
_GRID = re.compile(r'grid: \[(\d+), (\d+), (\d+)\]')
# Thunks that group others or wait for them: not launches themselves (an async
# all-reduce is a kAsyncStart holding a kAllReduce, then a kAsyncDone).
_GROUPS = {'kCommandBuffer', 'kSequential', 'kWhile', 'kConditional', 'kAsyncStart', 'kAsyncDone'}


# ------------------------------------------------------------ HLO counting --


def shape_bytes(shape):
  """Bytes of an HLO shape string, tuples summed: 'bf16[2,3]' -> 12."""
  total = 0
  for dtype, dims in _SHAPE.findall(shape):
    count = 1
    for dim in filter(None, dims.split(',')):
      count *= int(dim)
    total += count * DTYPE_BYTES[dtype]
  return total


def computations(hlo_text):
  """{name: [(name, shape, opcode, rest of line)]} of every computation; ENTRY's is 'ENTRY'."""
  found, current = {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = found.setdefault('ENTRY' if header.group(1) else header.group(2), [])
      continue
    match = _INSTRUCTION.match(line) if current is not None else None
    if match:
      current.append(match.groups())
  return found


def entry_instructions(hlo_text):
  """(name, shape, opcode, rest of line) of each instruction of the ENTRY computation."""
  return computations(hlo_text)['ENTRY']


def _sliced_reads(body):
  """{parameter number: bytes} for a fused computation's parameters used only by slices.

  Such a kernel reads the slices of its operand, not all of it (a flat optimizer
  state sliced back into parameters; the gradient of a concatenation).
  """
  reads = {}
  for name, _, opcode, rest in body:
    if opcode != 'parameter':
      continue
    users = [(shape, op) for _, shape, op, args in body if name in _operands(args)]
    if users and all(op in ('slice', 'dynamic-slice') for _, op in users):
      reads[int(re.match(r'(\d+)', rest).group(1))] = sum(shape_bytes(s) for s, _ in users)
  return reads


def _operands(rest):
  """Operand names of an instruction: the %names before its attributes."""
  return [name for name, _ in _operand_refs(rest)]


# An operand: `%name`, or `%name#k` (jax 0.11's HLO text: element k of a tuple-shaped
# instruction, where 0.10 used a get-tuple-element instruction of its own).
_OPERAND = re.compile(r'%([\w.\-]+)(?:#(\d+))?')


def _operand_refs(rest):
  """(name, tuple element or None) of each operand of an instruction."""
  head = rest.split('), ')[0]
  return [(name, int(k) if k else None) for name, k in _OPERAND.findall(head)]


def tuple_elements(shape):
  """The top-level element shapes of an HLO tuple shape; [shape] for an array."""
  if not shape.startswith('('):
    return [shape]
  elements, depth, start = [], 0, 1
  for i, char in enumerate(shape):
    if char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    elif char == ',' and depth == 1:
      elements.append(shape[start:i].strip())
      start = i + 1
  elements.append(shape[start : shape.rindex(')')].strip())
  return [e for e in elements if e]


def operand_shapes(rest, shapes):
  """The shape each operand reads: a `#k` operand only its tuple element k."""
  found = []
  for name, k in _operand_refs(rest):
    shape = shapes.get(name, '')
    if k is not None:
      elements = tuple_elements(shape)
      shape = elements[k] if k < len(elements) else shape
    found.append(shape)
  return found


def _elements(shape):
  """Elements of the largest array in an HLO shape string."""
  counts = [1]
  for _, dims in _SHAPE.findall(shape):
    count = 1
    for dim in filter(None, dims.split(',')):
      count *= int(dim)
    counts.append(count)
  return max(counts)


def _elementwise_reads(reads, operand_shapes, out_shape):
  """A loop fusion ending in slices reads at most one element of an operand per output.

  XLA fuses the update of a flat vector with the slice that takes one parameter
  out of it: each such kernel touches only that parameter's part of the vector.
  """
  outputs = _elements(out_shape)
  capped = []
  for read, shape in zip(reads, operand_shapes):
    itemsize = shape_bytes(shape) / max(_elements(shape), 1)
    capped.append(min(read, int(outputs * itemsize)))
  return capped


def _is_launch(opcode):
  return opcode in ('fusion', 'custom-call', 'copy', 'all-reduce') or opcode.endswith('-start')


def launch_class(opcode, rest):
  """What a launch is for: from its kind, its operands and its source (op_name)."""
  if opcode == 'copy':
    return 'copy'
  if opcode == 'custom-call':
    return 'convolution' if 'conv' in rest.split('custom_call_target=')[-1][:40] else 'custom call'
  if opcode.startswith('all-reduce'):
    return 'all-reduce'
  if any('opt_state' in operand for operand in _operands(rest)):
    return 'optimizer'
  op_name = re.search(r'op_name="([^"]*)"', rest)
  op_name = op_name.group(1) if op_name else ''
  if re.search(r'/norm\d*/', op_name):
    return 'batchnorm'
  return 'model (other)' if 'DenseNet' in op_name else 'step (loss, update, other)'


def hlo_counts(hlo_text):
  """What the optimized ENTRY launches, and the bytes its launches touch.

  `traffic_bytes` is each launch's operands + outputs: no reuse through the
  cache, so an upper bound; a slice fusion reads only the region it writes, and
  a fusion that only slices an operand reads only those slices.
  """
  bodies = computations(hlo_text)
  rows = bodies['ENTRY']
  shapes = {name: shape for name, shape, _, _ in rows}
  counts, classes = collections.Counter(), collections.Counter()
  all_reduce_bytes, traffic = [], 0
  for name, shape, opcode, rest in rows:
    if not _is_launch(opcode):
      continue
    traffic += launch_bytes(bodies, shapes, name, shape, opcode, rest)
    classes[launch_class(opcode, rest)] += 1
    if opcode == 'custom-call':
      target = re.search(r'custom_call_target="([^"]+)"', rest)
      target = target.group(1) if target else ''
      counts['convolutions' if 'conv' in target else 'custom_calls'] += 1
    elif opcode in ('all-reduce-start', 'all-reduce'):
      counts['all_reduces'] += 1
      all_reduce_bytes.append(shape_bytes(shape))
    else:
      counts[{'fusion': 'fusions', 'copy': 'copies'}.get(opcode, opcode)] += 1
  return {
    'counts': dict(counts),
    'classes': dict(classes),
    'all_reduce_bytes': sorted(all_reduce_bytes),
    'traffic_bytes': traffic,
  }


def launch_bytes(bodies, shapes, name, shape, opcode, rest):
  """Operand + output bytes of one launch of the ENTRY computation (no cache reuse)."""
  written = shape_bytes(shape)
  read_shapes = operand_shapes(rest, shapes)
  operands = [shape_bytes(s) for s in read_shapes]
  if opcode == 'fusion':
    called = re.search(r'calls=%([\w.\-]+)', rest)
    body = bodies.get(called.group(1), []) if called else []
    sliced = _sliced_reads(body)
    operands = [sliced.get(k, size) for k, size in enumerate(operands)]
    if 'kind=kLoop' in rest and any(op == 'slice' for _, _, op, _ in body):
      operands = _elementwise_reads(operands, read_shapes, shape)
  read = sum(operands)
  if opcode == 'fusion' and re.match(r'(loop|wrapped)_slice', name):
    read = min(read, written)
  return read + written


def thunk_counts(thunk_text):
  """Launches per step from XLA's thunk sequence (after its command-buffer pass).

  Top-level thunks are what the host issues; a command buffer replays the
  thunks nested under it as one CUDA graph.
  """
  host, launches, grids = collections.Counter(), collections.Counter(), []
  for line in thunk_text.splitlines():
    match = _THUNK.match(line)
    if not match:
      continue
    indent, kind = match.groups()
    if not indent:
      host[kind] += 1
    if kind in _GROUPS:
      continue
    launches[kind] += 1
    grid = _GRID.search(line)
    if grid:
      x, y, z = map(int, grid.groups())
      grids.append(x * y * z)
  return {
    'host_launches': sum(host.values()),
    'host_launch_kinds': dict(host),
    'command_buffers': host.get('kCommandBuffer', 0),
    'launches': sum(launches.values()),
    'launch_kinds': dict(launches),
    'kernels_under_32_blocks': sum(blocks < SMALL_GRID for blocks in grids),
    'kernels_one_block': sum(blocks == 1 for blocks in grids),
  }


def summarize_bytes(values):
  if not values:
    return {'count': 0, 'total': 0}
  return {
    'count': len(values),
    'total': sum(values),
    'median': values[len(values) // 2],
    'largest': values[-1],
  }


# ----------------------------------------------------------------- compile --


def _check_plugin():
  """The CUDA plugin of this jax's version, or one sentence on how to get it."""
  import jax  # pylint: disable=g-import-not-at-top

  if importlib.util.find_spec('jax_plugins.xla_cuda13') is None:
    sys.exit(
      f'compile_report: the CUDA plugin is not importable; run `make compile-report`, or '
      f'pip install --target DIR --no-deps jax-cuda13-plugin=={jax.__version__} '
      f'jax-cuda13-pjrt=={jax.__version__} and put DIR on PYTHONPATH.'
    )
  if shutil.which('ptxas') is None:
    sys.exit('compile_report: no ptxas on PATH; put a CUDA 13 toolkit bin/ directory on PATH.')


def _report_config(config, per_device_batch, devices):
  from chexnet_jax.run import run_dir  # pylint: disable=g-import-not-at-top
  from input_pipeline import labels as labels_lib  # pylint: disable=g-import-not-at-top

  config = run_dir.with_label_count(config, labels_lib.LABELS)  # Random labels: NIH's 14.
  config.init_from = ''  # Shapes only: no weights are read.
  config.batch_size = per_device_batch * devices
  return config


def compile_step(config, topology, dump_dir):
  """Compiles the train step for `topology` -> (compiled, seconds to lower, to compile)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  from chexnet_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  from chexnet_jax.training import train_state  # pylint: disable=g-import-not-at-top
  from chexnet_jax.training import train_step  # pylint: disable=g-import-not-at-top

  with open(TARGET_FILE) as f:
    target = f.read()
  topo = topologies.get_topology_desc(platform='cuda', target_config=target, topology=topology)
  mesh = topologies.make_mesh(
    topo=topo, mesh_shape=(len(topo.devices),), axis_names=(sharding.DATA_AXIS,)
  )
  model = train_state.build_model(config, for_training=True)
  tx, schedule = train_state.create_optimizer(config, steps_per_epoch=1, total_steps=1_000_000)
  state = train_state.abstract_train_state(config, model, mesh, tx)
  on_data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.DATA_AXIS))
  batch = {
    key: jax.ShapeDtypeStruct(shape, dtype, sharding=on_data)
    for key, (shape, dtype) in batch_shapes(config).items()
  }
  step = train_step.make_train_step(config, model, mesh, tx, schedule)
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lowered_at - start, time.perf_counter() - lowered_at


def batch_shapes(config):
  """The input contract's element spec at the global batch (chexnet_jax.benchmark's)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  batch, size = config.batch_size, config.image_size
  return {
    'image': ((batch, size, size, 1), np.uint8),
    'labels': ((batch, config.num_classes), np.float32),
    'mask': ((batch,), np.bool_),
    'index': ((batch,), np.int32),
  }


def _dumped(dump_dir, suffix):
  """Text of the step's dumped file ending in `suffix` (the largest such module)."""
  names = [n for n in os.listdir(dump_dir) if n.endswith(suffix)]
  if not names:
    raise FileNotFoundError(f'XLA dumped no *{suffix} into {dump_dir}')
  name = max(names, key=lambda n: os.path.getsize(os.path.join(dump_dir, n)))
  with open(os.path.join(dump_dir, name)) as f:
    return f.read()


def report_row(config, *, name, per_device_batch, topology, dump_dir):
  import jax  # pylint: disable=g-import-not-at-top

  devices = _device_count(topology)
  config = _report_config(config, per_device_batch, devices)
  compiled, lower_s, compile_s = compile_step(config, topology, dump_dir)
  memory = compiled.memory_analysis()
  row = {
    'name': name,
    'model': config.model,
    'image_size': config.image_size,
    'dtype': config.dtype,
    'per_device_batch': per_device_batch,
    'global_batch': config.batch_size,
    'devices': devices,
    'topology': topology,
    'target': 'H100 SXM (sm_90), CUDA 13',
    'jax': jax.__version__,
    'temp_bytes': memory.temp_size_in_bytes,
    'argument_bytes': memory.argument_size_in_bytes,
    'lower_s': round(lower_s, 1),
    'compile_s': round(compile_s, 1),
    'options': _options(config),
    'xla_flags': USER_XLA_FLAGS,
  }
  return {**row, **dump_counts(dump_dir, per_device_batch, devices)}


def dump_counts(dump_dir, per_device_batch, devices):
  """The row's fields counted from XLA's dump of the step (a kept dump can be recounted)."""
  from benchmarks import time_model  # pylint: disable=g-import-not-at-top

  hlo_text = _dumped(dump_dir, '_gpu_after_optimizations.txt')
  hlo = hlo_counts(hlo_text)
  thunks = thunk_counts(_dumped(dump_dir, '.thunk_sequence_after_thunk_passes.txt'))
  kinds = thunks['launch_kinds']
  row = {
    'launches_per_step': thunks['launches'],
    'kernels': kinds.get('kCustomKernel', 0) + kinds.get('kKernel', 0),
    'convolutions': kinds.get('kConvolution', 0),
    'copies': kinds.get('kCopy', 0),
    'launch_kinds': kinds,
    'host_launches_per_step': thunks['host_launches'],
    'host_launch_kinds': thunks['host_launch_kinds'],
    'command_buffers': thunks['command_buffers'],
    'kernels_under_32_blocks': thunks['kernels_under_32_blocks'],
    'kernels_one_block': thunks['kernels_one_block'],
    'hlo_entry_counts': hlo['counts'],
    'launch_classes': hlo['classes'],
    'traffic_bytes': hlo['traffic_bytes'],
    'traffic_floor_ms': 1e3 * hlo['traffic_bytes'] / COPY_BANDWIDTH,
    'traffic_floor_images_per_s': per_device_batch * COPY_BANDWIDTH / hlo['traffic_bytes'],
    'copy_bandwidth': COPY_BANDWIDTH,
  }
  if devices > 1:
    row['all_reduces'] = summarize_bytes(hlo['all_reduce_bytes'])
  row['time_model'] = time_model.model(hlo_text, thunks['host_launches'], per_device_batch)
  row['targets_met'] = {key: row[key] <= limit for key, limit in TARGETS.items()}
  return row


def recount(path, *, name, per_device_batch, devices, dump_dir):
  """Recounts a row from its kept dump (after a change to the counting); no compile."""
  with open(path) as f:
    rows = json.load(f)
  key = (name, per_device_batch, devices)
  matches = [r for r in rows if (r['name'], r['per_device_batch'], r['devices']) == key]
  if not matches:
    sys.exit(f'compile_report: {path} has no row {key}; compile it first (drop --recount).')
  return {**matches[0], **dump_counts(dump_dir, per_device_batch, devices)}


def _options(config):
  """The config fields that shape the compiled step, for reading rows apart."""
  keys = ('bn_sync', 'gpu_command_buffers', 'fused_optimizer')
  return {key: config.get(key) for key in keys if key in config}


def _device_count(topology):
  count = 1
  for part in topology.split('x'):
    count *= int(part)
  return count


def write_row(row, path=RESULTS_FILE):
  """Adds `row` (replacing one of the same name, batch and devices); atomic."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = json.load(f)
  key = lambda r: (r['name'], r['per_device_batch'], r['devices'])  # noqa: E731
  rows = [r for r in rows if key(r) != key(row)] + [row]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(rows, f, indent=1)
    f.write('\n')
  os.replace(tmp, path)


def format_row(r):
  lines = [
    f'{r["name"]}: {r["model"]} {r["image_size"]} px {r["dtype"]}, batch {r["per_device_batch"]}'
    f' per device x {r["devices"]} ({r["topology"]}), compiled in {r["compile_s"]} s',
    f'  launches per step {r["launches_per_step"]:,} (kernels {r["kernels"]:,}, convolutions '
    f'{r["convolutions"]}, copies {r["copies"]}); host launches {r["host_launches_per_step"]:,} '
    f'({r["command_buffers"]} command buffers)',
    f'  kernels under {SMALL_GRID} blocks {r["kernels_under_32_blocks"]:,}, one block '
    f'{r["kernels_one_block"]:,}; temp {r["temp_bytes"] / 2**30:.2f} GiB, arguments '
    f'{r["argument_bytes"] / 2**30:.3f} GiB',
    f'  operand+output bytes {r["traffic_bytes"] / 1e9:.1f} GB: {r["traffic_floor_ms"]:.1f} ms '
    f'at {COPY_BANDWIDTH / 1e12:.1f} TB/s ({r["traffic_floor_images_per_s"]:,.0f} images/s '
    'per device)',
  ]
  lines += modelled_lines(r)
  if 'all_reduces' in r:
    a = r['all_reduces']
    lines.append(
      f'  all-reduces per step {a["count"]}, {a.get("total", 0) / 1e6:.1f} MB '
      f'(median {a.get("median", 0) / 1e3:.0f} KB, largest {a.get("largest", 0) / 1e6:.1f} MB)'
    )
  return '\n'.join(lines)


def modelled_lines(r):
  """The row's modelled times, labelled as such, and its costliest classes."""
  model = r.get('time_model')
  if not model:
    return []
  lines = [f'  {model["label"]}:']
  for gpu in ('H100 SXM', 'H200'):
    parts = [
      f'{variant} {model[gpu][variant]["step_ms"]:.1f} ms '
      f'({model[gpu][variant]["images_per_s"]:,} img/s, {model[gpu][variant]["bound"]}-bound)'
      for variant in ('optimistic', 'pessimistic')
    ]
    lines.append(f'    {gpu}: ' + ', '.join(parts))
  classes = model['H100 SXM']['pessimistic']['classes']
  lines.append(
    '    H100 SXM pessimistic by class: '
    + ', '.join(f'{name} {c["ms"]:.2f} ms ({c["GB"]:.1f} GB)' for name, c in classes.items())
  )
  return lines


def modelled_table(rows):
  """The modelled step time of every row that has one (MODELLED, not measured)."""
  lines = [
    '| row | batch/device | devices | GB | H100 SXM ms, MODELLED (img/s) | '
    'H200 ms, MODELLED (img/s) |',
    '| --- ' * 6 + '|',
  ]
  for r in rows:
    model = r.get('time_model')
    if not model:
      continue

    def span(gpu, model=model):
      low, high = model[gpu]['optimistic'], model[gpu]['pessimistic']
      return (
        f'{low["step_ms"]:.1f}-{high["step_ms"]:.1f} '
        f'({high["images_per_s"]:,}-{low["images_per_s"]:,})'
      )

    lines.append(
      f'| {r["name"]} | {r["per_device_batch"]} | {r["devices"]} | '
      f'{r["traffic_bytes"] / 1e9:.1f} | {span("H100 SXM")} | {span("H200")} |'
    )
  return '\n'.join(lines)


def class_table(row):
  """One row's per-class breakdown, both GPUs and variants (MODELLED, not measured)."""
  model = row['time_model']
  columns = [(gpu, v) for gpu in ('H100 SXM', 'H200') for v in ('optimistic', 'pessimistic')]
  lines = [
    '| class | launches | GB | ' + ' | '.join(f'{gpu} {v} ms' for gpu, v in columns) + ' |',
    '| --- ' * (3 + len(columns)) + '|',
  ]
  first = model['H100 SXM']['pessimistic']['classes']
  for name, c in first.items():
    times = ' | '.join(f'{model[gpu][v]["classes"][name]["ms"]:.2f}' for gpu, v in columns)
    lines.append(f'| {name} | {c["launches"]:,} | {c["GB"]:.1f} | {times} |')
  totals = ' | '.join(f'**{model[gpu][v]["device_ms"]:.2f}**' for gpu, v in columns)
  lines.append(
    f'| device total | {row["launches_per_step"]:,} | {row["traffic_bytes"] / 1e9:.1f} | {totals} |'
  )
  return '\n'.join(lines)


def markdown_table(rows):
  """All rows as one markdown table (RESULTS.md's)."""
  lines = [
    '| row | batch/device | devices | launches | kernels | convolutions | copies | host launches '
    '| kernels < 32 blocks | temp GiB | operand+output GB | floor ms (img/s) | all-reduces (MB) |',
    '| --- ' * 13 + '|',
  ]

  def order(r):  # Per shape: the baseline (most host launches) first, then each change.
    return (
      r['devices'],
      r['per_device_batch'],
      -r['host_launches_per_step'],
      -r['launches_per_step'],
    )

  for r in sorted(rows, key=order):
    a = r.get('all_reduces')
    lines.append(
      f'| {r["name"]} | {r["per_device_batch"]} | {r["devices"]} ({r["topology"]}) | '
      f'{r["launches_per_step"]:,} | {r["kernels"]:,} | {r["convolutions"]} | {r["copies"]} | '
      f'{r["host_launches_per_step"]:,} | {r["kernels_under_32_blocks"]:,} | '
      f'{r["temp_bytes"] / 2**30:.2f} | {r["traffic_bytes"] / 1e9:.1f} | '
      f'{r["traffic_floor_ms"]:.1f} ({r["traffic_floor_images_per_s"]:,.0f}) | '
      + (f'{a["count"]} ({a["total"] / 1e6:.1f})' if a else '-')
      + ' |'
    )
  return '\n'.join(lines)


def define_flags():
  """The command line, defined only when run as a program: importing this module (its
  tests, beside chexnet_jax.benchmark's own --config) defines no flags."""
  global _CONFIG, _BATCH, _DEVICES, _TOPOLOGY, _NAME, _OUT, _TABLE, _RECOUNT, _DUMP_DIR
  _CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/h100x1.py', 'Config file, e.g. configs/h100x1.py.', lock_config=True
  )
  _BATCH = flags.DEFINE_integer('batch', 128, 'Batch per device.', lower_bound=1)
  _DEVICES = flags.DEFINE_integer('devices', 1, 'GPUs in one host (topology 1x1xK).', lower_bound=1)
  _TOPOLOGY = flags.DEFINE_string('topology', '', 'slices x hosts x devices, e.g. 1x4x4.')
  _NAME = flags.DEFINE_string('name', 'default', 'Row label, e.g. the change it measures.')
  _OUT = flags.DEFINE_string('out', RESULTS_FILE, 'JSON file of rows.')
  _TABLE = flags.DEFINE_bool('table', False, 'Print the rows as a markdown table; compile nothing.')
  _RECOUNT = flags.DEFINE_string(
    'recount', '', 'Recount the row (--name, --batch, devices) from this kept XLA dump.'
  )
  _DUMP_DIR = flags.DEFINE_string('dump_dir', '', "Keep XLA's dump here ('' = a temporary one).")


def main(argv):
  del argv
  topology = _TOPOLOGY.value or f'1x1x{_DEVICES.value}'
  dump_dir = _DUMP_DIR.value or tempfile.mkdtemp(prefix='compile_report_')
  global USER_XLA_FLAGS
  USER_XLA_FLAGS = os.environ.get('XLA_FLAGS', '').strip()
  # Read once, when jax starts its backends: set before anything touches one.
  os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), f'--xla_dump_to={dump_dir} --xla_dump_hlo_as_text']
    + [FAST_COMPILE_FLAGS]
  )
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if _TABLE.value:
    with open(_OUT.value) as f:
      rows = json.load(f)
    print(markdown_table(rows), '', modelled_table(rows), sep='\n')
    for row in rows:
      if row.get('time_model'):
        print(f'\n{row["name"]}, batch {row["per_device_batch"]}, {row["devices"]} device(s):')
        print(class_table(row))
    return
  if _RECOUNT.value:
    row = recount(
      _OUT.value,
      name=_NAME.value,
      per_device_batch=_BATCH.value,
      devices=_device_count(topology),
      dump_dir=_RECOUNT.value,
    )
    write_row(row, _OUT.value)
    print(format_row(row), flush=True)
    return
  _check_plugin()
  try:
    row = report_row(
      _CONFIG.value,
      name=_NAME.value,
      per_device_batch=_BATCH.value,
      topology=topology,
      dump_dir=dump_dir,
    )
  finally:
    if not _DUMP_DIR.value:
      shutil.rmtree(dump_dir, ignore_errors=True)
  write_row(row, _OUT.value)
  print(format_row(row), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
