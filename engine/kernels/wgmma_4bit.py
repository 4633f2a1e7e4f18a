"""The larger-batch 4-bit matmul on Hopper tensor cores: a Gluon kernel that stages the decoded
weights in shared memory itself, so the weight bytes are read once, coalesced, 16 per thread.

Per K step of BLOCK_K values, each thread copies 16 packed bytes (32 values of one row, under
one absmax) of the [BLOCK_N, BLOCK_K] weight tile, their absmax and its part of x's
[BLOCK_M, BLOCK_K] tile into shared memory with `cp.async`, NUM_STAGES - 1 steps ahead of the
step it computes: a decode kernel keeps few bytes in flight per thread, and without the copies
running ahead it waits on HBM latency, not bandwidth. To compute a step, each thread reads its
own bytes back, decodes them in registers straight into scaled 16-bit pairs in K order
(`decode_4bit.decode_pairs`) and stores them to a 128-byte-swizzled weight tile; warpgroup
MMAs read it and x's staged tile:
- W_LEFT: out^T[BLOCK_N, BLOCK_M] += W x^T, the weight tile as the MMA's 64-row side and the
  batch as its N (8-256), so a small batch does not pay for 64 rows of tensor-core work;
- else: out[BLOCK_M, BLOCK_N] += x W^T, BLOCK_M = 16 * num_warps rows of x.
While step i's MMA runs, the threads wait for step i+1's bytes and decode them into registers;
the tile is stored once the MMA is done. An MMA left in flight across the store to the tile it
reads made ptxas serialize every MMA of the kernel (each HGMMA waited on alone, with no
warning); a store to another tile does not (the two-tile trial below kept its MMAs chained).
Steps need NUM_STAGES >= 3 (step i+1's copies land while step i's stage is read).

Within one program the decode does not in fact overlap the MMA: in the SASS of every shipped
launch ptxas moves the next step's decode (register-only work) below the wait for a step's
MMAs. The overlap comes from the other programs on the SM (a 64-row launch uses 71 KB of shared
memory: three fit). MMA_IN_FLIGHT (`mma_in_flight` in a config) moves the wait itself: each
step's MMAs stay in flight across the next step's decode and copies and the loop's back edge,
and are waited for as that step begins, just before its tile store (and the copies ahead are
started right after the MMAs are issued, not after the decode). The SASS then has the
decode between a step's last MMA and the wait (and the MMAs still chained; both checked by
tests/kernels/test_wgmma_compiles_for_hopper.py); whether it is faster is for the tuner
(`--twins`) to measure.

Two decoded tiles, with each step waiting only for the MMA before its own, did overlap them
within a program, but the extra tile cost a program per SM and the launches were slower,
11-28% a layer at 64 rows; with fewer stages to keep three programs an SM, no faster (H100;
README, "Per-layer linear time"). MMA_IN_FLIGHT gets that overlap with one tile."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from engine.kernels.decode_4bit import decode_pairs, load_code_table


@gluon.jit
def copy_step(
    i, n_steps, w_staging, s_staging, x_staging, w_ptrs, s_ptrs, x_ptrs, x_ok, pid_k,
    SPLIT_K: gl.constexpr, BLOCK_K: gl.constexpr, BLOCKSIZE: gl.constexpr,
):  # fmt: skip
    """Start copying step i's weight bytes, scales and x tile into its stage (i modulo the
    stages); a step past this program's last copies nothing (but still commits a group, so
    group counts stay in step)."""
    stage = i % w_staging.shape[0]
    k = (pid_k + i * SPLIT_K) * BLOCK_K
    live = i < n_steps
    async_copy.async_copy_global_to_shared(w_staging.index(stage), w_ptrs + k // 2, mask=live)
    async_copy.async_copy_global_to_shared(
        s_staging.index(stage), s_ptrs + k // BLOCKSIZE, mask=live
    )
    async_copy.async_copy_global_to_shared(x_staging.index(stage), x_ptrs + k, mask=x_ok & live)
    async_copy.commit_group()


@gluon.jit
def decode_stage(
    w_staging, s_staging, stage, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16: gl.constexpr,
    W_LAYOUT: gl.constexpr, PAIR_LAYOUT: gl.constexpr,
):  # fmt: skip
    """This thread's staged bytes of one stage, decoded into scaled 16-bit pairs [n, byte pair]
    in the layout the threads store the weight tile in."""
    packed = w_staging.index(stage).load(W_LAYOUT)
    scale = s_staging.index(stage).load(gl.SliceLayout(2, W_LAYOUT))
    return decode_tile_rows(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, PAIR_LAYOUT)


@gluon.jit
def decode_tile_rows(
    packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16: gl.constexpr,
    PAIR_LAYOUT: gl.constexpr,
):  # fmt: skip
    """Packed bytes [n, chunk, byte] and their absmax [n, chunk] -> scaled 16-bit pairs
    [n, byte pair] in the layout the threads store the weight tile in."""
    pairs = decode_pairs(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16)
    shape: gl.constexpr = [pairs.shape[0], pairs.shape[1] * pairs.shape[2]]
    return gl.convert_layout(gl.reshape(pairs, shape), PAIR_LAYOUT)


@gluon.jit
def start_mma(w_tile, x_tile, acc, W_LEFT: gl.constexpr):
    """acc += this step's product, asynchronously: out^T += W x^T (W_LEFT) or out += x W^T."""
    if W_LEFT:
        acc = warpgroup_mma(w_tile, x_tile.permute((1, 0)), acc, is_async=True)
    else:
        acc = warpgroup_mma(x_tile, w_tile.permute((1, 0)), acc, is_async=True)
    return acc


@gluon.jit
def _mma_step(
    i, n_steps, pairs, acc, w_staging, s_staging, x_staging, w_tile, w_pairs, w_ptrs, s_ptrs,
    x_ptrs, x_ok, pid_k, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16: gl.constexpr,
    W_LAYOUT: gl.constexpr, PAIR_LAYOUT: gl.constexpr, W_LEFT: gl.constexpr,
    NUM_STAGES: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_K: gl.constexpr,
    BLOCKSIZE: gl.constexpr, MMA_IN_FLIGHT: gl.constexpr,
):  # fmt: skip
    """Step i, its bytes already decoded (`pairs`): store its weight tile and run its MMA;
    meanwhile wait for step i+1's bytes and decode them (returned); then start copying the step
    NUM_STAGES - 1 ahead into the stage step i-1 read.

    MMA_IN_FLIGHT: `acc` comes in with step i-1's MMAs still running and leaves with step i's;
    they are waited for here, just before the tile they read is rewritten, and the copies start
    as soon as step i's MMAs are issued (the stage they fill was read by step i-1's, now done).
    Else step i's are waited for once the decode is done, and ptxas, free to schedule
    register-only work past that wait, moves the decode below it: then a program never decodes
    under its own MMAs."""
    if MMA_IN_FLIGHT:
        acc = warpgroup_mma_wait(0, deps=[acc])
        if gl.num_warps() > 4:
            gl.thread_barrier()  # the other warpgroup's MMA reads the tile rewritten next
    w_pairs.store(pairs)
    fence_async_shared()
    # The tile and every thread's part of x's stage are written, and (each warpgroup having
    # waited for its own) every MMA of step i-1 is done.
    gl.thread_barrier()
    acc = start_mma(w_tile, x_staging.index(i % NUM_STAGES), warpgroup_mma_init(acc), W_LEFT)
    if MMA_IN_FLIGHT:
        copy_step(
            i + NUM_STAGES - 1, n_steps, w_staging, s_staging, x_staging, w_ptrs, s_ptrs,
            x_ptrs, x_ok, pid_k, SPLIT_K, BLOCK_K, BLOCKSIZE,
        )  # fmt: skip
        async_copy.wait_group(NUM_STAGES - 2)
    else:
        async_copy.wait_group(NUM_STAGES - 3)  # this thread's copies for step i+1 have landed
    pairs = decode_stage(
        w_staging, s_staging, (i + 1) % NUM_STAGES, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16,
        W_LAYOUT, PAIR_LAYOUT,
    )  # fmt: skip
    if not MMA_IN_FLIGHT:
        acc = warpgroup_mma_wait(0, deps=[acc])
        if gl.num_warps() > 4:
            gl.thread_barrier()  # the other warpgroup's MMA reads the tile the next step rewrites
        copy_step(
            i + NUM_STAGES - 1, n_steps, w_staging, s_staging, x_staging, w_ptrs, s_ptrs,
            x_ptrs, x_ok, pid_k, SPLIT_K, BLOCK_K, BLOCKSIZE,
        )  # fmt: skip
    return pairs, acc


@gluon.constexpr_function
def byte_layout(block_k, num_warps):
    """Registers of a step's packed weight bytes [n, chunk, byte]: 16 bytes (32 values under one
    absmax) a thread, the block_k // 32 chunks of a row on neighbouring lanes."""
    chunks = block_k // 32
    return gl.BlockedLayout([1, 1, 16], [32 // chunks, chunks, 1], [num_warps, 1, 1], [2, 1, 0])


@gluon.constexpr_function
def pair_layout(block_k, num_warps):
    """Registers of the decoded 16-bit pairs [n, byte pair], as each thread stores them."""
    chunks = block_k // 32
    return gl.BlockedLayout([1, 16], [32 // chunks, chunks], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def x_copy_layout(block_k, num_warps):
    """x's tile [m, k] as the threads copy it: 8 values (16 bytes) a copy."""
    return gl.BlockedLayout([1, 8], [32 // (block_k // 8), block_k // 8], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def acc_layout(w_left, block_m, block_n, num_warps):
    """The accumulator: out^T [block_n, block_m] with the weights as the MMA's 64-row side
    (w_left), else out [block_m, block_n]."""
    n = block_m if w_left else block_n
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16]
    )


@gluon.constexpr_function
def tile_layouts(block_k):
    """Shared layouts of x's staged tiles and the decoded weight tiles (128-byte swizzled for the
    MMA), and of a weight tile seen as int32 pairs, as the decoders write it."""
    swizzle = 128 if block_k * 2 >= 128 else block_k * 2
    return gl.NVMMASharedLayout(swizzle, 16, 2), gl.NVMMASharedLayout(swizzle, 32, 2)


@gluon.jit
def allocate_stages(
    dtype: gl.constexpr, NUM_STAGES: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
):  # fmt: skip
    """The copy stages: the raw bytes and scales as each thread copies them (it alone reads them
    back), x's tiles swizzled for the MMA. (A buffer of stages takes the layout of one stage.)"""
    chunks: gl.constexpr = BLOCK_K // 32
    w_staging = gl.allocate_shared_memory(
        gl.uint8, [NUM_STAGES, BLOCK_N, chunks, 16], gl.SwizzledSharedLayout(16, 1, 1, [2, 1, 0])
    )
    s_staging = gl.allocate_shared_memory(
        gl.float32, [NUM_STAGES, BLOCK_N, chunks], gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
    )
    x_staging = gl.allocate_shared_memory(
        dtype, [NUM_STAGES, BLOCK_M, BLOCK_K], tile_layouts(BLOCK_K)[0]
    )
    return w_staging, s_staging, x_staging


@gluon.jit
def operand_pointers(
    x_ptr, w_ptr, absmax_ptr, M, N, stride_xm, stride_w, stride_a, BLOCKSIZE: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
    W_LAYOUT: gl.constexpr, X_LAYOUT: gl.constexpr,
):  # fmt: skip
    """Step 0's pointers to this program's weight bytes [n, chunk, byte], their absmax [n, chunk]
    and x's tile [m, k], which rows of x are real, and each weight row's index [n, 1, 1] (the
    lane `load_code_table` takes)."""
    chunks: gl.constexpr = BLOCK_K // 32
    s_layout: gl.constexpr = gl.SliceLayout(2, W_LAYOUT)
    w_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    w_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, s_layout))
    w_b = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, W_LAYOUT)))
    w_rows = gl.minimum(gl.program_id(0) * BLOCK_N + w_n, N - 1)
    w_ptrs = (
        w_ptr + gl.expand_dims(gl.expand_dims(w_rows * stride_w, 1), 2)
        + gl.expand_dims(gl.expand_dims(w_c * 16, 0), 2) + gl.expand_dims(gl.expand_dims(w_b, 0), 1)
    )  # fmt: skip
    # The absmax block of each chunk's first value (k is a multiple of BLOCK_K, and BLOCK_K and
    # the blocksize are powers of two, so the step's block index adds on).
    s_block = gl.expand_dims(w_c * 32, 0) // BLOCKSIZE
    s_ptrs = absmax_ptr + gl.expand_dims(w_rows * stride_a, 1) + s_block
    x_m = gl.program_id(1) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, X_LAYOUT))
    x_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, X_LAYOUT))
    x_ptrs = x_ptr + gl.expand_dims(x_m * stride_xm, 1) + gl.expand_dims(x_k, 0)
    x_ok = gl.expand_dims(x_m < M, 1)  # rows past M are copied as zeros
    return w_ptrs, s_ptrs, x_ptrs, x_ok, gl.expand_dims(gl.expand_dims(w_n, 1), 2)


@gluon.jit
def store_out(
    acc, out_ptr, M, N, stride_om, stride_ok, ACC_LAYOUT: gl.constexpr, W_LEFT: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
):  # fmt: skip
    """Write this program's tile (out^T if W_LEFT) into out, or into its split's partials."""
    m0 = gl.program_id(1) * BLOCK_M
    n0 = gl.program_id(0) * BLOCK_N
    if W_LEFT:
        o_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ACC_LAYOUT))
        o_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, ACC_LAYOUT))
        o_offs = gl.expand_dims(o_m * stride_om, 0) + gl.expand_dims(o_n, 1)
        o_ok = gl.expand_dims(o_m < M, 0) & gl.expand_dims(o_n < N, 1)
    else:
        o_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ACC_LAYOUT))
        o_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ACC_LAYOUT))
        o_offs = gl.expand_dims(o_m * stride_om, 1) + gl.expand_dims(o_n, 0)
        o_ok = gl.expand_dims(o_m < M, 1) & gl.expand_dims(o_n < N, 0)
    pid_k = gl.program_id(2)
    gl.store(out_ptr + pid_k * stride_ok + o_offs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


# Not specialized on M: eager steps (prefill chunks and mixed steps) bring row counts no CUDA
# graph bucket had, and each new specialization compiles for seconds inside a request.
@gluon.jit(do_not_specialize=["M"])
def wgmma_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr, W_LEFT: gl.constexpr,
    NUM_STAGES: gl.constexpr, MMA_IN_FLIGHT: gl.constexpr = False,
):  # fmt: skip
    """out [SPLIT_K, M, N] (fp32 partials) or [M, N] = x [M, K] @ W^T; K % BLOCK_K == 0."""
    num_warps: gl.constexpr = gl.num_warps()
    chunks: gl.constexpr = BLOCK_K // 32  # 16-byte chunks per weight row per step
    gl.static_assert(BLOCK_N >= (32 // chunks) * num_warps, "fewer weight rows than threads")
    gl.static_assert(NUM_STAGES >= 3, "copies run at least two steps ahead")
    w_layout: gl.constexpr = byte_layout(BLOCK_K, num_warps)
    x_layout: gl.constexpr = x_copy_layout(BLOCK_K, num_warps)
    accumulator: gl.constexpr = acc_layout(W_LEFT, BLOCK_M, BLOCK_N, num_warps)
    w_staging, s_staging, x_staging = allocate_stages(
        x_ptr.dtype.element_ty, NUM_STAGES, BLOCK_M, BLOCK_N, BLOCK_K
    )
    # The weight tile, written as int32 pairs and read as 16-bit values.
    smem_layout: gl.constexpr = tile_layouts(BLOCK_K)[0]
    pair_smem_layout: gl.constexpr = tile_layouts(BLOCK_K)[1]
    w_tile = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [BLOCK_N, BLOCK_K], smem_layout)
    w_pairs = w_tile._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], pair_smem_layout)

    pid_k = gl.program_id(2)
    w_ptrs, s_ptrs, x_ptrs, x_ok, table_lane = operand_pointers(
        x_ptr, w_ptr, absmax_ptr, M, N, stride_xm, stride_w, stride_a, BLOCKSIZE, BLOCK_M,
        BLOCK_N, BLOCK_K, w_layout, x_layout,
    )  # fmt: skip
    # This dtype's table (code_table), one copy per lane.
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(table_ptr, table_lane, X_FP16)

    if W_LEFT:
        acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=accumulator)
    else:
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=accumulator)
    if MMA_IN_FLIGHT:  # the loop carries the accumulator with its MMAs in flight
        acc = warpgroup_mma_init(acc)
    n_steps = (K // BLOCK_K - pid_k + SPLIT_K - 1) // SPLIT_K
    for j in gl.static_range(NUM_STAGES - 1):
        copy_step(
            j, n_steps, w_staging, s_staging, x_staging, w_ptrs, s_ptrs, x_ptrs, x_ok, pid_k,
            SPLIT_K, BLOCK_K, BLOCKSIZE,
        )  # fmt: skip
    pairs_layout: gl.constexpr = pair_layout(BLOCK_K, num_warps)
    async_copy.wait_group(NUM_STAGES - 2)  # this thread's copies for step 0 have landed
    pairs = decode_stage(
        w_staging, s_staging, 0, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, w_layout, pairs_layout
    )  # fmt: skip
    for i in range(n_steps):
        pairs, acc = _mma_step(
            i, n_steps, pairs, acc, w_staging, s_staging, x_staging, w_tile, w_pairs, w_ptrs,
            s_ptrs, x_ptrs, x_ok, pid_k, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, w_layout,
            pairs_layout, W_LEFT, NUM_STAGES, SPLIT_K, BLOCK_K, BLOCKSIZE, MMA_IN_FLIGHT,
        )  # fmt: skip
    if MMA_IN_FLIGHT:  # the tiles the last MMAs read stay allocated until they are done
        acc, _, _ = warpgroup_mma_wait(0, deps=[acc, w_tile, x_staging])
    async_copy.wait_group(0)  # no copy outlives the program
    store_out(acc, out_ptr, M, N, stride_om, stride_ok, accumulator, W_LEFT, BLOCK_M, BLOCK_N)
