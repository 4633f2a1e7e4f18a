"""The warpgroup 4-bit matmul with its operands brought in by the Tensor Memory Accelerator: the
tiles, decode and MMAs of `wgmma_ws_4bit.py`, without the per-thread copies.

Switching parts of the warp-specialized kernel off showed its `cp.async` copies taking over half
its time: every thread computes addresses and issues 16-byte copies of the weight bytes and of
x's tile (which every program streams again from L2). Here one loader warp issues two TMA copies
per K step, the packed weight bytes [BLOCK_N, BLOCK_K / 2] and x's tile [BLOCK_M, BLOCK_K]
(swizzled as the MMA reads it), into a ring of NUM_STAGES stages whose `ready` barrier counts
their bytes. Rows past N or M arrive as zeros.
- The decoder warps (`DECODE_WARPS`) wait for a stage, read their 16 bytes a thread, scale them
  by the absmax (loaded from global memory a step ahead: a TMA box needs 16 contiguous bytes, a
  step's absmax per row is 4-8), and store the decoded pairs into a ring of DECODE_TILES tiles.
- The MMA warpgroup (the default partition) waits for a decoded tile, runs the MMA against the
  stage's x tile and, once the MMA before it is done, frees that step's stage and tile.
The descriptors are built on the host (`matmul_4bit._launch_wgmma_tma`); inside a CUDA graph
they are kernel parameters captured with the launch.

Measured on an H200 it beats the plain and the cp.async-fed kernels from 128 rows (about 11% per
layer) but not below (README, "Per-layer linear time"); Nsight Compute finds it issuing about
0.3 instructions per cycle per scheduler with a quarter of its shared-memory wavefronts lost to
bank conflicts."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
)

from engine.kernels.decode_4bit import load_code_table
from engine.kernels.wgmma_4bit import (
    acc_layout,
    byte_layout,
    decode_tile_rows,
    pair_layout,
    store_out,
)
from engine.kernels.wgmma_ws_4bit import allocate_tile_ring, mma_partition


@gluon.constexpr_function
def packed_tile_layout(block_k):
    """Shared layout of a stage's packed weight bytes [n, block_k / 2], as TMA writes them."""
    return gl.NVMMASharedLayout(block_k // 2, 8, 2)


@gluon.jit
def _load_partition(
    w_desc, x_desc, w_stages, x_stages, ready, free, n_steps, SPLIT_K: gl.constexpr,
    BLOCK_K: gl.constexpr,
):  # fmt: skip
    """Issue every step's two TMA copies once the MMA that last read its stage is done."""
    STAGES: gl.constexpr = w_stages.shape[0]
    n0 = gl.program_id(0) * w_desc.block_type.shape[0]
    m0 = gl.program_id(1) * x_desc.block_type.shape[0]
    pid_k = gl.program_id(2)
    step_bytes: gl.constexpr = w_desc.block_type.nbytes + x_desc.block_type.nbytes
    for i in range(n_steps):
        stage = i % STAGES
        # Round r of a stage waits for round r - 1's MMA (a fresh barrier passes parity 1).
        mbarrier.wait(free.index(stage), ((i // STAGES) & 1) ^ 1)
        k = (pid_k + i * SPLIT_K) * BLOCK_K
        mbarrier.expect(ready.index(stage), step_bytes)
        tma.async_copy_global_to_shared(w_desc, [n0, k // 2], ready.index(stage),
                                        w_stages.index(stage))  # fmt: skip
        tma.async_copy_global_to_shared(x_desc, [m0, k], ready.index(stage), x_stages.index(stage))


@gluon.jit
def _decode_partition(
    absmax_ptr, table_ptr, N, stride_a, n_steps, w_stages, w_pairs, ready, decoded, mma_done,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr,
):  # fmt: skip
    """Decode each landed stage's bytes into the tile ring, up to TILES steps ahead of the
    MMAs."""
    num_warps: gl.constexpr = gl.num_warps()  # this partition's
    STAGES: gl.constexpr = w_stages.shape[0]
    TILES: gl.constexpr = w_pairs.shape[0]
    BLOCK_N: gl.constexpr = w_stages.shape[1]
    chunks: gl.constexpr = BLOCK_K // 32
    w_layout: gl.constexpr = byte_layout(BLOCK_K, num_warps)
    # The same registers as w_layout over the stage's 2-D bytes [n, chunk * 16].
    flat_layout: gl.constexpr = gl.BlockedLayout(
        [1, 16], [32 // chunks, chunks], [num_warps, 1], [1, 0]
    )
    s_layout: gl.constexpr = gl.SliceLayout(2, w_layout)  # [n, chunk]: one absmax a thread
    pairs_layout: gl.constexpr = pair_layout(BLOCK_K, num_warps)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    # Each thread's copy of the code table: the one its first weight row names.
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(
        table_ptr, gl.expand_dims(gl.expand_dims(rows, 1), 2), X_FP16
    )
    # The absmax block of each chunk's first value; rows past N re-read the last row's.
    s_rows = gl.minimum(gl.program_id(0) * BLOCK_N + rows, N - 1)
    s_chunks = gl.arange(0, chunks, layout=gl.SliceLayout(0, s_layout))
    s_ptrs = (
        absmax_ptr + gl.expand_dims(s_rows * stride_a, 1)
        + gl.expand_dims(s_chunks * 32, 0) // BLOCKSIZE
    )  # fmt: skip
    pid_k = gl.program_id(2)
    scale = gl.load(s_ptrs + (pid_k * BLOCK_K) // BLOCKSIZE)
    for i in range(n_steps):
        # The next step's absmax, requested before this step's bytes are waited for.
        k_next = (pid_k + (i + 1) * SPLIT_K) * BLOCK_K
        next_scale = gl.load(s_ptrs + k_next // BLOCKSIZE, mask=i + 1 < n_steps, other=0.0)
        stage = i % STAGES
        mbarrier.wait(ready.index(stage), (i // STAGES) & 1)
        flat = w_stages.index(stage).load(flat_layout)
        packed = gl.convert_layout(gl.reshape(flat, [BLOCK_N, chunks, 16]), w_layout)
        pairs = decode_tile_rows(
            packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, pairs_layout
        )  # fmt: skip
        # Step i - TILES's MMA read this tile: wait for its end.
        lag = gl.maximum(i - TILES, 0)
        mbarrier.wait(mma_done.index(lag % TILES), (lag // TILES) & 1, pred=i >= TILES)
        w_pairs.index(i % TILES).store(pairs)
        fence_async_shared()  # the tile, before the MMA reads it
        mbarrier.arrive(decoded.index(i % TILES), count=1)
        scale = next_scale


# Not specialized on M (row counts vary per eager step; see wgmma_4bit.py).
@gluon.jit(do_not_specialize=["M"])
def wgmma_tma_4bit_kernel(
    x_desc, w_desc, x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr, W_LEFT: gl.constexpr,
    NUM_STAGES: gl.constexpr, DECODE_WARPS: gl.constexpr, DECODE_REGS: gl.constexpr,
    DECODE_TILES: gl.constexpr, LOADER_REGS: gl.constexpr,
):  # fmt: skip
    """out [SPLIT_K, M, N] (fp32 partials) or [M, N] = x [M, K] @ W^T; K % BLOCK_K == 0.
    x_desc: x [M, K] in blocks [BLOCK_M, BLOCK_K]; w_desc: the packed bytes [N, K / 2] in blocks
    [BLOCK_N, BLOCK_K / 2]; the other arguments are the plain kernels' (w_ptr unused: the bytes
    come through w_desc). num_warps (4) issue the MMAs, DECODE_WARPS decode, one warp loads."""
    num_warps: gl.constexpr = gl.num_warps()
    chunks: gl.constexpr = BLOCK_K // 32
    gl.static_assert(num_warps == 4, "one warpgroup issues the MMAs")
    gl.static_assert(BLOCK_N >= (32 // chunks) * DECODE_WARPS, "fewer weight rows than threads")
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    accumulator: gl.constexpr = acc_layout(W_LEFT, BLOCK_M, BLOCK_N, num_warps)
    w_stages = gl.allocate_shared_memory(
        gl.uint8, [NUM_STAGES, BLOCK_N, BLOCK_K // 2], w_desc.layout
    )
    x_stages = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w_tiles, w_pairs, decoded, mma_done = allocate_tile_ring(dtype, DECODE_TILES, BLOCK_N, BLOCK_K)
    # A stage is `ready` once its bytes have landed and `free` once the MMA that read it is over.
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(free.index(s), count=1)
    fence_async_shared()  # the barriers are initialised before TMA signals them

    pid_k = gl.program_id(2)
    n_steps = (K // BLOCK_K - pid_k + SPLIT_K - 1) // SPLIT_K
    (acc,) = gl.warp_specialize(
        [
            (
                mma_partition,
                (w_tiles, x_stages, decoded, mma_done, n_steps, accumulator, BLOCK_M,
                 BLOCK_N, W_LEFT, ready, free),
            ),
            (
                _decode_partition,
                (absmax_ptr, table_ptr, N, stride_a, n_steps, w_stages, w_pairs, ready, decoded,
                 mma_done, BLOCKSIZE, X_FP16, BLOCK_K, SPLIT_K),
            ),
            (
                _load_partition,
                (w_desc, x_desc, w_stages, x_stages, ready, free, n_steps, SPLIT_K, BLOCK_K),
            ),
        ],
        [DECODE_WARPS, 1],
        [DECODE_REGS, LOADER_REGS],
    )  # fmt: skip

    store_out(acc, out_ptr, M, N, stride_om, stride_ok, accumulator, W_LEFT, BLOCK_M, BLOCK_N)
