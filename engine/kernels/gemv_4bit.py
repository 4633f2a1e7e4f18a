"""The small-batch 4-bit matmul (a handful of rows of x): a Gluon kernel with its register layout
written out, because at batch 1 the weight bytes are the whole cost and every instruction spent
moving data between threads shows.

Each thread owns 16 consecutive bytes (32 values, all under one absmax) of `ROWS` weight
rows per step, and the matching 16 (x[2i], x[2i+1]) pairs of every row of x. It decodes the bytes
in registers (`decode_4bit`), multiplies in fp32, sums its 32 products per row without talking to
any other thread, and scales that sum by the block's absmax once. Threads and warps tile K; one
reduction across them per program at the end gives the output."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from engine.kernels.decode_4bit import decode, load_code_table

BYTES_PER_THREAD_VALUE = 16  # one 128-bit load: 32 values, within one absmax block
BYTES_PER_THREAD = gl.constexpr(BYTES_PER_THREAD_VALUE)


@gluon.jit
def _accumulate(
    acc, packed, b0, x_ptrs, x_m_ok, x_chunk, scale_ptrs, s_chunk, half_k,
    t0, t1, t2, t3, t4, t5, t6, t7, BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr,
):  # fmt: skip
    """acc[m, n, chunk] += scale * sum over the thread's 32 values of W[n] * x[m], for one step
    whose weight bytes (`packed`) are already loaded."""
    pairs = gl.load(x_ptrs + b0, mask=x_m_ok & (b0 + x_chunk < half_k), other=0)
    scale = gl.load(scale_ptrs + (2 * b0) // BLOCKSIZE, mask=b0 + s_chunk < half_k, other=0.0)
    high, low = decode(packed, t0, t1, t2, t3, t4, t5, t6, t7)
    if X_FP16:
        x_even = (pairs & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)
        x_odd = (pairs >> 16).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)
    else:  # bf16: the upper half of an fp32
        x_even = (pairs << 16).to(gl.float32, bitcast=True)
        x_odd = (pairs & -65536).to(gl.float32, bitcast=True)
    prod = gl.expand_dims(high, 0) * gl.expand_dims(x_even, 1)
    prod += gl.expand_dims(low, 0) * gl.expand_dims(x_odd, 1)
    return acc + gl.sum(prod, axis=3) * gl.expand_dims(scale, 0)


@gluon.jit
def gemv_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, ROWS: gl.constexpr,
    THREADS_N: gl.constexpr, WARPS_N: gl.constexpr, SPLIT_K: gl.constexpr,
):  # fmt: skip
    """x_ptr: x as int32 pairs [M, K/2]; out [SPLIT_K, M, N] (fp32 partials) or [M, N]."""
    threads_k: gl.constexpr = 32 // THREADS_N
    warps_k: gl.constexpr = gl.num_warps() // WARPS_N
    block_n: gl.constexpr = ROWS * THREADS_N * WARPS_N
    chunks: gl.constexpr = threads_k * warps_k  # 16-byte chunks of a row per step
    step_bytes: gl.constexpr = chunks * BYTES_PER_THREAD
    # [m, n, chunk, byte]: m and the thread's rows in registers, chunks over threads and warps.
    layout: gl.constexpr = gl.BlockedLayout(
        size_per_thread=[BLOCK_M, ROWS, 1, BYTES_PER_THREAD],
        threads_per_warp=[1, THREADS_N, threads_k, 1],
        warps_per_cta=[1, WARPS_N, warps_k, 1],
        order=[3, 2, 1, 0],
    )
    w_layout: gl.constexpr = gl.SliceLayout(0, layout)  # [n, chunk, byte]
    x_layout: gl.constexpr = gl.SliceLayout(1, layout)  # [m, chunk, byte]
    sums_layout: gl.constexpr = gl.SliceLayout(3, layout)  # [m, n, chunk]
    scale_layout: gl.constexpr = gl.SliceLayout(0, sums_layout)  # [n, chunk]
    out_layout: gl.constexpr = gl.SliceLayout(2, sums_layout)  # [m, n]

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * block_n

    # Weight bytes: rows past N re-read the last row and are never stored. Masks are per
    # 16-byte chunk (K is a multiple of 64), so each load stays one 128-bit access.
    w_n = gl.arange(0, block_n, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_layout)))
    w_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_layout)))
    w_b = gl.arange(0, BYTES_PER_THREAD, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_layout)))
    w_rows = gl.minimum(n0 + w_n, N - 1)
    w_chunk = gl.expand_dims(gl.expand_dims(w_c * BYTES_PER_THREAD, 0), 2)  # [1, chunk, 1]
    w_ptrs = (
        w_ptr + gl.expand_dims(gl.expand_dims(w_rows * stride_w, 1), 2) + w_chunk
        + gl.expand_dims(gl.expand_dims(w_b, 0), 1)
    )  # fmt: skip

    # x pairs, the same [chunk, byte] positions.
    x_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))
    x_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout)))
    x_b = gl.arange(0, BYTES_PER_THREAD, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_layout)))
    x_chunk = gl.expand_dims(gl.expand_dims(x_c * BYTES_PER_THREAD, 0), 2)
    x_m_ok = gl.expand_dims(gl.expand_dims(x_m < M, 1), 2)
    x_ptrs = (
        x_ptr + gl.expand_dims(gl.expand_dims(x_m * stride_xm, 1), 2) + x_chunk
        + gl.expand_dims(gl.expand_dims(x_b, 0), 1)
    )  # fmt: skip

    # One absmax per (row, chunk): the block of the chunk's first value.
    s_n = gl.arange(0, block_n, layout=gl.SliceLayout(1, scale_layout))
    s_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, scale_layout))
    s_chunk = gl.expand_dims(s_c * BYTES_PER_THREAD, 0)
    scale_ptrs = (
        absmax_ptr + gl.expand_dims(gl.minimum(n0 + s_n, N - 1) * stride_a, 1)
        + (2 * s_chunk) // BLOCKSIZE
    )  # fmt: skip

    # The code table, one copy per lane (decode_4bit.code_table): loaded per thread, it lives in
    # ordinary registers, where prmt can read it without a copy per use.
    t0, t1, t2, t3, t4, t5, t6, t7 = load_code_table(
        table_ptr, gl.expand_dims(gl.expand_dims(w_c, 0), 2)
    )
    acc = gl.zeros([BLOCK_M, block_n, chunks], gl.float32, layout=sums_layout)
    half_k = K // 2
    stride = step_bytes * SPLIT_K
    # Two K steps per iteration, both steps' weight bytes requested before either is decoded:
    # more bytes in flight per thread. (Not a register double buffer across iterations: bytes
    # carried through a loop are re-packed one by one. Four steps measured no faster.)
    for b0 in range(pid_k * step_bytes, half_k, 2 * stride):
        b1 = b0 + stride
        packed0 = gl.load(w_ptrs + b0, mask=b0 + w_chunk < half_k)
        packed1 = gl.load(w_ptrs + b1, mask=b1 + w_chunk < half_k)
        # Bytes past K are masked off, not zeroed: any byte decodes to a finite code, and its x
        # pair and scale are loaded as zero.
        acc = _accumulate(
            acc, packed0, b0, x_ptrs, x_m_ok, x_chunk, scale_ptrs, s_chunk, half_k,
            t0, t1, t2, t3, t4, t5, t6, t7, BLOCKSIZE, X_FP16,
        )  # fmt: skip
        acc = _accumulate(
            acc, packed1, b1, x_ptrs, x_m_ok, x_chunk, scale_ptrs, s_chunk, half_k,
            t0, t1, t2, t3, t4, t5, t6, t7, BLOCKSIZE, X_FP16,
        )  # fmt: skip
    out = gl.sum(acc, axis=2)

    o_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    o_n = n0 + gl.arange(0, block_n, layout=gl.SliceLayout(0, out_layout))
    o_ptrs = (
        out_ptr + pid_k * stride_ok + gl.expand_dims(o_m * stride_om, 1) + gl.expand_dims(o_n, 0)
    )
    o_ok = gl.expand_dims(o_m < M, 1) & gl.expand_dims(o_n < N, 0)
    gl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_ok)
