"""The warpgroup 4-bit matmul, warp-specialized: the same tiles, copies and MMAs as
`wgmma_4bit.py`, but decoding and MMA issue run in different warps.

In the plain kernel one warpgroup does everything in turn (wait for its bytes, decode, store the
tile, barrier, issue the MMA, wait for the previous one, barrier, copy ahead), one warp per
scheduler: its profile issues an instruction every ~4 cycles, waiting on itself. Here:
- the decoder warps (a worker partition, `KernelConfig.decode_warps` of them) copy each step's
  packed bytes, absmax and x tile into shared memory with `cp.async`, NUM_STAGES - 1 steps
  ahead, decode their own bytes into one of two 16-bit weight tiles and arrive on its
  `decoded` barrier;
- the MMA warpgroup (the default partition, holding the accumulator) waits for a tile, starts
  its MMA asynchronously and, once the MMA before it has finished, arrives on that one's
  `mma_done` barrier: its weight tile and its x stage may be refilled.
The decoders decode step i while step i - 1's MMA runs, and only wait for that MMA before
copying into the stage it read. Each partition gets its own register budget (the accumulator
lives only in the MMA warps)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from engine.kernels.decode_4bit import decode_pairs, load_code_table
from engine.kernels.wgmma_4bit import _copy_step


@gluon.jit
def _mma_partition(
    w_tiles, x_staging, decoded, mma_done, n_steps, ACC_LAYOUT: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, W_LEFT: gl.constexpr,
    NUM_STAGES: gl.constexpr,
):  # fmt: skip
    """The accumulator over this program's K steps, one asynchronous MMA in flight."""
    TILES: gl.constexpr = w_tiles.shape[0]
    if W_LEFT:
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=ACC_LAYOUT)
    else:
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=ACC_LAYOUT)
    for i in range(n_steps):
        mbarrier.wait(decoded.index(i % TILES), (i // TILES) & 1)
        w_tile = w_tiles.index(i % TILES)
        x_tile = x_staging.index(i % NUM_STAGES)
        if W_LEFT:
            acc = warpgroup_mma(w_tile, x_tile.permute((1, 0)), acc, is_async=True)
        else:
            acc = warpgroup_mma(x_tile, w_tile.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        # Step i - 1's MMA is done: its weight tile and x stage are free.
        mbarrier.arrive(mma_done.index((i + TILES - 1) % TILES), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(0, deps=[acc])
    return (acc,)  # a partition's results are a tuple


@gluon.jit
def _decode_partition(
    x_ptr, w_ptr, absmax_ptr, table_ptr, M, N, K, stride_xm, stride_w, stride_a, n_steps,
    w_staging, s_staging, x_staging, w_pairs, decoded, mma_done, BLOCKSIZE: gl.constexpr,
    X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    SPLIT_K: gl.constexpr, NUM_STAGES: gl.constexpr,
):  # fmt: skip
    """Copy every step's operands ahead and decode its weight bytes into a tile, up to TILES
    steps ahead of the MMAs. Step i's tile and stage are step i - TILES's, so copies run
    NUM_STAGES - TILES steps ahead."""
    num_warps: gl.constexpr = gl.num_warps()  # this partition's
    TILES: gl.constexpr = w_pairs.shape[0]
    AHEAD: gl.constexpr = NUM_STAGES - TILES
    chunks: gl.constexpr = BLOCK_K // 32  # 16-byte chunks per weight row per step
    # Registers: [n, chunk, byte] for the weight bytes, [n, byte pair] for their 16-bit pairs
    # (the layouts of wgmma_4bit, over this partition's warps).
    w_layout: gl.constexpr = gl.BlockedLayout(
        [1, 1, 16], [32 // chunks, chunks, 1], [num_warps, 1, 1], [2, 1, 0]
    )
    s_layout: gl.constexpr = gl.SliceLayout(2, w_layout)
    pair_layout: gl.constexpr = gl.BlockedLayout(
        [1, 16], [32 // chunks, chunks], [num_warps, 1], [1, 0]
    )
    x_layout: gl.constexpr = gl.BlockedLayout(
        [1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [num_warps, 1], [1, 0]
    )
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)

    w_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    w_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, s_layout))
    w_b = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_layout)))
    w_rows = gl.minimum(pid_n * BLOCK_N + w_n, N - 1)
    w_ptrs = (
        w_ptr + gl.expand_dims(gl.expand_dims(w_rows * stride_w, 1), 2)
        + gl.expand_dims(gl.expand_dims(w_c * 16, 0), 2) + gl.expand_dims(gl.expand_dims(w_b, 0), 1)
    )  # fmt: skip
    s_block = gl.expand_dims(w_c * 32, 0) // BLOCKSIZE  # each chunk's absmax block
    s_ptrs = absmax_ptr + gl.expand_dims(w_rows * stride_a, 1) + s_block
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(
        table_ptr, gl.expand_dims(gl.expand_dims(w_n, 1), 2), X_FP16
    )
    x_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
    x_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_ptrs = x_ptr + gl.expand_dims(x_m * stride_xm, 1) + gl.expand_dims(x_k, 0)
    x_ok = gl.expand_dims(x_m < M, 1)  # rows past M are copied as zeros

    for j in gl.static_range(AHEAD):
        _copy_step(
            j, n_steps, w_staging.index(j), s_staging.index(j), x_staging.index(j), w_ptrs,
            s_ptrs, x_ptrs, x_ok, pid_k, SPLIT_K, BLOCK_K, BLOCKSIZE,
        )  # fmt: skip
    for i in range(n_steps):
        stage = i % NUM_STAGES
        async_copy.wait_group(AHEAD - 1)  # this thread's copies for step i have landed
        packed = w_staging.index(stage).load(w_layout)
        scale = s_staging.index(stage).load(s_layout)
        pairs = decode_pairs(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16)
        shape: gl.constexpr = [pairs.shape[0], pairs.shape[1] * pairs.shape[2]]
        pairs = gl.convert_layout(gl.reshape(pairs, shape), pair_layout)
        # Step i - TILES's MMA read this tile and the stage refilled below: wait for its end
        # (the MMA warps see it once they have started the MMA after it).
        lag = gl.maximum(i - TILES, 0)
        mbarrier.wait(mma_done.index(lag % TILES), (lag // TILES) & 1, pred=i >= TILES)
        w_pairs.index(i % TILES).store(pairs)
        fence_async_shared()  # the tile and this step's copies, before the MMA reads them
        mbarrier.arrive(decoded.index(i % TILES), count=1)
        ahead = i + AHEAD
        refill = ahead % NUM_STAGES
        _copy_step(
            ahead, n_steps, w_staging.index(refill), s_staging.index(refill),
            x_staging.index(refill), w_ptrs, s_ptrs, x_ptrs, x_ok, pid_k, SPLIT_K, BLOCK_K,
            BLOCKSIZE,
        )  # fmt: skip
    async_copy.wait_group(0)  # no copy outlives the program


# Not specialized on M (row counts vary per eager step; see wgmma_4bit.py).
@gluon.jit(do_not_specialize=["M"])
def wgmma_ws_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr, W_LEFT: gl.constexpr,
    NUM_STAGES: gl.constexpr, DECODE_WARPS: gl.constexpr, DECODE_REGS: gl.constexpr,
    DECODE_TILES: gl.constexpr,
):  # fmt: skip
    """out [SPLIT_K, M, N] (fp32 partials) or [M, N] = x [M, K] @ W^T; K % BLOCK_K == 0.
    num_warps (4) issue the MMAs; DECODE_WARPS more copy and decode, into a ring of
    DECODE_TILES weight tiles; copies run NUM_STAGES - DECODE_TILES steps ahead."""
    num_warps: gl.constexpr = gl.num_warps()
    chunks: gl.constexpr = BLOCK_K // 32
    gl.static_assert(num_warps == 4, "one warpgroup issues the MMAs")
    gl.static_assert(BLOCK_N >= (32 // chunks) * DECODE_WARPS, "fewer weight rows than threads")
    gl.static_assert(NUM_STAGES > DECODE_TILES, "copies run at least one step ahead")
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    if W_LEFT:  # acc = out^T: weight rows along the MMA's M, the batch along its N
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16]
        )
    else:
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
        )
    swizzle: gl.constexpr = 128 if BLOCK_K * 2 >= 128 else BLOCK_K * 2
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle, 16, 2)
    pair_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle, 32, 2)
    w_staging = gl.allocate_shared_memory(
        gl.uint8, [NUM_STAGES, BLOCK_N, chunks, 16], gl.SwizzledSharedLayout(16, 1, 1, [2, 1, 0])
    )
    s_staging = gl.allocate_shared_memory(
        gl.float32, [NUM_STAGES, BLOCK_N, chunks], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    x_staging = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], smem_layout)
    w_tiles = gl.allocate_shared_memory(dtype, [DECODE_TILES, BLOCK_N, BLOCK_K], smem_layout)
    w_pairs = w_tiles._reinterpret(
        gl.int32, [DECODE_TILES, BLOCK_N, BLOCK_K // 2], pair_smem_layout
    )
    decoded = gl.allocate_shared_memory(gl.int64, [DECODE_TILES, 1], mbarrier.MBarrierLayout())
    mma_done = gl.allocate_shared_memory(gl.int64, [DECODE_TILES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(DECODE_TILES):
        mbarrier.init(decoded.index(b), count=1)
        mbarrier.init(mma_done.index(b), count=1)

    pid_k = gl.program_id(2)
    n_steps = (K // BLOCK_K - pid_k + SPLIT_K - 1) // SPLIT_K
    (acc,) = gl.warp_specialize(
        [
            (
                _mma_partition,
                (w_tiles, x_staging, decoded, mma_done, n_steps, acc_layout, BLOCK_M,
                 BLOCK_N, W_LEFT, NUM_STAGES),
            ),
            (
                _decode_partition,
                (x_ptr, w_ptr, absmax_ptr, table_ptr, M, N, K, stride_xm, stride_w, stride_a,
                 n_steps, w_staging, s_staging, x_staging, w_pairs, decoded, mma_done,
                 BLOCKSIZE, X_FP16, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, NUM_STAGES),
            ),
        ],
        [DECODE_WARPS],
        [DECODE_REGS],
    )  # fmt: skip

    m0 = gl.program_id(1) * BLOCK_M
    n0 = gl.program_id(0) * BLOCK_N
    if W_LEFT:
        o_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, acc_layout))
        o_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
        o_offs = gl.expand_dims(o_m * stride_om, 0) + gl.expand_dims(o_n, 1)
        o_ok = gl.expand_dims(o_m < M, 0) & gl.expand_dims(o_n < N, 1)
    else:
        o_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
        o_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
        o_offs = gl.expand_dims(o_m * stride_om, 1) + gl.expand_dims(o_n, 0)
        o_ok = gl.expand_dims(o_m < M, 1) & gl.expand_dims(o_n < N, 0)
    gl.store(out_ptr + pid_k * stride_ok + o_offs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)
