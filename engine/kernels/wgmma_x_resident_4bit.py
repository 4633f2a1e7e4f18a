"""The warpgroup 4-bit matmul with x held in shared memory: each program keeps one K slice of x
resident and streams weight tiles past it.

The plain kernel (`wgmma_4bit.py`) copies x's tile again with every weight tile, so every
program streams all of x from L2: at 64 rows and 64-row weight tiles that is four times the
weight bytes it meets, and with its parts switched off the copies alone took most of its time
(README, "Per-layer linear time"). Here the grid is split over K instead: program (slice s, p)
copies x[:, slice s] into shared memory once (`SLICE_STEPS` tiles of [BLOCK_M, BLOCK_K],
swizzled for the MMA), then takes weight tiles p, p + P, ... of that slice in turn, writing
each tile's fp32 partial sum to out[s] (the dispatcher sums the slices, as for split K). Only
weight bytes and their absmax stream through the copy stages, so the same shared memory holds
many more of them in flight. x crosses L2 once per program instead of once per weight tile.

Each K step is the plain kernel's with MMA_OVERLAP, weights as the MMA's 64-row side (the
batch is its N, at most BLOCK_M rows): the thread's 16 bytes (32 values under one absmax) come
in by `cp.async` NUM_STAGES - 1 steps ahead, across tile boundaries, are decoded in registers
into scaled 16-bit pairs (`decode_4bit.decode_pairs`) while the previous step's MMA runs, and
stored to one of two swizzled weight tiles, the one whose MMA (two steps back) is done."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma_wait,
)

from engine.kernels.decode_4bit import load_code_table
from engine.kernels.wgmma_4bit import (
    acc_layout,
    byte_layout,
    decode_stage,
    pair_layout,
    start_mma,
    tile_layouts,
    x_copy_layout,
)


@gluon.jit
def copy_weight_step(
    g, total, row0, k_step, slice_step0, slice_end, row_stride, w_staging, s_staging, w_ptr,
    absmax_ptr, w_n, w_cb, s_cb, N, stride_w, stride_a, BLOCK_K: gl.constexpr,
    BLOCKSIZE: gl.constexpr,
):  # fmt: skip
    """Start copying this program's g-th step, the K step k_step of the tile whose first row is
    row0: packed bytes [n, chunk, byte] and absmax [n, chunk] into stage g modulo the stages. A
    step past the last copies nothing but still commits a group, so group counts stay in step.
    Returns the next step's (row0, k_step): the slice's next K step, or its first one in the
    next tile (counters, not a division by the slice's length every step)."""
    stage = g % w_staging.shape[0]
    rows = gl.minimum(row0 + w_n, N - 1)
    w_row = gl.expand_dims(gl.expand_dims(rows * stride_w + k_step * (BLOCK_K // 2), 1), 2)
    s_row = gl.expand_dims(rows * stride_a + (k_step * BLOCK_K) // BLOCKSIZE, 1)
    live = g < total
    async_copy.async_copy_global_to_shared(w_staging.index(stage), w_ptr + w_row + w_cb, mask=live)
    async_copy.async_copy_global_to_shared(
        s_staging.index(stage), absmax_ptr + s_row + s_cb, mask=live
    )
    async_copy.commit_group()
    wrap = (k_step + 1 == slice_end).to(gl.int32)
    return row0 + wrap * row_stride, k_step + 1 - wrap * (slice_end - slice_step0)


# Not specialized on M, as the plain kernel (eager steps bring row counts no bucket had).
@gluon.jit(do_not_specialize=["M"])
def wgmma_x_resident_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, SLICE_STEPS: gl.constexpr, NUM_STAGES: gl.constexpr,
):  # fmt: skip
    """out [slices, M, N] (fp32 partials) or [M, N] (one slice) = x [M, K] @ W^T, M <= BLOCK_M,
    K % BLOCK_K == 0; a 1-D grid of slices * P programs, P the same for every slice."""
    num_warps: gl.constexpr = gl.num_warps()
    chunks: gl.constexpr = BLOCK_K // 32  # 16-byte chunks per weight row per step
    gl.static_assert(BLOCK_N >= (32 // chunks) * num_warps, "fewer weight rows than threads")
    gl.static_assert(NUM_STAGES >= 3, "copies run at least two steps ahead")
    w_layout: gl.constexpr = byte_layout(BLOCK_K, num_warps)
    s_layout: gl.constexpr = gl.SliceLayout(2, w_layout)
    x_layout: gl.constexpr = x_copy_layout(BLOCK_K, num_warps)
    accumulator: gl.constexpr = acc_layout(True, BLOCK_M, BLOCK_N, num_warps)
    pairs_layout: gl.constexpr = pair_layout(BLOCK_K, num_warps)
    tile_layout: gl.constexpr = tile_layouts(BLOCK_K)[0]
    dtype: gl.constexpr = x_ptr.dtype.element_ty

    # Which slice of K and which weight tiles are this program's.
    all_steps = K // BLOCK_K
    slices = gl.cdiv(all_steps, SLICE_STEPS)
    s = gl.program_id(0) % slices
    p = gl.program_id(0) // slices
    tile_stride = gl.num_programs(0) // slices
    slice_step0 = s * SLICE_STEPS
    steps = gl.minimum(all_steps - slice_step0, SLICE_STEPS)
    my_tiles = (gl.cdiv(N, BLOCK_N) - p + tile_stride - 1) // tile_stride
    total = my_tiles * steps

    x_slice = gl.allocate_shared_memory(dtype, [SLICE_STEPS, BLOCK_M, BLOCK_K], tile_layout)
    w_staging = gl.allocate_shared_memory(
        gl.uint8, [NUM_STAGES, BLOCK_N, chunks, 16], gl.SwizzledSharedLayout(16, 1, 1, [2, 1, 0])
    )
    s_staging = gl.allocate_shared_memory(
        gl.float32, [NUM_STAGES, BLOCK_N, chunks], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    # Two weight tiles, written as int32 pairs and read as 16-bit values.
    w_tiles = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_K], tile_layout)
    w_pairs = w_tiles._reinterpret(gl.int32, [2, BLOCK_N, BLOCK_K // 2], tile_layouts(BLOCK_K)[1])

    # x's slice: one copy group, committed before any weight step's (groups complete in order).
    x_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
    x_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_ptrs = (
        x_ptr + slice_step0 * BLOCK_K + gl.expand_dims(x_m * stride_xm, 1) + gl.expand_dims(x_k, 0)
    )  # fmt: skip
    x_ok = gl.expand_dims(x_m < M, 1)  # rows past M are copied as zeros
    for j in range(steps):
        async_copy.async_copy_global_to_shared(x_slice.index(j), x_ptrs + j * BLOCK_K, mask=x_ok)
    async_copy.commit_group()

    # Each thread's weight rows within a tile, and its bytes' and scales' offsets in a row.
    w_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    w_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, s_layout))
    w_b = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_layout)))
    w_cb = (
        gl.expand_dims(gl.expand_dims(w_c * 16, 0), 2) + gl.expand_dims(gl.expand_dims(w_b, 0), 1)
    )  # fmt: skip
    s_cb = gl.expand_dims(w_c * 32, 0) // BLOCKSIZE
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(
        table_ptr, gl.expand_dims(gl.expand_dims(w_n, 1), 2), X_FP16
    )
    # The next copy's tile (its first row) and K step; tiles p, p + P, ... of this slice.
    copy_row0 = p * BLOCK_N
    copy_k = slice_step0
    slice_end = slice_step0 + steps
    row_stride = tile_stride * BLOCK_N
    for j in gl.static_range(NUM_STAGES - 1):
        copy_row0, copy_k = copy_weight_step(
            j, total, copy_row0, copy_k, slice_step0, slice_end, row_stride, w_staging,
            s_staging, w_ptr, absmax_ptr, w_n, w_cb, s_cb, N, stride_w, stride_a, BLOCK_K,
            BLOCKSIZE,
        )  # fmt: skip
    async_copy.wait_group(NUM_STAGES - 2)  # x's slice and step 0's bytes have landed
    pairs = decode_stage(
        w_staging, s_staging, 0, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, w_layout, pairs_layout
    )  # fmt: skip

    o_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, accumulator))
    o_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, accumulator))
    o_rows = gl.expand_dims(o_m * stride_om, 0) + s * stride_ok
    o_m_ok = gl.expand_dims(o_m < M, 0)
    g = 0
    for t in range(my_tiles):
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=accumulator)
        for i in range(steps):
            w_pairs.index(g % 2).store(pairs)
            fence_async_shared()
            # The tile and x's slice are written, and every MMA of two steps back is done.
            gl.thread_barrier()
            acc = start_mma(w_tiles.index(g % 2), x_slice.index(i), acc, True)
            # The MMA of the step before is done (its tile is the next step's); this one runs
            # on while the next step's bytes are decoded.
            acc = warpgroup_mma_wait(1, deps=[acc])
            if num_warps > 4:
                gl.thread_barrier()  # and the other warpgroup's too
            # Into the stage step g-1 read (this thread decoded its bytes then; no MMA reads
            # it). Issued before the wait, which saves a barrier the compiler would add.
            copy_row0, copy_k = copy_weight_step(
                g + NUM_STAGES - 1, total, copy_row0, copy_k, slice_step0, slice_end,
                row_stride, w_staging, s_staging, w_ptr, absmax_ptr, w_n, w_cb, s_cb, N,
                stride_w, stride_a, BLOCK_K, BLOCKSIZE,
            )  # fmt: skip
            async_copy.wait_group(NUM_STAGES - 2)  # this thread's bytes for step g+1 landed
            pairs = decode_stage(
                w_staging, s_staging, (g + 1) % NUM_STAGES, t0, t1, t2, t3, t4, t5, t6, t7,
                X_FP16, w_layout, pairs_layout,
            )  # fmt: skip
            g += 1
        acc = warpgroup_mma_wait(0, deps=[acc])
        n = (p + t * tile_stride) * BLOCK_N + o_n
        o_ok = o_m_ok & gl.expand_dims(n < N, 1)
        out = acc.to(out_ptr.dtype.element_ty)
        gl.store(out_ptr + o_rows + gl.expand_dims(n, 1), out, mask=o_ok)
    async_copy.wait_group(0)  # no copy outlives the program
