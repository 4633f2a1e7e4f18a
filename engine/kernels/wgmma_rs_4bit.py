"""The batch-16-to-256 4-bit matmul on Hopper tensor cores with the decoded weights never leaving
registers: a Gluon kernel feeding them to warpgroup MMAs as the register operand ("RS"), the
batch's x tile resident in shared memory as the other. No weight tile in shared memory and no
barrier in the main loop.

A program owns ROW_TILES tiles of 16 * num_warps weight rows and one split of K. It first copies
x's rows for its split into shared memory, once, then streams each row tile's packed bytes from
HBM into registers (the next step's requested before this one's is decoded) and runs one MMA
per 128 values of K: W's rows as the MMA's M side (64 per warpgroup), the batch as its N.

The register operand of a warpgroup MMA has, per warp, the layout of `mma.sync`'s A fragment, so
the K order of `fragment_4bit.py` carries over: each lane decodes 16 consecutive bytes of its
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

from engine.kernels.decode_4bit import load_code_table
from engine.kernels.fragment_4bit import (
    STEP_VALUES,
    a_fragment,
    lane_coordinates,
    load_words,
    weight_pointers,
    x_in_fragment_order,
)


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
            x_smem.index(s).slice(r0, x_rows, dim=0).store(x_in_fragment_order(xs))
    fence_async_shared()
    gl.thread_barrier()  # x is written, by every thread, before any MMA reads it

    local_rows, c, word, table_lane = lane_coordinates(W)
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(table_ptr, table_lane, X_FP16)
    chunk_end = 32 * c + 32  # [1, 1, 1, 4]: the end of a lane's chunk, in values
    n_steps = gl.minimum(STEPS, (K + STEP_VALUES - 1) // STEP_VALUES - first_step)
    # The steps requested ahead stop at this split's end (the next split's bytes are not ours).
    k_end = gl.minimum(K, (first_step + STEPS) * STEP_VALUES)

    o_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
    o_local = gl.arange(0, rows_per_tile, layout=gl.SliceLayout(1, acc_layout))
    for t in range(ROW_TILES):
        n0 = (pid_n * ROW_TILES + t) * rows_per_tile
        rows = gl.minimum(n0 + local_rows, N - 1)  # rows past N re-read the last; never stored
        w_ptrs, s_ptrs = weight_pointers(
            w_ptr, absmax_ptr, rows, c, word, stride_w, stride_a, BLOCKSIZE
        )
        k = first_step * STEP_VALUES
        packed, scale = load_words(w_ptrs, s_ptrs, k, k_end, chunk_end, BLOCKSIZE)
        if AHEAD == 2:
            k += STEP_VALUES
            packed1, scale1 = load_words(w_ptrs, s_ptrs, k, k_end, chunk_end, BLOCKSIZE)
        acc = gl.zeros([rows_per_tile, BLOCK_M], gl.float32, layout=acc_layout)
        a_prev = gl.zeros([rows_per_tile, 128], dtype, layout=a_layout)
        for s in range(n_steps):
            k += STEP_VALUES
            # Later steps' bytes are requested before this one's are decoded.
            next_packed, next_scale = load_words(w_ptrs, s_ptrs, k, k_end, chunk_end, BLOCKSIZE)
            a = a_fragment(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, a_layout)
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
