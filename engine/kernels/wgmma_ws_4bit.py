"""The warpgroup 4-bit matmul, warp-specialized: the same tiles, copies and MMAs as
`wgmma_4bit.py`, but decoding and MMA issue run in different warps.

In the plain kernel one warpgroup does everything in turn (wait for its bytes, decode, store the
tile, barrier, issue the MMA, wait for the previous one, barrier, copy ahead), one warp per
scheduler: its profile issues an instruction every ~4 cycles, waiting on itself. Here:
- the decoder warps (a worker partition, `KernelConfig.decode_warps` of them) copy each step's
  packed bytes, absmax and x tile into shared memory with `cp.async`, decode their own bytes
  into a ring of DECODE_TILES 16-bit weight tiles and arrive on the tile's `decoded` barrier;
- the MMA warpgroup (the default partition, holding the accumulator) waits for a tile, starts
  its MMA asynchronously and, once the MMA before it has finished, arrives on that one's
  `mma_done` barrier: its weight tile and its x stage may be refilled.
Step i reuses step i - DECODE_TILES's tile and stage, so the decoders run up to DECODE_TILES
steps ahead of the MMAs and copy NUM_STAGES - DECODE_TILES steps ahead. Each partition gets its
own register budget (the accumulator lives only in the MMA warps).

Measured on an H200 it is no faster than the plain kernel except on a few layer shapes at
128-256 rows (README, "Per-layer linear time"): switching its parts off showed the copies, not
the decode, taking most of the time."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma_wait,
)

from engine.kernels.decode_4bit import load_code_table
from engine.kernels.wgmma_4bit import (
    acc_layout,
    allocate_stages,
    byte_layout,
    copy_step,
    decode_stage,
    operand_pointers,
    pair_layout,
    start_mma,
    store_out,
    tile_layouts,
    x_copy_layout,
)


@gluon.jit
def mma_partition(
    w_tiles, x_stages, decoded, mma_done, n_steps, ACC_LAYOUT: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, W_LEFT: gl.constexpr, ready=None, free=None,
):  # fmt: skip
    """The accumulator over this program's K steps, one asynchronous MMA in flight. With a
    stage's `ready` and `free` barriers (the TMA-fed kernel), it waits for x's tile to land and
    frees the stage once its MMA is done; else the decoders' copies and mma_done see to both."""
    TILES: gl.constexpr = w_tiles.shape[0]
    STAGES: gl.constexpr = x_stages.shape[0]
    if W_LEFT:
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=ACC_LAYOUT)
    else:
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=ACC_LAYOUT)
    for i in range(n_steps):
        stage = i % STAGES
        mbarrier.wait(decoded.index(i % TILES), (i // TILES) & 1)
        if ready is not None:
            # x's tile landed with the bytes the decoders waited for; this warpgroup observes
            # the barrier itself before its MMA reads the tile (the stage is not refilled
            # before then).
            mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        acc = start_mma(w_tiles.index(i % TILES), x_stages.index(stage), acc, W_LEFT)
        acc = warpgroup_mma_wait(1, deps=[acc])
        # Step i - 1's MMA is done: its weight tile and x stage are free.
        mbarrier.arrive(mma_done.index((i + TILES - 1) % TILES), count=1, pred=i > 0)
        if free is not None:
            mbarrier.arrive(free.index((i + STAGES - 1) % STAGES), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(0, deps=[acc])
    return (acc,)  # a partition's results are a tuple


@gluon.jit
def _decode_partition(
    x_ptr, w_ptr, absmax_ptr, table_ptr, M, N, stride_xm, stride_w, stride_a, n_steps,
    w_staging, s_staging, x_staging, w_pairs, decoded, mma_done, BLOCKSIZE: gl.constexpr,
    X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    SPLIT_K: gl.constexpr, NUM_STAGES: gl.constexpr,
):  # fmt: skip
    """Copy every step's operands ahead and decode its weight bytes into a tile, up to TILES
    steps ahead of the MMAs. Step i's tile and stage are step i - TILES's, so copies run
    NUM_STAGES - TILES steps ahead. Tiles, layouts and copies are the plain kernel's
    (wgmma_4bit), over this partition's warps."""
    num_warps: gl.constexpr = gl.num_warps()  # this partition's
    TILES: gl.constexpr = w_pairs.shape[0]
    AHEAD: gl.constexpr = NUM_STAGES - TILES
    w_layout: gl.constexpr = byte_layout(BLOCK_K, num_warps)
    pairs_layout: gl.constexpr = pair_layout(BLOCK_K, num_warps)
    w_ptrs, s_ptrs, x_ptrs, x_ok, table_lane = operand_pointers(
        x_ptr, w_ptr, absmax_ptr, M, N, stride_xm, stride_w, stride_a, BLOCKSIZE, BLOCK_M,
        BLOCK_N, BLOCK_K, w_layout, x_copy_layout(BLOCK_K, num_warps),
    )  # fmt: skip
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(table_ptr, table_lane, X_FP16)
    pid_k = gl.program_id(2)

    for j in gl.static_range(AHEAD):
        copy_step(
            j, n_steps, w_staging, s_staging, x_staging, w_ptrs, s_ptrs, x_ptrs, x_ok, pid_k,
            SPLIT_K, BLOCK_K, BLOCKSIZE,
        )  # fmt: skip
    for i in range(n_steps):
        stage = i % NUM_STAGES
        async_copy.wait_group(AHEAD - 1)  # this thread's copies for step i have landed
        pairs = decode_stage(
            w_staging, s_staging, stage, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, w_layout,
            pairs_layout,
        )  # fmt: skip
        # Step i - TILES's MMA read this tile and the stage refilled below: wait for its end
        # (the MMA warps see it once they have started the MMA after it).
        lag = gl.maximum(i - TILES, 0)
        mbarrier.wait(mma_done.index(lag % TILES), (lag // TILES) & 1, pred=i >= TILES)
        w_pairs.index(i % TILES).store(pairs)
        fence_async_shared()  # the tile and this step's copies, before the MMA reads them
        mbarrier.arrive(decoded.index(i % TILES), count=1)
        copy_step(
            i + AHEAD, n_steps, w_staging, s_staging, x_staging, w_ptrs, s_ptrs, x_ptrs, x_ok,
            pid_k, SPLIT_K, BLOCK_K, BLOCKSIZE,
        )  # fmt: skip
    async_copy.wait_group(0)  # no copy outlives the program


@gluon.jit
def allocate_tile_ring(
    dtype: gl.constexpr, TILES: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr
):  # fmt: skip
    """The ring of decoded weight tiles (as 16-bit values, and as the int32 pairs the decoders
    write) and its hand-over barriers, initialised: `decoded[t]` when tile t is written,
    `mma_done[t]` when the MMA that read it is over."""
    tile_smem: gl.constexpr = tile_layouts(BLOCK_K)[0]
    pairs_smem: gl.constexpr = tile_layouts(BLOCK_K)[1]
    w_tiles = gl.allocate_shared_memory(dtype, [TILES, BLOCK_N, BLOCK_K], tile_smem)
    w_pairs = w_tiles._reinterpret(gl.int32, [TILES, BLOCK_N, BLOCK_K // 2], pairs_smem)
    decoded = gl.allocate_shared_memory(gl.int64, [TILES, 1], mbarrier.MBarrierLayout())
    mma_done = gl.allocate_shared_memory(gl.int64, [TILES, 1], mbarrier.MBarrierLayout())
    for b in gl.static_range(TILES):
        mbarrier.init(decoded.index(b), count=1)
        mbarrier.init(mma_done.index(b), count=1)
    return w_tiles, w_pairs, decoded, mma_done


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
    accumulator: gl.constexpr = acc_layout(W_LEFT, BLOCK_M, BLOCK_N, num_warps)
    w_staging, s_staging, x_staging = allocate_stages(dtype, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K)
    w_tiles, w_pairs, decoded, mma_done = allocate_tile_ring(dtype, DECODE_TILES, BLOCK_N, BLOCK_K)

    pid_k = gl.program_id(2)
    n_steps = (K // BLOCK_K - pid_k + SPLIT_K - 1) // SPLIT_K
    (acc,) = gl.warp_specialize(
        [
            (
                mma_partition,
                (w_tiles, x_staging, decoded, mma_done, n_steps, accumulator, BLOCK_M,
                 BLOCK_N, W_LEFT),
            ),
            (
                _decode_partition,
                (x_ptr, w_ptr, absmax_ptr, table_ptr, M, N, stride_xm, stride_w, stride_a,
                 n_steps, w_staging, s_staging, x_staging, w_pairs, decoded, mma_done,
                 BLOCKSIZE, X_FP16, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, NUM_STAGES),
            ),
        ],
        [DECODE_WARPS],
        [DECODE_REGS],
    )  # fmt: skip

    store_out(acc, out_ptr, M, N, stride_om, stride_ok, accumulator, W_LEFT, BLOCK_M, BLOCK_N)
