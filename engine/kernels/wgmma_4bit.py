"""The larger-batch 4-bit matmul on Hopper tensor cores: a Gluon kernel that stages the decoded
weights in shared memory itself, so the weight bytes are read once, coalesced, 16 per thread.

Per K step of BLOCK_K values, each thread loads 16 packed bytes (32 values of one row, under
one absmax) of the [BLOCK_N, BLOCK_K] weight tile, decodes them in registers (`decode_4bit`),
scales them by the block's absmax in fp32 and packs them into bf16 (or fp16) pairs in K order.
The pairs go to a 128-byte-swizzled shared tile, x's [BLOCK_M, BLOCK_K] tile to another, and one
warpgroup MMA computes out[BLOCK_M, BLOCK_N] += x W^T, W^T read K-major straight from the tile.
Two steps' bytes are requested before either is decoded."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma

from engine.kernels.decode_4bit import TABLE_WORDS as _TABLE_WORDS
from engine.kernels.decode_4bit import decode, load_code_table

TABLE_WORDS = gl.constexpr(_TABLE_WORDS)
# Two fp32 values -> one register of two 16-bit values, the first in the low half (K order).
_PACK_BF16 = gl.constexpr("cvt.rn.bf16x2.f32 $0, $2, $1;")
_PACK_FP16 = gl.constexpr("cvt.rn.f16x2.f32 $0, $2, $1;")


@gluon.jit
def _mma_step(
    acc, packed, scale, xs, x_tile, w_tile, w_pairs, t0, t1, t2, t3, t4, t5, t6, t7,
    PACK_ASM: gl.constexpr, PAIR_LAYOUT: gl.constexpr,
):  # fmt: skip
    """One K step: decode, scale and pack the weight bytes into the shared tile, x beside it,
    then acc += x_tile @ w_tile^T on the warpgroup's tensor cores."""
    high, low = decode(packed, t0, t1, t2, t3, t4, t5, t6, t7)
    scale3 = gl.expand_dims(scale, 2)
    pairs = gl.inline_asm_elementwise(
        PACK_ASM, "=r,r,r", [high * scale3, low * scale3], dtype=gl.int32, is_pure=True, pack=1
    )
    shape: gl.constexpr = [pairs.shape[0], pairs.shape[1] * pairs.shape[2]]
    w_pairs.store(gl.convert_layout(gl.reshape(pairs, shape), PAIR_LAYOUT))
    x_tile.store(xs)
    fence_async_shared()
    gl.thread_barrier()
    acc = warpgroup_mma(x_tile, w_tile.permute((1, 0)), acc)
    gl.thread_barrier()  # every warp is done reading the tiles before they are rewritten
    return acc


@gluon.jit
def wgmma_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr, SPLIT_K: gl.constexpr,
):  # fmt: skip
    """out [SPLIT_K, M, N] (fp32 partials) or [M, N] = x [M, K] @ W^T; K % BLOCK_K == 0."""
    num_warps: gl.constexpr = gl.num_warps()
    chunks: gl.constexpr = BLOCK_K // 32  # 16-byte chunks per weight row per step
    gl.static_assert(BLOCK_N >= (32 // chunks) * num_warps, "fewer weight rows than threads")
    dtype: gl.constexpr = x_ptr.dtype.element_ty
    # Registers: [n, chunk, byte] for the weight bytes, [n, byte pair] for their 16-bit pairs.
    w_layout: gl.constexpr = gl.BlockedLayout(
        [1, 1, 16], [32 // chunks, chunks, 1], [num_warps, 1, 1], [2, 1, 0]
    )
    pair_layout: gl.constexpr = gl.BlockedLayout(
        [1, 16], [32 // chunks, chunks], [num_warps, 1], [1, 0]
    )
    x_layout: gl.constexpr = gl.BlockedLayout(
        [1, 8], [32 // (BLOCK_K // 8), BLOCK_K // 8], [num_warps, 1], [1, 0]
    )
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    # Shared: 128-byte swizzle; the weight tile is written as int32 pairs, read as 16-bit.
    swizzle: gl.constexpr = 128 if BLOCK_K * 2 >= 128 else BLOCK_K * 2
    x_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle, 16, 2)
    pair_smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle, 32, 2)
    x_tile = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_K], x_smem_layout)
    w_tile = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_K], x_smem_layout)
    w_pairs = w_tile._reinterpret(gl.int32, [BLOCK_N, BLOCK_K // 2], pair_smem_layout)

    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    pid_k = gl.program_id(2)
    n0 = pid_n * BLOCK_N
    m0 = pid_m * BLOCK_M

    w_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_layout)))
    w_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_layout)))
    w_b = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_layout)))
    w_rows = gl.minimum(n0 + w_n, N - 1)
    w_ptrs = (
        w_ptr + gl.expand_dims(gl.expand_dims(w_rows * stride_w, 1), 2)
        + gl.expand_dims(gl.expand_dims(w_c * 16, 0), 2) + gl.expand_dims(gl.expand_dims(w_b, 0), 1)
    )  # fmt: skip
    s_layout: gl.constexpr = gl.SliceLayout(2, w_layout)
    s_rows = gl.minimum(n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout)), N - 1)
    s_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, s_layout))
    # The absmax block of each chunk's first value (k0 is a multiple of BLOCK_K, and BLOCK_K and
    # the blocksize are powers of two, so the step's block index adds on).
    s_block = gl.expand_dims(s_c * 32, 0) // BLOCKSIZE
    s_ptrs = absmax_ptr + gl.expand_dims(s_rows * stride_a, 1) + s_block
    t_ptrs = table_ptr + (gl.expand_dims(gl.expand_dims(w_n, 1), 2) % 32) * TABLE_WORDS
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(t_ptrs)

    x_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
    x_k = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_ptrs = x_ptr + gl.expand_dims(x_m * stride_xm, 1) + gl.expand_dims(x_k, 0)
    x_ok = gl.expand_dims(x_m < M, 1)

    pack_asm: gl.constexpr = _PACK_FP16 if X_FP16 else _PACK_BF16
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=acc_layout)
    stride = BLOCK_K * SPLIT_K
    # Two steps per iteration, both steps' bytes requested before either is decoded. A second
    # step past K re-reads the last in-range step (no masks in the hot loads) and is skipped.
    for k0 in range(pid_k * BLOCK_K, K, 2 * stride):
        k1 = gl.minimum(k0 + stride, K - BLOCK_K)
        packed0 = gl.load(w_ptrs + k0 // 2)
        packed1 = gl.load(w_ptrs + k1 // 2)
        scale0 = gl.load(s_ptrs + k0 // BLOCKSIZE)
        scale1 = gl.load(s_ptrs + k1 // BLOCKSIZE)
        xs0 = gl.load(x_ptrs + k0, mask=x_ok, other=0.0)
        xs1 = gl.load(x_ptrs + k1, mask=x_ok, other=0.0)
        acc = _mma_step(
            acc, packed0, scale0, xs0, x_tile, w_tile, w_pairs, t0, t1, t2, t3, t4, t5, t6, t7,
            pack_asm, pair_layout,
        )  # fmt: skip
        if k0 + stride < K:
            acc = _mma_step(
                acc, packed1, scale1, xs1, x_tile, w_tile, w_pairs, t0, t1, t2, t3, t4, t5, t6,
                t7, pack_asm, pair_layout,
            )  # fmt: skip

    o_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, acc_layout))
    o_n = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
    o_ptrs = (
        out_ptr + pid_k * stride_ok + gl.expand_dims(o_m * stride_om, 1) + gl.expand_dims(o_n, 0)
    )
    o_ok = gl.expand_dims(o_m < M, 1) & gl.expand_dims(o_n < N, 0)
    gl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_ok)
