"""benchmarks.compile_report's counting, on a small handwritten GPU module and thunk list.

The compile for sm_90 itself needs the CUDA plugin and minutes: it is a benchmark
(`make compile-report`), not a test.
"""

import json

from benchmarks import compile_report
from benchmarks import time_model

# The shapes of an optimized XLA:GPU module: parameters, a fusion, a cuDNN
# convolution, a slice fusion, a combined all-reduce and a copy.
HLO = """HloModule jit_step, is_scheduled=true

%fused_add (p0: f32[4,8], p1: f32[4,8]) -> f32[4,8] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[4,8]{1,0} parameter(1)
  ROOT %add = f32[4,8]{1,0} add(%p0, %p1)
}

%fused_slice (p0.1: f32[4,8]) -> f32[1,8] {
  %p0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %slice.1 = f32[1,8]{1,0} slice(%p0.1), slice={[2:3], [0:8]}
}

ENTRY %main (state_w: f32[4,8], x: bf16[2,16,16,8], mu: f32[4,8]) -> (f32[4,8], f32[4,8]) {
  %state_w = f32[4,8]{1,0} parameter(0), metadata={op_name="state.params"}
  %x = bf16[2,16,16,8]{3,2,1,0} parameter(1)
  %state_opt_state_mu = f32[4,8]{1,0} parameter(2)
  %cudnn-conv.1 = (bf16[2,16,16,8]{3,2,1,0}, u8[0]{0}) custom-call(%x, %x), window={size=1x1}, custom_call_target="__cudnn$convForward"
  %get-tuple-element.1 = bf16[2,16,16,8]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %loop_slice_fusion.2 = f32[2,8]{1,0} fusion(%state_w), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp(DenseNet)/norm1/reduce_sum"}
  %input_add_fusion = f32[4,8]{1,0} fusion(%state_w, %state_opt_state_mu), kind=kInput, calls=%fused_add
  %all-reduce-start = (f32[4,8]{1,0}, f32[2,8]{1,0}) all-reduce-start(%input_add_fusion, %loop_slice_fusion.2), replica_groups={}, to_apply=%fused_add
  %all-reduce-done = (f32[4,8]{1,0}, f32[2,8]{1,0}) all-reduce-done(%all-reduce-start)
  %copy.3 = f32[4,8]{1,0} copy(%state_w)
  %loop_convert_fusion = f32[1,8]{1,0} fusion(%state_w), kind=kLoop, calls=%fused_slice
  ROOT %tuple = (f32[4,8]{1,0}, f32[4,8]{1,0}) tuple(%copy.3, %input_add_fusion)
}
"""  # noqa: E501 (XLA's long lines, as dumped)

THUNKS = """000: kCommandBuffer [source        | next=003 (1)  ]
    001: kCopy         [source       | next=002 (1)] kCopy
    002: kCustomKernel [prev=001 (1) | sink        ] loop_add_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
003: kConvolution   [prev=000 (1)  | next=004 (1)  ] kConvolution
004: kCustomKernel [prev=003 (1)  | sink   ] input_add_fusion grid: [4, 8, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
005: kCustomKernel [prev=003 (1)  | sink   ] input_reduce_fusion grid: [31, 1, 1] threads: [128, 1, 1]  shared_memory: 0 bytes
006: kAsyncStart    [prev=000 (1)  | next=000 (4) ] stream=communication_stream[0], async_id=6
    007: kAllReduce [source | sink] kAllReduce
008: kAsyncDone     [prev=000 (1)  | sink ] async_id=6
"""  # noqa: E501


def test_shape_bytes_sums_tuples_and_scalars():
  assert compile_report.shape_bytes('bf16[2,3]{1,0}') == 12
  assert compile_report.shape_bytes('(f32[4,8]{1,0}, u8[0]{0})') == 128
  assert compile_report.shape_bytes('s32[]') == 4


def test_hlo_counts_launches_all_reduces_and_bytes():
  result = compile_report.hlo_counts(HLO)
  assert result['counts'] == {'convolutions': 1, 'fusions': 3, 'all_reduces': 1, 'copies': 1}
  # One combined all-reduce: both operands, 128 + 64 bytes.
  assert result['all_reduce_bytes'] == [192]
  assert result['classes'] == {
    'convolution': 1,
    'batchnorm': 1,
    'optimizer': 1,
    'all-reduce': 1,
    'copy': 1,
    'step (loss, update, other)': 1,
  }
  conv = 2 * 8192 + 8192  # reads x twice, writes its output (+ an empty workspace)
  slice_fusion = 64 + 64  # counted as reading only what it writes
  add_fusion = 2 * 128 + 128
  all_reduce = 192 + 192
  copy = 128 + 128
  sliced_read = 32 + 32  # reads the one row it slices out of its 128-byte operand
  total = conv + slice_fusion + add_fusion + all_reduce + copy + sliced_read
  assert result['traffic_bytes'] == total


def test_thunk_counts_host_launches_and_small_grids():
  result = compile_report.thunk_counts(THUNKS)
  # A copy, 3 kernels, a convolution, an all-reduce; the buffer and the async pair are none.
  assert result['launches'] == 6
  assert result['launch_kinds'] == {
    'kCopy': 1,
    'kCustomKernel': 3,
    'kConvolution': 1,
    'kAllReduce': 1,
  }
  assert result['host_launches'] == 6  # the graph, the convolution, two kernels, start, done
  assert result['command_buffers'] == 1
  assert result['kernels_under_32_blocks'] == 2  # grids of 1 and 31 blocks, not 32
  assert result['kernels_one_block'] == 1


def test_write_row_replaces_same_key_atomically(tmp_path):
  path = str(tmp_path / 'rows.json')
  base = {'name': 'baseline', 'per_device_batch': 128, 'devices': 1, 'launches_per_step': 9}
  compile_report.write_row(base, path)
  compile_report.write_row({**base, 'devices': 4}, path)
  compile_report.write_row({**base, 'launches_per_step': 7}, path)
  with open(path) as f:
    rows = json.load(f)
  assert [(r['devices'], r['launches_per_step']) for r in rows] == [(4, 9), (1, 7)]
  assert not (tmp_path / 'rows.json.tmp').exists()


# jax 0.11's HLO text: a tuple element is read as `%name#k`, with no get-tuple-element.
# The convolution's output tuple holds its result and a 1,024-byte workspace.
HLO_011 = """HloModule jit_step, is_scheduled=true

%fused_stats (p0: bf16[8,4,4,32]) -> f32[32] {
  %p0 = bf16[8,4,4,32]{3,2,1,0} parameter(0)
  %c = f32[] constant(0)
  ROOT %r = f32[32]{0} reduce(%p0, %c), dimensions={0,1,2}, to_apply=%add
}

ENTRY %main (x: bf16[8,4,4,16], w: bf16[32,3,3,16]) -> f32[32] {
  %x = bf16[8,4,4,16]{3,2,1,0} parameter(0)
  %w = bf16[32,3,3,16]{3,2,1,0} parameter(1)
  %cudnn-conv = (bf16[8,4,4,32]{3,2,1,0}, u8[1024]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"
  %input_reduce_fusion = f32[32]{0} fusion(%cudnn-conv#0), kind=kInput, calls=%fused_stats, metadata={op_name="jit(step)/jvp(DenseNet)/norm1/reduce_sum"}
  ROOT %copy.1 = f32[32]{0} copy(%input_reduce_fusion)
}
"""  # noqa: E501

CONV_BYTES = 4096 + 9216 + 8192 + 1024  # x, w; its result and workspace
STATS_BYTES = 8192 + 128  # element 0 of the convolution's tuple only, then 32 floats
COPY_BYTES = 128 + 128


def test_tuple_elements_split_at_the_top_level_only():
  shape = '(bf16[2,3]{1,0}, (f32[4]{0}, u8[0]{0}), s32[])'
  assert compile_report.tuple_elements(shape) == [
    'bf16[2,3]{1,0}',
    '(f32[4]{0}, u8[0]{0})',
    's32[]',
  ]
  assert compile_report.tuple_elements('f32[4,8]{1,0}') == ['f32[4,8]{1,0}']


def test_an_operand_with_a_tuple_element_suffix_reads_only_that_element():
  result = compile_report.hlo_counts(HLO_011)
  # Before the fix the reduction counted the whole tuple: 1,024 workspace bytes more.
  assert result['traffic_bytes'] == CONV_BYTES + STATS_BYTES + COPY_BYTES


def test_time_model_classes_bytes_and_convolution_flops():
  found = {launch['name']: launch for launch in time_model.launches(HLO_011)}
  assert {name: launch['class'] for name, launch in found.items()} == {
    'cudnn-conv': 'convolutions 3x3, 7x7',
    'input_reduce_fusion': 'BN forward statistics',
    'copy.1': 'copies',
  }
  assert [found[n]['bytes'] for n in ('cudnn-conv', 'input_reduce_fusion', 'copy.1')] == [
    CONV_BYTES,
    STATS_BYTES,
    COPY_BYTES,
  ]
  # 2 x 4,096 output elements x 16 input channels x 3 x 3; GEMM M=8*4*4, N=32, K=16*9.
  assert found['cudnn-conv']['flops'] == 2 * 4096 * 16 * 9
  assert found['cudnn-conv']['gemm'] == (128, 32, 144)
  assert found['copy.1']['flops'] == 0


GPU = {'hbm_bytes_per_s': 1e9, 'bf16_flops_per_s': 1e10}


def test_a_launch_takes_the_longest_of_memory_compute_and_floor():
  conv = {'bytes': 22_528, 'flops': 1_179_648, 'gemm': (128, 32, 144)}
  flat = {'bandwidth_fraction': 1.0, 'conv_efficiency': 0.5, 'floor_s': 1e-6}
  assert time_model.launch_seconds(conv, GPU, flat) == 1_179_648 / (1e10 * 0.5)  # compute
  # A GEMM dimension of 32 against a full rate at 128: a quarter of the efficiency.
  shaped = {**flat, 'gemm_dim_full_rate': 128}
  assert time_model.launch_seconds(conv, GPU, shaped) == 1_179_648 / (1e10 * 0.5 * 0.25)
  copy = {'bytes': 256, 'flops': 0, 'gemm': None}
  half = {**flat, 'bandwidth_fraction': 0.5, 'floor_s': 1e-7}
  assert time_model.launch_seconds(copy, GPU, half) == 256 / 0.5e9  # memory
  assert time_model.launch_seconds(copy, GPU, {**flat, 'floor_s': 1e-3}) == 1e-3  # floor


def test_step_time_sums_launches_by_class_and_takes_the_host_when_longer():
  found = time_model.launches(HLO_011)
  variant = {'bandwidth_fraction': 1.0, 'conv_efficiency': 0.5, 'floor_s': 1e-6}
  device = time_model.step_time(
    found, host_launches=1, per_device_batch=8, gpu=GPU, variant=variant
  )
  expected_ms = 1e3 * sum(time_model.launch_seconds(x, GPU, variant) for x in found)
  assert device['bound'] == 'device' and abs(device['device_ms'] - expected_ms) < 0.01
  assert device['classes']['copies'] == {'launches': 1, 'GB': 0.0, 'ms': round(256e-6, 2)}
  assert abs(device['images_per_s'] - 8 / device['step_ms'] * 1e3) < 0.01 * device['images_per_s']
  host = time_model.step_time(
    found, host_launches=100, per_device_batch=8, gpu=GPU, variant=variant
  )
  assert host['bound'] == 'host'
  assert host['step_ms'] == round(100 * time_model.HOST_LAUNCH_S * 1e3, 3)


def test_model_is_labelled_and_covers_both_gpus_and_variants():
  result = time_model.model(HLO_011, host_launches=1, per_device_batch=8)
  assert 'MODELLED' in result['label'] and 'not measured' in result['label']
  for gpu in ('H100 SXM', 'H200'):
    assert 'datasheet' in result[gpu]['source']
    low, high = result[gpu]['optimistic'], result[gpu]['pessimistic']
    assert 0 < low['step_ms'] <= high['step_ms']
  assert result['H200']['hbm_bytes_per_s'] > result['H100 SXM']['hbm_bytes_per_s']
