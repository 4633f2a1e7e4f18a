"""The small-batch 4-bit matmul on tensor cores, all in registers: a Gluon kernel feeding decoded
weights straight into `mma.sync` (m16n8k16), no shared memory and no barriers. Hopper: the
packed bf16 multiply that scales the codes (`mul.rn.bf16x2`) is an sm_90 instruction.

The GEMV (`gemv_4bit.py`) widens every decoded code to fp32 for an FMA; here each byte's two
codes stay one scaled 16-bit pair (`decode_4bit.decode_pairs`, one packed multiply by the
block's absmax) and go to the MMA as they are, the rows of x riding along as its N side (8 per
MMA; BLOCK_M of them, every warp reading the whole x tile, from L1 after the first).

A warp owns 16 weight rows; lane (g, c) = (lane / 4, lane % 4) holds rows g and g + 8 — the rows
the MMA's A fragment gives it. Per step of 128 values it loads 16 consecutive bytes of each row
(bytes 16c..16c+15, one 128-bit load, under one absmax). An MMA sums over K in any order, so the
kernel lets K run in the order the lanes hold it: within a step, physical k = 16j + 8h + 2c + e
is value 32c + 4j + 2h + e of the row (byte 16c + 2j + h, nibble e). x's B fragment is read in
that same order (lane (n, c) loads x[n, 32c .. 32c + 31], contiguous), so the product is exact."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from engine.kernels.decode_4bit import decode_word_pairs, load_code_table

_UNPACK = gl.constexpr("mov.b32 {$0, $1}, $2;")  # a pair register as its two 16-bit halves
STEP_VALUES = gl.constexpr(128)  # K per step: 16 bytes per lane and row, 4 lanes per row


@gluon.jit
def _step(
    acc, packed, scale, xs, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16: gl.constexpr,
    A_LAYOUT: gl.constexpr, B_LAYOUT: gl.constexpr,
):  # fmt: skip
    """acc[rows, BLOCK_M] += W_step @ x_step^T for one step's loaded words [w, h, g, c, word],
    scales [w, h, g, c] and x values [n, c, value]."""
    pairs = decode_word_pairs(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16)
    even, odd = gl.inline_asm_elementwise(
        _UNPACK, "=h,=h,r", [pairs], dtype=(xs.dtype, xs.dtype), is_pure=True, pack=1
    )
    w = gl.join(even, odd)  # [w, h, g, c, word, 2, 2, nibble]: byte = 4 word + ...
    # byte = 2j + h2 -> [w, h, g, c, j, h2, nibble] -> [w, h, g, j, h2, c, nibble]
    w = gl.reshape(w, [w.shape[0], 2, 8, 4, 8, 2, 2])
    w = gl.permute(w, [0, 1, 2, 4, 5, 3, 6])
    a = gl.convert_layout(gl.reshape(w, [w.shape[0] * 16, 128]), A_LAYOUT)
    # x [n, c, value = 4j + 2h2 + nibble] -> [n, j, h2, c, nibble] -> B [128, n]
    n: gl.constexpr = xs.shape[0]
    x = gl.permute(gl.reshape(xs, [n, 4, 8, 2, 2]), [0, 2, 3, 1, 4])
    b = gl.convert_layout(gl.permute(gl.reshape(x, [n, 128]), [1, 0]), B_LAYOUT)
    return mma_v2(a, b, acc)


@gluon.jit
def _load_step(w_ptrs, s_ptrs, k, K, chunk_end, BLOCKSIZE: gl.constexpr):
    """A step's weight words [w, h, g, c, word] and absmax [w, h, g, c]: zeros for the 16-byte
    chunks past K, which request nothing."""
    ok = k + chunk_end <= K
    packed = gl.load(w_ptrs + k // 8, mask=gl.expand_dims(ok, 4), other=0)
    scale = gl.load(s_ptrs + k // BLOCKSIZE, mask=ok, other=0.0)
    return packed, scale


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
    # Weight bytes as int32 words [w, h, g, c, word]: row 16w + 8h + g; lane 4g + c; 16 bytes
    # per lane and row. Words, not bytes: bytes kept across loop iterations would be re-packed
    # into registers one by one.
    w_layout: gl.constexpr = gl.BlockedLayout(
        [1, 2, 1, 1, 4], [1, 1, 8, 4, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0]
    )
    s_layout: gl.constexpr = gl.SliceLayout(4, w_layout)
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

    L0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, s_layout)))
    L1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, s_layout)))
    L2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, s_layout)))
    L3: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, s_layout)))
    r_w = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, W, layout=L0), 1), 2), 3)
    r_h = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 2, layout=L1), 0), 2), 3)
    r_g = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=L2), 0), 1), 3)
    c = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=L3), 0), 1), 2)
    local_rows = 16 * r_w + 8 * r_h + r_g  # [w, h, g, 1]
    rows = gl.minimum(n0 + local_rows, N - 1)  # rows past N re-read the last; never stored
    word = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
        2, gl.SliceLayout(3, w_layout)))))  # fmt: skip
    word = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(word, 0), 1), 2), 3)
    chunk_ptrs = w_ptr + gl.expand_dims(rows * stride_w + 16 * c, 4)  # 16-byte aligned
    w_ptrs = chunk_ptrs.to(gl.pointer_type(gl.int32), bitcast=True) + word
    s_ptrs = absmax_ptr + rows * stride_a + (32 * c) // BLOCKSIZE
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(
        table_ptr, gl.expand_dims(4 * r_g + c, 4), X_FP16
    )
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
    packed0, scale0 = _load_step(w_ptrs, s_ptrs, k0, K, chunk_end, BLOCKSIZE)
    packed1, scale1 = _load_step(w_ptrs, s_ptrs, k0 + stride, K, chunk_end, BLOCKSIZE)
    for k0 in range(pid_k * STEP_VALUES, K, 2 * stride):
        k1 = k0 + stride
        if PREFETCH:
            next0, next_scale0 = _load_step(w_ptrs, s_ptrs, k1 + stride, K, chunk_end, BLOCKSIZE)
            next1, next_scale1 = _load_step(
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
            packed0, scale0 = _load_step(w_ptrs, s_ptrs, k1 + stride, K, chunk_end, BLOCKSIZE)
            packed1, scale1 = _load_step(w_ptrs, s_ptrs, k1 + 2 * stride, K, chunk_end, BLOCKSIZE)

    o_n = n0 + gl.arange(0, 16 * W, layout=gl.SliceLayout(1, mma_layout))
    o_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma_layout))
    o_ptrs = (
        out_ptr + pid_k * stride_ok + gl.expand_dims(o_m * stride_om, 0) + gl.expand_dims(o_n, 1)
    )
    o_ok = gl.expand_dims(o_m < M, 0) & gl.expand_dims(o_n < N, 1)
    gl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)
