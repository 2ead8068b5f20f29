"""A MODELLED step time from the compiled program: no GPU ran it, nothing here is measured.

benchmarks/compile_report.py compiles the train step for an H100 without a GPU; this
module turns its optimized module into a time per step. Each launch takes

    max(bytes / HBM bandwidth, FLOPs / (bf16 peak x efficiency), a floor per kernel)

and the launches are summed in series (no overlap; no reuse through the L2 cache, so
bytes are an upper bound). Bytes are each launch's operands + outputs
(`compile_report.launch_bytes`); FLOPs are counted for cuDNN convolutions only (XLA's
fusions do a few FLOPs per byte). The host adds HOST_LAUNCH_S per host launch, in
parallel with the device: the step takes the longer of the two.

Two variants bracket the constants: `optimistic` (datasheet bandwidth, convolutions at
60% of peak, a 2 us floor) and `pessimistic` (80% of the datasheet bandwidth, the
convolution's efficiency scaled down when its implicit GEMM has a dimension under 128,
e.g. DenseNet's 3x3 convolutions with 32 output channels, and a 4 us floor).
"""

import collections
import re

from benchmarks import compile_report

LABEL = 'MODELLED (compiled program x datasheet rates), not measured'

# Datasheet rates, dense (no sparsity).
GPUS = {
  'H100 SXM': {
    'hbm_bytes_per_s': 3.35e12,
    'bf16_flops_per_s': 989e12,
    'source': 'NVIDIA H100 Tensor Core GPU datasheet: H100 SXM 3.35 TB/s HBM3, '
    '989 TFLOPS bf16 dense (1,979 with sparsity); nvidia.com/en-us/data-center/h100/',
  },
  'H200': {
    'hbm_bytes_per_s': 4.8e12,
    'bf16_flops_per_s': 989e12,
    'source': 'NVIDIA H200 Tensor Core GPU datasheet: H200 SXM 4.8 TB/s HBM3e, '
    '989 TFLOPS bf16 dense (1,979 with sparsity); nvidia.com/en-us/data-center/h200/',
  },
}

VARIANTS = {
  'optimistic': {'bandwidth_fraction': 1.0, 'conv_efficiency': 0.6, 'floor_s': 2e-6},
  'pessimistic': {
    'bandwidth_fraction': 0.8,
    'conv_efficiency': 0.6,
    'floor_s': 4e-6,
    'gemm_dim_full_rate': 128,  # A smaller GEMM dimension scales the efficiency down.
  },
}

# Host time per host launch, fitted (not a datasheet figure) to the one measured H200 step
# with XLA's default command buffers: 41.7 ms for 908 host launches at batch 128.
HOST_LAUNCH_S = 41.7e-3 / 908

ASSUMPTIONS = (
  'Per launch max(bytes / (HBM bandwidth x fraction), conv FLOPs / (bf16 peak x efficiency), '
  'floor), summed in series; bytes = operands + outputs, no L2 reuse; host time = host '
  f"launches x {HOST_LAUNCH_S * 1e6:.0f} us (fitted to the H200 measurement of XLA's default "
  'command buffers), step = max(device, host). Floors of 2-4 us per kernel inside a CUDA '
  'graph and 60% of peak for cuDNN convolutions are assumptions, not datasheet figures.'
)


# ------------------------------------------------------------------ launches --


def launches(hlo_text):
  """Every launch of the optimized module: {name, class, bytes, flops, gemm}."""
  bodies = compile_report.computations(hlo_text)
  rows = bodies['ENTRY']
  shapes = {name: shape for name, shape, _, _ in rows}
  found = []
  for name, shape, opcode, rest in rows:
    if not compile_report._is_launch(opcode):  # pylint: disable=protected-access
      continue
    launch = {
      'name': name,
      'class': time_class(bodies, opcode, rest),
      'bytes': compile_report.launch_bytes(bodies, shapes, name, shape, opcode, rest),
      'flops': 0,
      'gemm': None,
    }
    if launch['class'].startswith('convolutions'):
      launch['flops'], launch['gemm'] = conv_flops(shape, rest, shapes)
    found.append(launch)
  return found


def _dims(shape):
  match = compile_report._SHAPE.search(shape)  # pylint: disable=protected-access
  return [int(d) for d in match.group(2).split(',') if d] if match else []


def _product(values):
  total = 1
  for value in values:
    total *= value
  return total


def _conv_operands(shape, rest, shapes):
  """(kernel dims, forward output dims, kernel dim labels) of a cuDNN convolution."""
  labels = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', rest)
  operands = compile_report.operand_shapes(rest, shapes)
  output = compile_report.tuple_elements(shape)[0]
  if not labels or len(operands) < 2:
    return None
  if 'BackwardFilter' in rest:  # (input, output gradient) -> kernel gradient.
    return _dims(output), _dims(operands[1]), labels.group(2)
  if 'BackwardInput' in rest:  # (output gradient, kernel) -> input gradient.
    return _dims(operands[1]), _dims(operands[0]), labels.group(2)
  return _dims(operands[1]), _dims(output), labels.group(2)  # Forward.


def conv_flops(shape, rest, shapes):
  """(FLOPs, implicit GEMM (M, N, K)) of a cuDNN convolution, or (0, None) if unreadable.

  Every direction does the forward's multiply-adds: 2 x output elements x Cin x kh x kw.
  """
  found = _conv_operands(shape, rest, shapes)
  if not found:
    return 0, None
  kernel, forward_out, labels = found
  if len(kernel) != len(labels) or not forward_out:
    return 0, None
  out_channels, in_channels = kernel[labels.index('o')], kernel[labels.index('i')]
  window = _product(d for d, label in zip(kernel, labels) if label not in 'oi')
  elements = _product(forward_out)
  gemm = (elements // max(out_channels, 1), out_channels, in_channels * window)
  return 2 * elements * in_channels * window, gemm


def _conv_window(rest):
  window = re.search(r'window=\{size=([\dx]+)', rest)
  return window.group(1) if window else '?'


def time_class(bodies, opcode, rest):
  """What a launch is for, in the classes the breakdown reports."""
  if opcode == 'copy':
    return 'copies'
  if opcode.startswith('all-reduce'):
    return 'all-reduces (as memory traffic only)'
  if opcode == 'custom-call':
    if 'conv' not in rest.split('custom_call_target=')[-1][:40]:
      return 'other'
    return 'convolutions 1x1' if _conv_window(rest) == '1x1' else 'convolutions 3x3, 7x7'
  if compile_report.launch_class(opcode, rest) == 'optimizer':
    return 'optimizer'
  called = re.search(r'calls=%([\w.\-]+)', rest)
  ops = {op for _, _, op, _ in bodies.get(called.group(1), [])} if called else set()
  op_name = re.search(r'op_name="([^"]*)"', rest)
  op_name = op_name.group(1) if op_name else ''
  backward = 'transpose(' in op_name
  batchnorm = bool(re.search(r'/norm\d*/', op_name))
  if 'select-and-scatter' in ops or 'scatter' in ops:
    return 'max-pool gradient'
  if 'reduce' in ops and batchnorm:
    return 'BN backward reductions' if backward else 'BN forward statistics'
  if 'concatenate' in ops:
    return 'concatenation'
  if ops & {'slice', 'dynamic-slice'} and backward:
    return 'concatenation gradient'
  if batchnorm:
    return 'BN backward elementwise' if backward else 'BN apply, ReLU'
  return 'other'


# --------------------------------------------------------------------- model --


def launch_seconds(launch, gpu, variant):
  """One launch's modelled time on `gpu` (a GPUS entry) under `variant` (a VARIANTS entry)."""
  memory_s = launch['bytes'] / (gpu['hbm_bytes_per_s'] * variant['bandwidth_fraction'])
  compute_s = 0.0
  if launch['flops']:
    efficiency = variant['conv_efficiency']
    full = variant.get('gemm_dim_full_rate')
    if full and launch['gemm']:
      efficiency *= min(1.0, min(launch['gemm']) / full)
    compute_s = launch['flops'] / (gpu['bf16_flops_per_s'] * efficiency)
  return max(memory_s, compute_s, variant['floor_s'])


def step_time(found, host_launches, per_device_batch, gpu, variant):
  """The modelled step on one device: times, images/s and the per-class breakdown."""
  classes = collections.defaultdict(lambda: {'launches': 0, 'bytes': 0, 'ms': 0.0})
  for launch in found:
    entry = classes[launch['class']]
    entry['launches'] += 1
    entry['bytes'] += launch['bytes']
    entry['ms'] += 1e3 * launch_seconds(launch, gpu, variant)
  device_ms = sum(entry['ms'] for entry in classes.values())
  host_ms = 1e3 * host_launches * HOST_LAUNCH_S
  step_ms = max(device_ms, host_ms)
  ordered = sorted(classes.items(), key=lambda item: -item[1]['ms'])
  return {
    'step_ms': round(step_ms, 3),
    'images_per_s': round(per_device_batch / step_ms * 1e3),
    'device_ms': round(device_ms, 3),
    'host_ms': round(host_ms, 3),
    'bound': 'host' if host_ms > device_ms else 'device',
    'classes': {
      name: {'launches': e['launches'], 'GB': round(e['bytes'] / 1e9, 2), 'ms': round(e['ms'], 2)}
      for name, e in ordered
    },
  }


def model(hlo_text, host_launches, per_device_batch):
  """The row's `time_model`: every GPU x variant, with its rates, sources and assumptions."""
  found = launches(hlo_text)
  result = {'label': LABEL, 'assumptions': ASSUMPTIONS, 'host_launch_s': HOST_LAUNCH_S}
  for gpu_name, gpu in GPUS.items():
    result[gpu_name] = {
      'hbm_bytes_per_s': gpu['hbm_bytes_per_s'],
      'bf16_flops_per_s': gpu['bf16_flops_per_s'],
      'source': gpu['source'],
    }
    for variant_name, variant in VARIANTS.items():
      result[gpu_name][variant_name] = {
        **variant,
        **step_time(found, host_launches, per_device_batch, gpu, variant),
      }
  return result
