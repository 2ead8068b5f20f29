"""benchmarks.compile_report's counting, on a small handwritten GPU module and thunk list.

The compile for sm_90 itself needs the CUDA plugin and minutes: it is a benchmark
(`make compile-report`), not a test.
"""

import json

from benchmarks import compile_report

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
