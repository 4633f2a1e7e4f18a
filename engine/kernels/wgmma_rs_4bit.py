"""The batch-16-to-256 4-bit matmul on Hopper tensor cores with the decoded weights never leaving
registers: a Gluon kernel feeding them to warpgroup MMAs as the register operand ("RS"), the
batch's x tile resident in shared memory as the other. No weight tile in shared memory and no
barrier in the main loop.

A program owns ROW_TILES tiles of 16 * num_warps weight rows and one split of K. It first copies
x's rows for its split into shared memory, once, then streams each row tile's packed bytes from
HBM into registers (the next step's requested before this one's is decoded) and runs one MMA
per 128 values of K: W's rows as the MMA's M side (64 per warpgroup), the batch as its N.

The register operand of a warpgroup MMA has, per warp, the layout of `mma.sync`'s A fragment, so
the K order trick of `mma_4bit.py` carries over: each lane decodes 16 consecutive bytes of its
two rows into scaled 16-bit pairs that are, as they stand, its fragment, with physical k =
16j + 8h + 2c + e holding value 32c + 4j + 2h + e of each 128-value step. x is stored in shared
memory in that same order (permuted in registers while it is copied in), so the product is
exact. Shared memory holds BLOCK_M x STEPS x 128 values of x, which bounds BLOCK_M times the K
of a split (`matmul_4bit.fits`)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from engine.kernels.decode_4bit import decode_word_pairs, load_code_table

STEP_VALUES = gl.constexpr(128)  # K per MMA: 16 bytes per lane and row, 4 lanes per row
_UNPACK = gl.constexpr("mov.b32 {$0, $1}, $2;")  # a pair register as its two 16-bit halves


@gluon.jit
def _load_words(w_ptrs, s_ptrs, k, k_end, chunk_end, BLOCKSIZE: gl.constexpr):
    """A step's weight words [w, h, g, c, word] and absmax [w, h, g, c]: zeros for the 16-byte
    chunks past k_end, which request nothing."""
    ok = k + chunk_end <= k_end
    packed = gl.load(w_ptrs + k // 8, mask=gl.expand_dims(ok, 4), other=0)
    scale = gl.load(s_ptrs + k // BLOCKSIZE, mask=ok, other=0.0)
    return packed, scale


@gluon.jit
def _a_operand(
    packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16: gl.constexpr, A_LAYOUT: gl.constexpr,
):  # fmt: skip
    """One step's words -> the MMA's register operand [16 * num_warps, 128] in physical K order."""
    pairs = decode_word_pairs(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16)
    half = gl.float16 if X_FP16 else gl.bfloat16
    even, odd = gl.inline_asm_elementwise(
        _UNPACK, "=h,=h,r", [pairs], dtype=(half, half), is_pure=True, pack=1
    )
    w = gl.join(even, odd)  # [w, h, g, c, word, 2, 2, nibble]: byte = 4 word + ...
    # byte = 2j + h2 -> [w, h, g, c, j, h2, nibble] -> [w, h, g, j, h2, c, nibble]
    w = gl.reshape(w, [w.shape[0], 2, 8, 4, 8, 2, 2])
    w = gl.permute(w, [0, 1, 2, 4, 5, 3, 6])
    return gl.convert_layout(gl.reshape(w, [w.shape[0] * 16, 128]), A_LAYOUT)


# Not specialized on M (row counts vary per eager step; see wgmma_4bit.py).
@gluon.jit(do_not_specialize=["M"])
def wgmma_rs_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr,
    ROW_TILES: gl.constexpr, SPLIT_K: gl.constexpr, STEPS: gl.constexpr, AHEAD: gl.constexpr,
):  # fmt: skip
    """out [SPLIT_K, M, N] (fp32 partials) or [M, N] = x [M <= BLOCK_M, K] @ W^T. STEPS: the
    128-value steps of K each split holds (cdiv(cdiv(K, 128), SPLIT_K)). AHEAD (1 or 2): steps
    whose weight bytes are requested before a step is decoded (a program is one or two
    warpgroups, and x's shared memory limits how many fit on an SM, so few threads must keep
    enough bytes in flight)."""
    W: gl.constexpr = gl.num_warps()
    rows_per_tile: gl.constexpr = 16 * W
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    # Weight words [w, h, g, c, word]: row 16w + 8h + g; lane 4g + c; 16 bytes per lane and row.
    w_layout: gl.constexpr = gl.BlockedLayout(
        [1, 2, 1, 1, 4], [1, 1, 8, 4, 1], [W, 1, 1, 1, 1], [4, 3, 2, 1, 0]
    )
    s_layout: gl.constexpr = gl.SliceLayout(4, w_layout)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[W, 1], instr_shape=[16, BLOCK_M, 16]
    )
    a_layout: gl.constexpr = gl.DotOperandLayout(0, acc_layout, 2)
    # x's copy in: [row, c, value], each lane 32 consecutive values of a row, warps over rows.
    x_rows: gl.constexpr = BLOCK_M if BLOCK_M < 8 * W else 8 * W
    x_layout: gl.constexpr = gl.BlockedLayout([1, 1, 32], [8, 4, 1], [W, 1, 1], [2, 1, 0])
    x_smem = gl.allocate_shared_memory(
        dtype, [STEPS, BLOCK_M, 128], gl.NVMMASharedLayout(128, 16, 2)
    )

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    first_step = pid_k * STEPS

    # x's rows for this split, once, in physical K order. Rows past M re-read row M - 1 (their
    # products land in columns never stored); values past K are zeros.
    X0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, x_layout))
    X1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, x_layout))
    X2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, x_layout))
    x_r = gl.expand_dims(gl.expand_dims(gl.arange(0, x_rows, layout=X0), 1), 2)
    x_c = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=X1), 0), 2)
    x_v = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=X2), 0), 1)
    for s in range(STEPS):
        k0 = (first_step + s) * STEP_VALUES
        for r0 in gl.static_range(0, BLOCK_M, x_rows):
            rows = gl.minimum(r0 + x_r, M - 1)
            k = k0 + 32 * x_c + x_v
            xs = gl.load(x_ptr + rows * stride_xm + k, mask=k < K, other=0.0)
            # [r, c, value = 4j + 2h2 + e] -> [r, j, h2, c, e]: physical 16j + 8h2 + 2c + e
            xs = gl.permute(gl.reshape(xs, [x_rows, 4, 8, 2, 2]), [0, 2, 3, 1, 4])
            x_smem.index(s).slice(r0, x_rows, dim=0).store(gl.reshape(xs, [x_rows, 128]))
    fence_async_shared()
    gl.thread_barrier()  # x is written, by every thread, before any MMA reads it

    L0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, s_layout)))
    L1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, s_layout)))
    L2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, s_layout)))
    L3: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, s_layout)))
    r_w = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, W, layout=L0), 1), 2), 3)
    r_h = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 2, layout=L1), 0), 2), 3)
    r_g = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=L2), 0), 1), 3)
    c = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=L3), 0), 1), 2)
    local_rows = 16 * r_w + 8 * r_h + r_g  # [w, h, g, 1]
    word = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
        2, gl.SliceLayout(3, w_layout)))))  # fmt: skip
    word = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(word, 0), 1), 2), 3)
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(
        table_ptr, gl.expand_dims(4 * r_g + c, 4), X_FP16
    )
    chunk_end = 32 * c + 32  # [1, 1, 1, 4]: the end of a lane's chunk, in values
    n_steps = gl.minimum(STEPS, (K + STEP_VALUES - 1) // STEP_VALUES - first_step)
    # The steps requested ahead stop at this split's end (the next split's bytes are not ours).
    k_end = gl.minimum(K, (first_step + STEPS) * STEP_VALUES)

    o_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
    o_local = gl.arange(0, rows_per_tile, layout=gl.SliceLayout(1, acc_layout))
    for t in range(ROW_TILES):
        n0 = (pid_n * ROW_TILES + t) * rows_per_tile
        rows = gl.minimum(n0 + local_rows, N - 1)  # rows past N re-read the last; never stored
        chunk_ptrs = w_ptr + gl.expand_dims(rows * stride_w + 16 * c, 4)  # 16-byte aligned
        w_ptrs = chunk_ptrs.to(gl.pointer_type(gl.int32), bitcast=True) + word
        s_ptrs = absmax_ptr + rows * stride_a + (32 * c) // BLOCKSIZE
        k = first_step * STEP_VALUES
        packed, scale = _load_words(w_ptrs, s_ptrs, k, k_end, chunk_end, BLOCKSIZE)
        if AHEAD == 2:
            k += STEP_VALUES
            packed1, scale1 = _load_words(w_ptrs, s_ptrs, k, k_end, chunk_end, BLOCKSIZE)
        acc = gl.zeros([rows_per_tile, BLOCK_M], gl.float32, layout=acc_layout)
        a_prev = gl.zeros([rows_per_tile, 128], dtype, layout=a_layout)
        for s in range(n_steps):
            k += STEP_VALUES
            # Later steps' bytes are requested before this one's are decoded.
            next_packed, next_scale = _load_words(w_ptrs, s_ptrs, k, k_end, chunk_end, BLOCKSIZE)
            a = _a_operand(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, a_layout)
            acc = warpgroup_mma(a, x_smem.index(s).permute((1, 0)), acc, is_async=True)
            # The previous MMA is done, so its operand's registers may be reused: the wait keeps
            # them alive until here. This one's stay alive (a_prev) until the next wait; the
            # MMA runs on while the next step decodes.
            acc, a_prev = warpgroup_mma_wait(1, deps=[acc, a_prev])
            a_prev = a
            if AHEAD == 2:
                packed, scale, packed1, scale1 = packed1, scale1, next_packed, next_scale
            else:
                packed, scale = next_packed, next_scale
        acc, a_prev = warpgroup_mma_wait(0, deps=[acc, a_prev])

        o_n = n0 + o_local
        o_offs = gl.expand_dims(o_m * stride_om, 0) + gl.expand_dims(o_n, 1)
        o_ok = gl.expand_dims(o_m < M, 0) & gl.expand_dims(o_n < N, 1)
        gl.store(out_ptr + pid_k * stride_ok + o_offs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)
