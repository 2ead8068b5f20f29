"""A dense layer's BN-ReLU-1x1 conv as one Pallas kernel (opt-in: config.fused_dense_layer).

`bn_relu_matmul_sums(pieces, mean, multiplier, bias, kernel, dtype)` is, for [M, Cin] `x`
(the concatenation of `pieces`, a dense block's feature maps, read where they lie),

    y = relu(((x - mean) * multiplier + bias).astype(dtype)) @ kernel     (as `dtype`)

with the per-column sum and sum of squares of y (float32, of y as `dtype`: the next
BatchNorm's moments times M). One matmul over row tiles of x: its prologue normalises
and ReLUs each tile of x on the fly (the normalised activation is never written to
memory), its epilogue reduces the tile's output; `dtype` inputs, float32 accumulation.
Each row tile writes its own partial sums and XLA adds them: deterministic, no atomics.

x is taken in pieces because a custom call's operand must exist in memory: given the
concatenation, XLA would write each layer's whole input once more (its own fusions read
the pieces in place). The gradient is two more kernels: `bn_relu_matmul_backward_data`
(dy @ kernel^T, the ReLU's mask and BatchNorm's two gradient sums: that product is never
written) and `bn_relu_matmul_backward_kernel` (relu(bn(x))^T @ dy, the normalisation
recomputed tile by tile: never written either). densenet.fused_bn_relu_conv1x1 joins them.

On CPU the kernels run in Pallas's interpret mode (the same program as XLA ops, for the
tests); on GPUs they lower through Triton.
"""

import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
import jax.numpy as jnp

# Rows of x per program; Triton needs powers of 2 and dots of at least 16 each way.
BLOCK_ROWS = 128
MAX_BLOCK_CHANNELS = 64
MIN_DOT_SIZE = 16


def _block_channels(channels):
  """The input channels each step of the K loop takes: a power of 2 dividing `channels`."""
  block = math.gcd(channels, MAX_BLOCK_CHANNELS)
  if block < MIN_DOT_SIZE:
    raise ValueError(
      f'fused_dense_layer: {channels} input channels; the kernel needs a multiple of '
      f'{MIN_DOT_SIZE}.'
    )
  return block


def _check_outputs(features):
  if features < MIN_DOT_SIZE or features & (features - 1):
    raise ValueError(
      f'fused_dense_layer: {features} output channels; the kernel needs a power of 2 '
      f'>= {MIN_DOT_SIZE}.'
    )


def _kernel(*refs, widths, rows, block_rows, dtype):
  pieces, (mean_ref, mult_ref, bias_ref, w_ref, y_ref, sum_ref, sumsq_ref) = (
    refs[: len(widths)],
    refs[len(widths) :],
  )
  features = w_ref.shape[1]
  # float32 (the CPU only: config_checks): full-precision products, as XLA's on CPU.
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  # The last tile may run past the end of x: Triton does not mask a block's reads and
  # writes itself, so they are masked here, and rows past the end normalise to zeros
  # (they add nothing to the sums).
  row = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
  in_range = row < rows

  def piece_steps(piece_ref, offset, acc):
    """acc + relu(bn(piece)) @ its rows of the kernel, `block` channels a step."""
    block = _block_channels(piece_ref.shape[1])
    mask = jnp.broadcast_to(in_range, (block_rows, block))

    def step(k, acc):
      start = pl.multiple_of(k * block, block)
      cols = pl.ds(start, block)
      # This piece's channels of the layer's input (and of the vectors and kernel rows).
      channels = pl.ds(start + offset, block)
      x = plt.load(piece_ref.at[:, cols], mask=mask, other=0).astype(jnp.float32)
      # densenet.batch_norm_relu's arithmetic, in its order: the same bits.
      a = (x - mean_ref[:, channels]) * mult_ref[:, channels] + bias_ref[:, channels]
      a = a.astype(dtype)
      a = jnp.where(in_range & (a > 0), a, jnp.zeros((), dtype))
      w = w_ref[channels, :].astype(dtype)
      return acc + jnp.dot(a, w, preferred_element_type=jnp.float32, precision=precision)

    return jax.lax.fori_loop(0, piece_ref.shape[1] // block, step, acc)

  acc = jnp.zeros((block_rows, features), jnp.float32)
  offset = 0
  for piece_ref, width in zip(pieces, widths):  # In channel order, as the concatenation.
    acc = piece_steps(piece_ref, offset, acc)
    offset += width
  y = acc.astype(dtype)
  plt.store(y_ref, y, mask=jnp.broadcast_to(in_range, y.shape))
  # The next BatchNorm's moments are of y as stored (batch_moments casts it up).
  y = y.astype(jnp.float32)
  sum_ref[...] = jnp.sum(y, axis=0, keepdims=True)
  sumsq_ref[...] = jnp.sum(y * y, axis=0, keepdims=True)


def _call(pieces, mean, multiplier, bias, kernel, dtype, interpret):
  rows = pieces[0].shape[0]
  widths = tuple(piece.shape[1] for piece in pieces)
  channels, features = kernel.shape
  _check_outputs(features)
  block_rows = BLOCK_ROWS
  tiles = pl.cdiv(rows, block_rows)
  body = functools.partial(_kernel, widths=widths, rows=rows, block_rows=block_rows, dtype=dtype)
  vector = pl.BlockSpec((1, channels), lambda i: (0, 0))
  partial_sums = pl.BlockSpec((1, features), lambda i: (i, 0))
  y, sums, sumsqs = pl.pallas_call(
    body,
    out_shape=(
      jax.ShapeDtypeStruct((rows, features), dtype),
      jax.ShapeDtypeStruct((tiles, features), jnp.float32),
      jax.ShapeDtypeStruct((tiles, features), jnp.float32),
    ),
    grid=(tiles,),
    in_specs=[pl.BlockSpec((block_rows, width), lambda i: (i, 0)) for width in widths]
    + [vector, vector, vector, pl.BlockSpec((channels, features), lambda i: (0, 0))],
    out_specs=(pl.BlockSpec((block_rows, features), lambda i: (i, 0)), partial_sums, partial_sums),
    interpret=interpret,
    compiler_params=None if interpret else plt.CompilerParams(num_warps=4, num_stages=3),
    name='bn_relu_matmul_sums',
  )(*pieces, mean[None], multiplier[None], bias[None], kernel)
  return y, jnp.sum(sums, axis=0), jnp.sum(sumsqs, axis=0)


def bn_relu_matmul_sums(pieces, mean, multiplier, bias, kernel, dtype):
  """(y, per-column sum of y, of y^2) as in the module docstring, x the concatenation of
  `pieces` ([M, C_i] in `dtype`, each C_i a multiple of 16) along its columns, read piece
  by piece: never concatenated. mean/multiplier/bias [Cin] float32, `kernel` [Cin, Cout].
  Interpret mode on CPU."""
  pieces = tuple(pieces)
  args = (pieces, mean.astype(jnp.float32), multiplier, bias.astype(jnp.float32), kernel)
  return jax.lax.platform_dependent(
    *args,
    cpu=functools.partial(_call, dtype=dtype, interpret=True),
    default=functools.partial(_call, dtype=dtype, interpret=False),
  )


def _backward_data_kernel(*refs, widths, rows, block_rows, dtype):
  """dx = the masked, scaled gradient of relu(bn(x)) given da = dy @ kernel^T, and the
  BN's two gradient sums, per row tile: densenet._batch_norm_relu_backward's arithmetic."""
  count = len(widths)
  dy_ref, w_ref, *pieces = refs[: count + 2]
  mean_ref, mult_ref, bias_ref = refs[count + 2 : count + 5]
  dx_refs = refs[count + 5 : 2 * count + 5]
  sum_g_ref, sum_gc_ref = refs[2 * count + 5 :]
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  row = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
  in_range = row < rows
  dy_mask = jnp.broadcast_to(in_range, (block_rows, w_ref.shape[1]))
  dy = plt.load(dy_ref, mask=dy_mask, other=0)  # Rows past the end: g = 0.

  def piece_steps(piece_ref, dx_ref, offset):
    block = _block_channels(piece_ref.shape[1])
    mask = jnp.broadcast_to(in_range, (block_rows, block))

    def step(k, carry):
      start = pl.multiple_of(k * block, block)
      cols, channels = pl.ds(start, block), pl.ds(start + offset, block)
      w = w_ref[channels, :].astype(dtype)
      # The convolution's input gradient, as its transpose gives it: rounded to `dtype`.
      da = jax.lax.dot_general(
        dy, w, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
      ).astype(dtype)
      x = plt.load(piece_ref.at[:, cols], mask=mask, other=0).astype(jnp.float32)
      centred = x - mean_ref[:, channels]
      multiplier = mult_ref[:, channels]
      active = (centred * multiplier + bias_ref[:, channels]).astype(dtype) > 0
      g = jnp.where(active & in_range, da.astype(jnp.float32), 0.0)
      plt.store(dx_ref.at[:, cols], (g * multiplier).astype(dx_ref.dtype), mask=mask)
      sum_g_ref[:, channels] = jnp.sum(g, axis=0, keepdims=True)
      sum_gc_ref[:, channels] = jnp.sum(g * centred, axis=0, keepdims=True)
      return carry

    jax.lax.fori_loop(0, piece_ref.shape[1] // block, step, 0)

  offset = 0
  for piece_ref, dx_ref, width in zip(pieces, dx_refs, widths):
    piece_steps(piece_ref, dx_ref, offset)
    offset += width


def _backward_data_call(dy, kernel, pieces, mean, multiplier, bias, dtype, interpret):
  rows = pieces[0].shape[0]
  widths = tuple(piece.shape[1] for piece in pieces)
  channels, features = kernel.shape
  tiles = pl.cdiv(rows, BLOCK_ROWS)
  body = functools.partial(
    _backward_data_kernel, widths=widths, rows=rows, block_rows=BLOCK_ROWS, dtype=dtype
  )
  vector = pl.BlockSpec((1, channels), lambda i: (0, 0))
  row_tiles = [pl.BlockSpec((BLOCK_ROWS, width), lambda i: (i, 0)) for width in widths]
  partial_sums = pl.BlockSpec((1, channels), lambda i: (i, 0))
  *dx, sum_g, sum_gc = pl.pallas_call(
    body,
    out_shape=(
      *(jax.ShapeDtypeStruct(piece.shape, piece.dtype) for piece in pieces),
      jax.ShapeDtypeStruct((tiles, channels), jnp.float32),
      jax.ShapeDtypeStruct((tiles, channels), jnp.float32),
    ),
    grid=(tiles,),
    in_specs=[
      pl.BlockSpec((BLOCK_ROWS, features), lambda i: (i, 0)),
      pl.BlockSpec((channels, features), lambda i: (0, 0)),
      *row_tiles,
      vector,
      vector,
      vector,
    ],
    out_specs=(*row_tiles, partial_sums, partial_sums),
    interpret=interpret,
    compiler_params=None if interpret else plt.CompilerParams(num_warps=4, num_stages=3),
    name='bn_relu_matmul_backward_data',
  )(dy, kernel, *pieces, mean[None], multiplier[None], bias[None])
  return tuple(dx), jnp.sum(sum_g, axis=0), jnp.sum(sum_gc, axis=0)


def bn_relu_matmul_backward_data(dy, kernel, pieces, mean, multiplier, bias, dtype):
  """The input side of bn_relu_matmul_sums's gradient in one kernel: given its output's
  gradient `dy` [M, Cout] (`dtype`), (dx per piece, sum of g, sum of g * (x - mean)) per
  input channel, g the gradient at relu(bn(x)) masked by the ReLU: da = dy @ kernel^T
  (rounded to `dtype`) is never written to memory. Interpret mode on CPU."""
  pieces = tuple(pieces)
  args = (dy, kernel, pieces, mean.astype(jnp.float32), multiplier, bias.astype(jnp.float32))
  return jax.lax.platform_dependent(
    *args,
    cpu=functools.partial(_backward_data_call, dtype=dtype, interpret=True),
    default=functools.partial(_backward_data_call, dtype=dtype, interpret=False),
  )


# Rows each program of the kernel-gradient kernel sums over: its partial sums are
# [Cin, Cout] float32 per chunk, a few percent of the bytes of the rows it reads.
CHUNK_TILES = 16


def _backward_kernel_kernel(*refs, widths, rows, block_rows, dtype):
  """Per chunk of rows: relu(bn(x))^T @ dy, x's normalisation recomputed tile by tile (never
  written), float32 sums: densenet._conv1x1's kernel gradient before its rounding."""
  count = len(widths)
  dy_ref, *pieces = refs[: count + 1]
  mean_ref, mult_ref, bias_ref, dw_ref = refs[count + 1 :]
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  features = dy_ref.shape[1]
  chunk = pl.program_id(0)

  def piece_steps(piece_ref, offset):
    block = _block_channels(piece_ref.shape[1])

    def k_step(k, carry):
      start = pl.multiple_of(k * block, block)
      cols, channels = pl.ds(start, block), pl.ds(start + offset, block)
      mean, multiplier, bias = mean_ref[:, channels], mult_ref[:, channels], bias_ref[:, channels]

      def row_step(t, acc):
        first = pl.multiple_of(t * block_rows, block_rows)
        row = chunk * CHUNK_TILES * block_rows + first
        row = row + jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)
        in_range = row < rows
        tile = pl.ds(first, block_rows)
        mask = jnp.broadcast_to(in_range, (block_rows, block))
        x = plt.load(piece_ref.at[tile, cols], mask=mask, other=0).astype(jnp.float32)
        a = ((x - mean) * multiplier + bias).astype(dtype)
        a = jnp.where(in_range & (a > 0), a, jnp.zeros((), dtype))
        dy_mask = jnp.broadcast_to(in_range, (block_rows, features))
        dy = plt.load(dy_ref.at[tile, :], mask=dy_mask, other=0)
        return acc + jax.lax.dot_general(
          a, dy, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )

      acc = jnp.zeros((block, features), jnp.float32)
      acc = jax.lax.fori_loop(0, CHUNK_TILES, row_step, acc)
      dw_ref[channels, :] = acc
      return carry

    jax.lax.fori_loop(0, piece_ref.shape[1] // block, k_step, 0)

  offset = 0
  for piece_ref, width in zip(pieces, widths):
    piece_steps(piece_ref, offset)
    offset += width


def _backward_kernel_call(dy, pieces, mean, multiplier, bias, dtype, interpret):
  rows, features = dy.shape
  widths = tuple(piece.shape[1] for piece in pieces)
  channels = sum(widths)
  chunk_rows = CHUNK_TILES * BLOCK_ROWS
  chunks = pl.cdiv(rows, chunk_rows)
  body = functools.partial(
    _backward_kernel_kernel, widths=widths, rows=rows, block_rows=BLOCK_ROWS, dtype=dtype
  )
  vector = pl.BlockSpec((1, channels), lambda i: (0, 0))
  partial_dw = pl.pallas_call(
    body,
    out_shape=jax.ShapeDtypeStruct((chunks, channels, features), jnp.float32),
    grid=(chunks,),
    in_specs=[
      pl.BlockSpec((chunk_rows, features), lambda i: (i, 0)),
      *(pl.BlockSpec((chunk_rows, width), lambda i: (i, 0)) for width in widths),
      vector,
      vector,
      vector,
    ],
    out_specs=pl.BlockSpec((None, channels, features), lambda i: (i, 0, 0)),
    interpret=interpret,
    compiler_params=None if interpret else plt.CompilerParams(num_warps=4, num_stages=3),
    name='bn_relu_matmul_backward_kernel',
  )(dy, *pieces, mean[None], multiplier[None], bias[None])
  return jnp.sum(partial_dw, axis=0)


def bn_relu_matmul_backward_kernel(dy, pieces, mean, multiplier, bias, dtype):
  """relu(bn(x))^T @ dy in float32 ([Cin, Cout]; x the concatenation of `pieces`): the
  kernel's gradient before rounding, the normalisation recomputed in the kernel and never
  written. Programs take chunks of rows; XLA adds their partial sums. Interpret on CPU."""
  pieces = tuple(pieces)
  args = (dy, pieces, mean.astype(jnp.float32), multiplier, bias.astype(jnp.float32))
  return jax.lax.platform_dependent(
    *args,
    cpu=functools.partial(_backward_kernel_call, dtype=dtype, interpret=True),
    default=functools.partial(_backward_kernel_call, dtype=dtype, interpret=False),
  )
