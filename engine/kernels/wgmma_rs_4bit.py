"""The warpgroup 4-bit matmul with the decoded weights in registers: warpgroup MMAs whose A
operand is each lane's own decoded fragment (`fragment_4bit.py`) and whose B operand is x's
tile in shared memory, so no decoded weight touches shared memory.

The plain warpgroup kernel (`wgmma_4bit.py`) writes every decoded weight to a shared-memory tile
and has the MMA read it back, beside x's tile: by count about 36 KB of shared-memory traffic per
64 x 64 x 64 step, at 128 bytes a cycle about as long as the step's MMAs. Here a warp owns 16 weight
rows, as in the register `mma.sync` kernel (`mma_4bit.py`): each lane's 16 bytes per row and
step of 128 values decode straight into its part of the MMA's A fragment, in the K order the
lanes hold them. x's tile meets them in that order: it is copied into shared memory 4 bytes (one
pair of values) at a time, pair 16c + q of a step's 64 landing at pair 4q + c (`x_pair_offsets`).
A weight row is the MMA's M (64 per warpgroup), the batch its N (8-128 a tile).

Per step each thread copies its weight bytes, their absmax and its share of x's tile with
`cp.async` into a ring of NUM_STAGES stages, NUM_STAGES - 1 steps ahead, and waits for a step's
MMAs before it decodes the next (see the loop): the decode and the MMAs overlap across the
programs an SM holds, not within one."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
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
    weight_pointers,
    word_layout,
)


@gluon.constexpr_function
def x_pair_layout(block_m, num_warps):
    """x's tile as int32 pairs [m, pair] as the threads copy it. With 8 rows or more a warp:
    lane (r, c) holds pairs c, c + 4, ..., c + 60 of rows r, r + 8 * num_warps, ...: 16
    consecutive source pairs (16c + q for pair 4q + c), so a row's copies are one address plus
    immediates. Fewer rows (8 a warp would copy some twice): a warp's lanes along one row's 64
    pairs, each copy reading 4 runs of 32 bytes. (The first way, sm_90, 4 warps: 26 fewer loop
    instructions a step than the second at 64 rows, 5 fewer at 32, 22 more at 16.)"""
    if block_m >= 8 * num_warps:
        return gl.BlockedLayout([1, 1], [8, 4], [num_warps, 1], [1, 0])
    return gl.BlockedLayout([1, 1], [1, 32], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def accumulator_layout(block_m, num_warps):
    """out^T [16 * num_warps, block_m]: each warpgroup's 64 weight rows as its MMAs' M."""
    return gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_m, 16]
    )


@gluon.constexpr_function
def x_tile_layouts():
    """x's staged tile [m, 128] as the MMA reads it (128-byte swizzled), and the same bytes as
    int32 pairs [m, 64], as the copies write them."""
    return gl.NVMMASharedLayout(128, 16, 2), gl.NVMMASharedLayout(128, 32, 2)


@gluon.jit
def x_pair_offsets(M, X_STRIDE: gl.constexpr, BLOCK_M: gl.constexpr, LAYOUT: gl.constexpr):
    """Offsets, in int32 pairs from the tile's first row, of x's tile [m, pair] in the fragments'
    K order (pair p = 4q + c of a step holds values 2(16c + q) and 2(16c + q) + 1), and which
    rows are real (rows past M are copied as zeros). With the row stride a constant, a thread's
    offsets are one register plus constants, which the copies take as immediates."""
    m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, LAYOUT))
    p = gl.arange(0, 64, layout=gl.SliceLayout(0, LAYOUT))
    source = 16 * (p % 4) + p // 4
    offsets = gl.expand_dims(m * (X_STRIDE // 2), 1) + gl.expand_dims(source, 0)
    return offsets, gl.expand_dims(gl.program_id(1) * BLOCK_M + m < M, 1)


@gluon.jit
def _copy_step(
    i, n_steps, K, w_staging, s_staging, x_staging, w_ptrs, s_ptrs, x_rows, x_offsets, x_ok,
    pid_k, SPLIT_K: gl.constexpr, BLOCKSIZE: gl.constexpr, BLOCK_M: gl.constexpr,
):  # fmt: skip
    """Start copying step i's weight words, absmax and x pairs into its stage. A step past the
    program's last copies its last step's again, or (a split with no steps) the first of K:
    nothing reads it, and the loop needs no masks."""
    stage = i % w_staging.shape[0]
    last = K // STEP_VALUES - 1
    k = gl.maximum(gl.minimum(pid_k + gl.minimum(i, n_steps - 1) * SPLIT_K, last), 0) * STEP_VALUES
    async_copy.async_copy_global_to_shared(w_staging.index(stage), w_ptrs + k // 8)
    async_copy.async_copy_global_to_shared(s_staging.index(stage), s_ptrs + k // BLOCKSIZE)
    pair_layout: gl.constexpr = x_tile_layouts()[1]
    x_stage = x_staging.index(stage)._reinterpret(gl.int32, [BLOCK_M, 64], pair_layout)
    async_copy.async_copy_global_to_shared(x_stage, (x_rows + k // 2) + x_offsets, mask=x_ok)
    async_copy.commit_group()


# Not specialized on M (row counts vary per eager step; see wgmma_4bit.py).
@gluon.jit(do_not_specialize=["M"])
def wgmma_rs_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, SPLIT_K: gl.constexpr,
    NUM_STAGES: gl.constexpr, X_STRIDE: gl.constexpr,
):  # fmt: skip
    """out [SPLIT_K, M, N] (fp32 partials) or [M, N] = x [M, K] @ W^T, 16 weight rows per warp;
    K % 128 == 0. x's rows are X_STRIDE (K, even) apart, a compile-time constant; stride_xm is
    not read (the signature is the other warpgroup kernels')."""
    W: gl.constexpr = gl.num_warps()
    gl.static_assert(NUM_STAGES >= 2, "copies run at least one step ahead")
    words: gl.constexpr = word_layout(W)
    scales: gl.constexpr = gl.SliceLayout(4, words)
    acc_layout: gl.constexpr = accumulator_layout(BLOCK_M, W)
    a_layout: gl.constexpr = gl.DotOperandLayout(0, acc_layout, 2)
    x_layout: gl.constexpr = x_pair_layout(BLOCK_M, W)
    x_tile_layout: gl.constexpr = x_tile_layouts()[0]

    # Each thread's own words and scales (it alone reads them back), and x's tiles.
    w_staging = gl.allocate_shared_memory(
        gl.int32, [NUM_STAGES, W, 2, 8, 4, 4], gl.SwizzledSharedLayout(4, 1, 1, [4, 3, 2, 1, 0])
    )
    s_staging = gl.allocate_shared_memory(
        gl.float32, [NUM_STAGES, W, 2, 8, 4], gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
    )
    x_staging = gl.allocate_shared_memory(
        x_ptr.dtype.element_ty, [NUM_STAGES, BLOCK_M, STEP_VALUES], x_tile_layout
    )

    pid_k = gl.program_id(2)
    local_rows, c, word, table_lane = lane_coordinates(W)
    rows = gl.minimum(gl.program_id(0) * 16 * W + local_rows, N - 1)  # past N: never stored
    w_ptrs, s_ptrs = weight_pointers(
        w_ptr, absmax_ptr, rows, c, word, stride_w, stride_a, BLOCKSIZE
    )
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(table_ptr, table_lane, X_FP16)
    x_rows = x_ptr.to(gl.pointer_type(gl.int32), bitcast=True)
    x_rows += gl.program_id(1) * BLOCK_M * (X_STRIDE // 2)  # the tile's first row
    x_offsets, x_ok = x_pair_offsets(M, X_STRIDE, BLOCK_M, x_layout)

    acc = gl.zeros([16 * W, BLOCK_M], gl.float32, layout=acc_layout)
    n_steps = (K // STEP_VALUES - pid_k + SPLIT_K - 1) // SPLIT_K
    for j in gl.static_range(NUM_STAGES - 1):
        _copy_step(
            j, n_steps, K, w_staging, s_staging, x_staging, w_ptrs, s_ptrs, x_rows, x_offsets,
            x_ok, pid_k, SPLIT_K, BLOCKSIZE, BLOCK_M,
        )  # fmt: skip
    for i in range(n_steps):
        async_copy.wait_group(NUM_STAGES - 2)  # this thread's copies for step i have landed
        fence_async_shared()  # ordered before the MMA's (async proxy) reads of x's tile
        # Every thread's have, and every warp has waited for the MMAs of step i - 1, whose
        # stage the next copy refills.
        gl.thread_barrier()
        _copy_step(
            i + NUM_STAGES - 1, n_steps, K, w_staging, s_staging, x_staging, w_ptrs, s_ptrs,
            x_rows, x_offsets, x_ok, pid_k, SPLIT_K, BLOCKSIZE, BLOCK_M,
        )  # fmt: skip
        stage = i % NUM_STAGES
        packed = w_staging.index(stage).load(words)
        scale = s_staging.index(stage).load(scales)
        a = a_fragment(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16, a_layout)
        acc = warpgroup_mma(a, x_staging.index(stage).permute((1, 0)), acc, is_async=True)
        # Wait for them before the next step's decode: the MMA reads the A fragment's registers
        # as it runs, while they hold packed copies of `a` that nothing after it uses, so
        # ptxas hands them to the next decode (a `deps` on `a` keeps only its 16-bit values).
        acc = warpgroup_mma_wait(0, deps=[acc])
    async_copy.wait_group(0)  # no copy outlives the program

    o_n = gl.program_id(0) * 16 * W + gl.arange(0, 16 * W, layout=gl.SliceLayout(1, acc_layout))
    o_m = gl.program_id(1) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, acc_layout))
    o_offs = gl.expand_dims(o_m * stride_om, 0) + gl.expand_dims(o_n, 1)
    o_ok = gl.expand_dims(o_m < M, 0) & gl.expand_dims(o_n < N, 1)
    gl.store(out_ptr + pid_k * stride_ok + o_offs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)
