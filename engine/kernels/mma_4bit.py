"""The small-batch 4-bit matmul on tensor cores, all in registers: a Gluon kernel feeding decoded
weights straight into `mma.sync` (m16n8k16), no shared memory and no barriers. Hopper: the
packed bf16 multiply that scales the codes (`mul.rn.bf16x2`) is an sm_90 instruction.

The GEMV (`gemv_4bit.py`) widens every decoded code to fp32 for an FMA; here each byte's two
codes stay one scaled 16-bit pair (`decode_4bit.decode_pairs`, one packed multiply by the
block's absmax) and go to the MMA as they are, the rows of x riding along as its N side (8 per
MMA; BLOCK_M of them, every warp reading the whole x tile, from L1 after the first).

Each lane decodes 16 bytes of each of its two rows per 128 values of K straight into its A
fragment, in the K order of `fragment_4bit.py`; x's B fragment is read in that same order (lane
(n, c) loads x[n, 32c .. 32c + 31], contiguous), so the product is exact."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from engine.kernels.decode_4bit import load_code_table
from engine.kernels.fragment_4bit import (
    STEP_VALUES,
    a_fragment,
    lane_coordinates,
    load_words,
    weight_pointers,
    x_in_fragment_order,
)


@gluon.jit
def _step(
    acc, packed, scale, xs, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16: gl.constexpr,
    A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr,
):  # fmt: skip
    """acc[rows, BLOCK_M] += W_step @ x_step^T for one step's loaded words [w, h, g, c, word],
    scales [w, h, g, c] and x values [n, c, value]."""
    a = a_fragment(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, A_LAYOUT)
    b = gl.convert_layout(gl.permute(x_in_fragment_order(xs), [1, 0]), B_LAYOUT)
    return mma_v2(a, b, acc)


# Not specialized on M (row counts vary per eager step; see wgmma_4bit.py).
@gluon.jit(do_not_specialize=["M"])
def mma_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr,
    PREFETCH: gl.constexpr,
):  # fmt: skip
    """out [SPLIT_K, M, N] (fp32 partials) or [M, N] = x [M <= BLOCK_M, K] @ W^T; 16 weight rows
    per warp, BLOCK_M (a multiple of 8) rows of x as BLOCK_M / 8 MMAs per 16 values of K.
    PREFETCH: request the next iteration's weight bytes before decoding this one's."""
    W: gl.constexpr = gl.num_warps()
    # x values [n, c, value]: lane 4 (n % 8) + c, rows n + 8i in its registers; every warp
    # loads the whole tile (from L1 after the first), so no exchange through shared memory.
    x_layout: gl.constexpr = gl.BlockedLayout([1, 1, 32], [8, 4, 1], [1, 1, W], [2, 1, 0])
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[2, 0], warps_per_cta=[W, 1], instr_shape=[16, 8]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(0, mma_layout, 2)
    b_layout: gl.constexpr = gl.DotOperandLayout(1, mma_layout, 2)

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * 16 * W

    local_rows, c, word, table_lane = lane_coordinates(W)
    rows = gl.minimum(n0 + local_rows, N - 1)  # rows past N re-read the last; never stored
    w_ptrs, s_ptrs = weight_pointers(
        w_ptr, absmax_ptr, rows, c, word, stride_w, stride_a, BLOCKSIZE
    )
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(table_ptr, table_lane, X_FP16)
    chunk_end = 32 * c + 32  # [1, 1, 1, 4]: the end of a lane's chunk, in values

    X0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, x_layout))
    X1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, x_layout))
    X2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, x_layout))
    x_n = gl.expand_dims(gl.expand_dims(gl.arange(0, BLOCK_M, layout=X0), 1), 2)
    x_c = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=X1), 0), 2)
    x_v = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=X2), 0), 1)
    x_chunk = 32 * x_c  # [1, 4, 1]: a lane's 32 consecutive values, one 64-byte run
    # Unmasked loads (a masked one zeroes its registers first): rows past M re-read row M - 1,
    # whose products land in columns that are never stored; chunks past K re-read K's last
    # chunk, which meets zero weights there (their scales load as 0).
    x_rows = x_ptr + gl.minimum(x_n, M - 1) * stride_xm + x_v

    acc = gl.zeros([16 * W, BLOCK_M], gl.float32, layout=mma_layout)
    stride: gl.constexpr = STEP_VALUES * SPLIT_K
    # Two steps per iteration, both steps' bytes requested before either is decoded; with
    # PREFETCH the next iteration's two as well (a register double buffer). Values past K are
    # masked per 16-byte chunk: their bytes decode to some finite code, their scales to 0.
    k0 = pid_k * STEP_VALUES
    packed0, scale0 = load_words(w_ptrs, s_ptrs, k0, K, chunk_end, BLOCKSIZE)
    packed1, scale1 = load_words(w_ptrs, s_ptrs, k0 + stride, K, chunk_end, BLOCKSIZE)
    for k0 in range(pid_k * STEP_VALUES, K, 2 * stride):
        k1 = k0 + stride
        if PREFETCH:
            next0, next_scale0 = load_words(w_ptrs, s_ptrs, k1 + stride, K, chunk_end, BLOCKSIZE)
            next1, next_scale1 = load_words(
                w_ptrs, s_ptrs, k1 + 2 * stride, K, chunk_end, BLOCKSIZE
            )
        if BLOCK_M == 8:  # few x registers: request both steps' x with the weights
            xs0 = gl.load(x_rows + gl.minimum(k0 + x_chunk, K - 32))
            xs1 = gl.load(x_rows + gl.minimum(k1 + x_chunk, K - 32))
        else:  # a step's x tile is BLOCK_M / 2 registers a lane: one at a time
            xs0 = gl.load(x_rows + gl.minimum(k0 + x_chunk, K - 32))
        acc = _step(
            acc, packed0, scale0, xs0, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16,
            a_layout, b_layout,
        )  # fmt: skip
        if BLOCK_M != 8:
            xs1 = gl.load(x_rows + gl.minimum(k1 + x_chunk, K - 32))
        acc = _step(
            acc, packed1, scale1, xs1, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16,
            a_layout, b_layout,
        )  # fmt: skip
        if PREFETCH:
            packed0, scale0, packed1, scale1 = next0, next_scale0, next1, next_scale1
        else:
            packed0, scale0 = load_words(w_ptrs, s_ptrs, k1 + stride, K, chunk_end, BLOCKSIZE)
            packed1, scale1 = load_words(w_ptrs, s_ptrs, k1 + 2 * stride, K, chunk_end, BLOCKSIZE)

    o_n = n0 + gl.arange(0, 16 * W, layout=gl.SliceLayout(1, mma_layout))
    o_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma_layout))
    o_ptrs = (
        out_ptr + pid_k * stride_ok + gl.expand_dims(o_m * stride_om, 0) + gl.expand_dims(o_n, 1)
    )
    o_ok = gl.expand_dims(o_m < M, 0) & gl.expand_dims(o_n < N, 1)
    gl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)
