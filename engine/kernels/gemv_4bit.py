"""The small-batch 4-bit matmul (a handful of rows of x): a Gluon kernel with its register layout
written out, because at batch 1 the weight bytes are the whole cost and every instruction spent
on them shows.

Each thread owns 16 consecutive bytes (32 values, all under one absmax) of `ROWS` weight rows
per step, loaded as four int32 words, and the matching 16 (x[2i], x[2i+1]) pairs of every row of
x. It decodes each byte with one load from a table of code pairs in shared memory, fp32 pairs
(`decode_4bit.decode_words`) or fp16 ones widened in registers (`HALF_TABLE`, half the bytes a
lookup; `decode_4bit.decode_words_half`), multiplies in fp32 as a chain of fused
multiply-adds, and scales its 32-value sum by the block's absmax once. Threads and warps tile
K; one reduction across them per program at the end gives the output.

Two K steps per loop iteration, both steps' words requested before either is decoded. Words,
not bytes, are what the loop carries: bytes carried through a loop are re-packed into
registers one by one. (Requesting the next iteration's words before decoding this one's, four
steps per iteration, and register caps for more programs per SM all measured no faster.)

PERSISTENT launches a few programs per SM that each take every grid-th block of rows: the table
is filled once per program, and a step's next words are requested as soon as its own are
decoded, past a block's end the next block's first ones (faster where a grid leaves SMs idle
or fills its last wave partly; `o` and `down` at batch 1)."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.kernels.decode_4bit import (
    decode_words,
    decode_words_half,
    dot_word_half2,
    fill_byte_table,
    fill_half_pair_table,
    half2_word_chain,
    half2_word_chain_from,
    keep_table_live,
    lane_copy_offset,
    lane_id,
    to_half2,
    widen_half2_sum,
)

WORDS_PER_THREAD = gl.constexpr(4)  # one 128-bit load: 32 values, within one absmax block
PAIRS_PER_THREAD = gl.constexpr(16)  # x pairs matching them


@gluon.jit
def _load_x(x_ptrs, x_m_ok, x_chunk, w0, half_kw):
    """The x pairs that meet the step at word w0 (zero past K)."""
    return gl.load(x_ptrs + 4 * w0, mask=x_m_ok & (w0 + x_chunk < half_kw), other=0)


@gluon.jit
def _load_scale(scale_ptrs, s_chunk, w0, half_kw, BLOCKSIZE: gl.constexpr):
    """The absmax of each (row, chunk) of the step at word w0 (zero past K)."""
    return gl.load(scale_ptrs + (8 * w0) // BLOCKSIZE, mask=w0 + s_chunk < half_kw, other=0.0)


@gluon.jit
def _accumulate(
    acc, words, pairs, scale, copy_offset, X_FP16: gl.constexpr, WORD_LAYOUT: gl.constexpr,
    HALF_TABLE: gl.constexpr, HALF2: gl.constexpr, WIDE: gl.constexpr = False,
    PAIR_WORDS: gl.constexpr = False,
):  # fmt: skip
    """acc[m, n, chunk] += scale * sum over the thread's 32 values of W[n] * x[m], for one step's
    loaded weight words, x pairs (`_load_x`) and scales (`_load_scale`). Words past K are
    masked off, not zeroed: any byte decodes to a finite code, and its x pair and scale are
    loaded as zero."""
    if HALF2:
        return _accumulate_half2(
            acc, words, pairs, scale, copy_offset, X_FP16, WORD_LAYOUT, WIDE, PAIR_WORDS
        )
    if HALF_TABLE:
        h0, h1, h2, h3, l0, l1, l2, l3 = decode_words_half(words, copy_offset)
    else:
        h0, h1, h2, h3, l0, l1, l2, l3 = decode_words(words, copy_offset)
    if X_FP16:
        x_even = (pairs & 0xFFFF).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)
        x_odd = (pairs >> 16).to(gl.uint16).to(gl.float16, bitcast=True).to(gl.float32)
    else:  # bf16: the upper half of an fp32
        x_even = (pairs << 16).to(gl.float32, bitcast=True)
        x_odd = (pairs & -65536).to(gl.float32, bitcast=True)
    # Pair 4w + b of the 16 meets byte b of word w.
    x_layout: gl.constexpr = gl.SliceLayout(1, WORD_LAYOUT)
    e0, e2, e1, e3 = _quarters(x_even, x_layout)
    o0, o2, o1, o3 = _quarters(x_odd, x_layout)
    # One chain of fused multiply-adds per word, then 3 adds: not products summed as a tree.
    part = gl.expand_dims(h0, 0) * gl.expand_dims(e0, 1)
    part += gl.expand_dims(l0, 0) * gl.expand_dims(o0, 1)
    part += gl.expand_dims(h1, 0) * gl.expand_dims(e1, 1)
    part += gl.expand_dims(l1, 0) * gl.expand_dims(o1, 1)
    part += gl.expand_dims(h2, 0) * gl.expand_dims(e2, 1)
    part += gl.expand_dims(l2, 0) * gl.expand_dims(o2, 1)
    part += gl.expand_dims(h3, 0) * gl.expand_dims(e3, 1)
    part += gl.expand_dims(l3, 0) * gl.expand_dims(o3, 1)
    sums = gl.convert_layout(gl.sum(part, axis=3), acc.type.layout)
    return acc + sums * gl.expand_dims(scale, 0)


@gluon.jit
def _accumulate_half2(
    acc, words, pairs, scale, copy_offset, X_FP16: gl.constexpr, WORD_LAYOUT: gl.constexpr,
    WIDE: gl.constexpr, PAIR_WORDS: gl.constexpr,
):  # fmt: skip
    """`_accumulate` in packed fp16: each byte's code pair (the fp16 table, or WIDE its wide
    layout) meets its x pair in one f16x2 fused multiply-add, four bytes a chain, each word's
    sum widened to fp32 once. x must fit fp16 (|x| < 65504)."""
    if X_FP16:
        xp = pairs
    else:  # bf16 pairs -> f16x2
        xp = to_half2((pairs << 16).to(gl.float32, bitcast=True),
                      (pairs & -65536).to(gl.float32, bitcast=True))  # fmt: skip
    x_layout: gl.constexpr = gl.SliceLayout(1, WORD_LAYOUT)
    p0, p2, p1, p3 = _quarters(xp, x_layout)  # pair 4w + b meets byte b of word w
    w4, p0 = gl.broadcast(gl.expand_dims(words, 0), gl.expand_dims(p0, 1))
    _, p1 = gl.broadcast(w4, gl.expand_dims(p1, 1))
    _, p2 = gl.broadcast(w4, gl.expand_dims(p2, 1))
    _, p3 = gl.broadcast(w4, gl.expand_dims(p3, 1))
    _, offsets = gl.broadcast(w4, gl.expand_dims(copy_offset, 0))
    if PAIR_WORDS:  # words 2j and 2j + 1 (of 4) in one chain of eight bytes, widened once
        w_a, w_b = _halves(w4)
        o_a, o_b = _halves(offsets)
        a0, b0 = _halves(p0)
        a1, b1 = _halves(p1)
        a2, b2 = _halves(p2)
        a3, b3 = _halves(p3)
        chain = half2_word_chain(w_a, o_a, a0, a1, a2, a3, WIDE)
        chain = half2_word_chain_from(chain, w_b, o_b, b0, b1, b2, b3, WIDE)
        sums = gl.sum(widen_half2_sum(chain), axis=3)
    else:
        sums = gl.sum(dot_word_half2(w4, offsets, p0, p1, p2, p3, WIDE), axis=3)
    return acc + gl.convert_layout(sums, acc.type.layout) * gl.expand_dims(scale, 0)


@gluon.jit
def _halves(t):
    """[..., 2j] -> positions 0, 2, 4... and 1, 3, 5... of the last axis, which lives in each
    thread's registers: free."""
    return gl.split(gl.reshape(t, t.shape[:-1] + [t.shape[-1] // 2, 2]))


@gluon.jit
def _quarters(t, layout: gl.constexpr):
    """[a, b, 4j] -> four [a, b, j] (positions i mod 4 = 0, 2, 1, 3) in `layout` (where they
    already are: no data moves)."""
    even, odd = _halves(t)
    e0, e1 = _halves(even)
    o0, o1 = _halves(odd)
    return (
        gl.convert_layout(e0, layout), gl.convert_layout(e1, layout),
        gl.convert_layout(o0, layout), gl.convert_layout(o1, layout),
    )  # fmt: skip


@gluon.jit
def _weight_rows(n0, offs, N, SILU_AND_MUL: gl.constexpr):
    """The weight rows of a program's block rows n0 + offs. Rows past the end repeat the last
    one (never stored). SILU_AND_MUL (W = [gate | up], N / 2 rows each): block row 2i is gate
    row n0 / 2 + i and block row 2i + 1 the up row that multiplies it, so that both land in
    one thread's registers (rows per thread are consecutive and even in number)."""
    if SILU_AND_MUL:
        half = N // 2
        return gl.minimum(n0 // 2 + offs // 2, half - 1) + (offs % 2) * half
    return gl.minimum(n0 + offs, N - 1)


@gluon.jit
def _row_pointers(
    w_ptr, absmax_ptr, n0, N, stride_w, stride_a, w_chunk, s_chunk, BLOCKSIZE: gl.constexpr,
    block_n: gl.constexpr, w_layout: gl.constexpr, scale_layout: gl.constexpr,
    SILU_AND_MUL: gl.constexpr = False,
):  # fmt: skip
    """The weight words' and absmaxes' pointers of block rows n0.. of one program
    (`_weight_rows`), given each chunk's first word (w_chunk [1, chunk, 1], s_chunk
    [1, chunk]). One absmax per (row, chunk): the block of the chunk's first value (8 values a
    word)."""
    w_n = gl.arange(0, block_n, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_layout)))
    w_w = gl.arange(0, WORDS_PER_THREAD, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_layout)))
    w_rows = _weight_rows(n0, w_n, N, SILU_AND_MUL)
    w_ptrs = (
        w_ptr + gl.expand_dims(gl.expand_dims(w_rows * stride_w, 1), 2) + w_chunk
        + gl.expand_dims(gl.expand_dims(w_w, 0), 1)
    )  # fmt: skip
    s_n = gl.arange(0, block_n, layout=gl.SliceLayout(1, scale_layout))
    scale_ptrs = (
        absmax_ptr + gl.expand_dims(_weight_rows(n0, s_n, N, SILU_AND_MUL) * stride_a, 1)
        + (8 * s_chunk) // BLOCKSIZE
    )  # fmt: skip
    return w_ptrs, scale_ptrs


@gluon.jit
def _store_rows(
    acc, out_ptr, pid_k, n0, M, N, stride_om, stride_ok, out_layout: gl.constexpr,
    SILU_AND_MUL: gl.constexpr = False, half_layout: gl.constexpr = None,
):  # fmt: skip
    """Sum the program's partial sums over K's threads and store rows n0.. of out; or
    (SILU_AND_MUL) silu(gate) * up of its (gate, up) row pairs as outputs n0 / 2.. of N / 2
    (in half_layout: out_layout with half the rows), rounded as the separate SiLU-and-mul
    kernel rounds its 16-bit inputs, so that the two give the same bits."""
    out = gl.sum(acc, axis=2)
    if SILU_AND_MUL:
        gate, up = _halves(out)  # block rows 2i and 2i + 1: in one thread's registers
        dtype: gl.constexpr = out_ptr.dtype.element_ty
        gate = gate.to(dtype).to(gl.float32)
        act = (gate / (1.0 + gl.exp(-gate))).to(dtype).to(gl.float32)
        product = gl.convert_layout(act * up.to(dtype).to(gl.float32), half_layout)
        _store_tile(product, out_ptr, pid_k, n0 // 2, M, N // 2, stride_om, stride_ok)
    else:
        _store_tile(out, out_ptr, pid_k, n0, M, N, stride_om, stride_ok)


@gluon.jit
def _store_tile(out, out_ptr, pid_k, n0, M, N, stride_om, stride_ok):
    """out [m, n] (a distributed layout) into columns n0.. of out_ptr's rows."""
    layout: gl.constexpr = out.type.layout
    o_m = gl.arange(0, out.shape[0], layout=gl.SliceLayout(1, layout))
    o_n = n0 + gl.arange(0, out.shape[1], layout=gl.SliceLayout(0, layout))
    o_ptrs = (
        out_ptr + pid_k * stride_ok + gl.expand_dims(o_m * stride_om, 1) + gl.expand_dims(o_n, 0)
    )
    o_ok = gl.expand_dims(o_m < M, 1) & gl.expand_dims(o_n < N, 0)
    gl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=o_ok)


@gluon.jit
def gemv_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, BLOCK_M: gl.constexpr, ROWS: gl.constexpr,
    THREADS_N: gl.constexpr, WARPS_N: gl.constexpr, SPLIT_K: gl.constexpr,
    PDL: gl.constexpr, HALF_TABLE: gl.constexpr, HALF2: gl.constexpr = False,
    PERSISTENT: gl.constexpr = False, WIDE_TABLE: gl.constexpr = False,
    PAIR_WORDS: gl.constexpr = False, SILU_AND_MUL: gl.constexpr = False,
    X_AHEAD: gl.constexpr = False,
):  # fmt: skip
    """x_ptr: x as int32 pairs [M, K/2]; w_ptr: the packed weight as int32 words, row stride
    stride_w words; out [SPLIT_K, M, N] (fp32 partials) or [M, N]. PERSISTENT: the grid is
    smaller than the row blocks; each program takes blocks pid, pid + grid, ... and requests
    the next block's first words while it finishes the current one. SILU_AND_MUL (W = [gate |
    up], SPLIT_K 1): out [M, N / 2] = silu(x W_gate^T) * x W_up^T, each program's block of rows
    being pairs of gate and up rows (`_weight_rows`): no separate activation kernel. X_AHEAD:
    each step's x pairs are requested with its words, an iteration ahead, instead of as the
    step begins (more registers; it pays where x is several rows)."""
    threads_k: gl.constexpr = 32 // THREADS_N
    warps_k: gl.constexpr = gl.num_warps() // WARPS_N
    block_n: gl.constexpr = ROWS * THREADS_N * WARPS_N
    chunks: gl.constexpr = threads_k * warps_k  # 16-byte chunks of a row per step
    step_words: gl.constexpr = chunks * WORDS_PER_THREAD
    # [m, n, chunk, pair]: m and the thread's rows in registers, chunks over threads and warps.
    layout: gl.constexpr = gl.BlockedLayout(
        size_per_thread=[BLOCK_M, ROWS, 1, PAIRS_PER_THREAD],
        threads_per_warp=[1, THREADS_N, threads_k, 1],
        warps_per_cta=[1, WARPS_N, warps_k, 1],
        order=[3, 2, 1, 0],
    )
    # The same over words [m, n, chunk, word].
    word_layout: gl.constexpr = gl.BlockedLayout(
        size_per_thread=[BLOCK_M, ROWS, 1, WORDS_PER_THREAD],
        threads_per_warp=[1, THREADS_N, threads_k, 1],
        warps_per_cta=[1, WARPS_N, warps_k, 1],
        order=[3, 2, 1, 0],
    )
    w_layout: gl.constexpr = gl.SliceLayout(0, word_layout)  # [n, chunk, word]
    x_layout: gl.constexpr = gl.SliceLayout(1, layout)  # [m, chunk, pair]
    sums_layout: gl.constexpr = gl.SliceLayout(3, layout)  # [m, n, chunk]
    scale_layout: gl.constexpr = gl.SliceLayout(0, sums_layout)  # [n, chunk]
    out_layout: gl.constexpr = gl.SliceLayout(2, sums_layout)  # [m, n]
    # SILU_AND_MUL's outputs [m, n / 2]: a thread's rows halved.
    half_layout: gl.constexpr = gl.SliceLayout(
        2,
        gl.SliceLayout(
            3,
            gl.BlockedLayout(
                size_per_thread=[BLOCK_M, max(ROWS // 2, 1), 1, PAIRS_PER_THREAD],
                threads_per_warp=[1, THREADS_N, threads_k, 1],
                warps_per_cta=[1, WARPS_N, warps_k, 1],
                order=[3, 2, 1, 0],
            ),
        ),
    )

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * block_n

    # Masks are per 16-byte chunk (K is a multiple of 64), so each load stays one 128-bit access.
    w_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_layout)))
    w_chunk = gl.expand_dims(gl.expand_dims(w_c * WORDS_PER_THREAD, 0), 2)  # [1, chunk, 1]
    s_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, scale_layout))
    s_chunk = gl.expand_dims(s_c * WORDS_PER_THREAD, 0)
    w_ptrs, scale_ptrs = _row_pointers(
        w_ptr, absmax_ptr, n0, N, stride_w, stride_a, w_chunk, s_chunk, BLOCKSIZE, block_n,
        w_layout, scale_layout, SILU_AND_MUL,
    )  # fmt: skip

    # x pairs of the same chunks, four per word (pair offset = 4 * word offset).
    x_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, gl.SliceLayout(2, x_layout)))
    x_c = gl.arange(0, chunks, layout=gl.SliceLayout(0, gl.SliceLayout(2, x_layout)))
    x_p = gl.arange(0, PAIRS_PER_THREAD, layout=gl.SliceLayout(0, gl.SliceLayout(1, x_layout)))
    x_chunk = gl.expand_dims(gl.expand_dims(x_c * WORDS_PER_THREAD, 0), 2)  # in words
    x_m_ok = gl.expand_dims(gl.expand_dims(x_m < M, 1), 2)
    x_ptrs = (
        x_ptr + gl.expand_dims(gl.expand_dims(x_m * stride_xm, 1), 2) + 4 * x_chunk
        + gl.expand_dims(gl.expand_dims(x_p, 0), 1)
    )  # fmt: skip

    half_kw = K // 8  # words per row
    stride = step_words * SPLIT_K
    # The first iteration's words are requested before the table is filled, to overlap it.
    first = pid_k * step_words
    words0 = gl.load(w_ptrs + first, mask=first + w_chunk < half_kw)
    words1 = gl.load(w_ptrs + first + stride, mask=first + stride + w_chunk < half_kw)
    like_words = gl.zeros([block_n, chunks, WORDS_PER_THREAD], gl.int32, w_layout)
    if HALF_TABLE or HALF2:  # 4-byte entries, 32 copies (or 64, WIDE): lane l reads copy l
        table = fill_half_pair_table(table_ptr, gl.num_warps(), WIDE_TABLE)
        copy_offset = 4 * lane_id(like_words)
    else:
        table = fill_byte_table(table_ptr, gl.num_warps())
        copy_offset = lane_copy_offset(like_words)
    # Launched as a programmatic dependent (PDL; matmul_4bit), the program starts while the
    # kernel before it finishes. Everything above reads only the weights and the code table,
    # which the kernels of a forward pass never write (loading does, before any step); from
    # here on it reads x and writes out, so it waits for that kernel first.
    if PDL:
        gdc_launch_dependents()  # the next kernel may start (it waits for this one's end)
        gdc_wait()  # griddepcontrol.wait

    if X_AHEAD:  # the first iteration's x pairs (x may be read from here on)
        pairs0 = _load_x(x_ptrs, x_m_ok, x_chunk, first, half_kw)
        pairs1 = _load_x(x_ptrs, x_m_ok, x_chunk, first + stride, half_kw)
    if PERSISTENT:
        num_blocks = gl.cdiv(N, block_n)
        grid_n = gl.num_programs(0)
        for block in range(pid_n, num_blocks, grid_n):
            n_next = (block + grid_n) * block_n
            has_next = block + grid_n < num_blocks
            next_w_ptrs, next_scale_ptrs = _row_pointers(
                w_ptr, absmax_ptr, n_next, N, stride_w, stride_a, w_chunk, s_chunk, BLOCKSIZE,
                block_n, w_layout, scale_layout, SILU_AND_MUL,
            )  # fmt: skip
            acc = gl.zeros([BLOCK_M, block_n, chunks], gl.float32, layout=sums_layout)
            for w0 in range(first, half_kw, 2 * stride):
                # Each step's next words (and X_AHEAD x pairs) are requested as soon as its own
                # are decoded; past this block's K they are the next block's first ones.
                ahead = w0 + 2 * stride
                if not X_AHEAD:
                    pairs0 = _load_x(x_ptrs, x_m_ok, x_chunk, w0, half_kw)
                scale0 = _load_scale(scale_ptrs, s_chunk, w0, half_kw, BLOCKSIZE)
                acc = _accumulate(
                    acc, words0, pairs0, scale0, copy_offset, X_FP16, word_layout,
                    HALF_TABLE or HALF2, HALF2, WIDE_TABLE, PAIR_WORDS,
                )  # fmt: skip
                if ahead < half_kw:
                    words0 = gl.load(w_ptrs + ahead, mask=ahead + w_chunk < half_kw)
                    if X_AHEAD:
                        pairs0 = _load_x(x_ptrs, x_m_ok, x_chunk, ahead, half_kw)
                else:
                    words0 = gl.load(
                        next_w_ptrs + first, mask=has_next & (first + w_chunk < half_kw)
                    )
                    if X_AHEAD:
                        pairs0 = _load_x(x_ptrs, x_m_ok, x_chunk, first, half_kw)
                if not X_AHEAD:
                    pairs1 = _load_x(x_ptrs, x_m_ok, x_chunk, w0 + stride, half_kw)
                scale1 = _load_scale(scale_ptrs, s_chunk, w0 + stride, half_kw, BLOCKSIZE)
                acc = _accumulate(
                    acc, words1, pairs1, scale1, copy_offset, X_FP16, word_layout,
                    HALF_TABLE or HALF2, HALF2, WIDE_TABLE, PAIR_WORDS,
                )  # fmt: skip
                if ahead < half_kw:
                    words1 = gl.load(
                        w_ptrs + ahead + stride, mask=ahead + stride + w_chunk < half_kw
                    )
                    if X_AHEAD:
                        pairs1 = _load_x(x_ptrs, x_m_ok, x_chunk, ahead + stride, half_kw)
                else:
                    words1 = gl.load(
                        next_w_ptrs + first + stride,
                        mask=has_next & (first + stride + w_chunk < half_kw),
                    )
                    if X_AHEAD:
                        pairs1 = _load_x(x_ptrs, x_m_ok, x_chunk, first + stride, half_kw)
            # The reduction's scratch is its own shared buffer (keep_table_live below).
            _store_rows(acc, out_ptr, pid_k, block * block_n, M, N, stride_om, stride_ok,
                        out_layout, SILU_AND_MUL, half_layout)  # fmt: skip
            w_ptrs, scale_ptrs = next_w_ptrs, next_scale_ptrs
        keep_table_live(table, table_ptr, N < 0, gl.num_warps())
    else:
        acc = gl.zeros([BLOCK_M, block_n, chunks], gl.float32, layout=sums_layout)
        for w0 in range(first, half_kw, 2 * stride):
            if not X_AHEAD:
                pairs0 = _load_x(x_ptrs, x_m_ok, x_chunk, w0, half_kw)
            scale0 = _load_scale(scale_ptrs, s_chunk, w0, half_kw, BLOCKSIZE)
            acc = _accumulate(
                acc, words0, pairs0, scale0, copy_offset, X_FP16, word_layout,
                HALF_TABLE or HALF2, HALF2, WIDE_TABLE, PAIR_WORDS,
            )  # fmt: skip
            if not X_AHEAD:
                pairs1 = _load_x(x_ptrs, x_m_ok, x_chunk, w0 + stride, half_kw)
            scale1 = _load_scale(scale_ptrs, s_chunk, w0 + stride, half_kw, BLOCKSIZE)
            acc = _accumulate(
                acc, words1, pairs1, scale1, copy_offset, X_FP16, word_layout,
                HALF_TABLE or HALF2, HALF2, WIDE_TABLE, PAIR_WORDS,
            )  # fmt: skip
            ahead = w0 + 2 * stride  # the next iteration's (masked off past the end)
            words0 = gl.load(w_ptrs + ahead, mask=ahead + w_chunk < half_kw)
            words1 = gl.load(w_ptrs + ahead + stride, mask=ahead + stride + w_chunk < half_kw)
            if X_AHEAD:
                pairs0 = _load_x(x_ptrs, x_m_ok, x_chunk, ahead, half_kw)
                pairs1 = _load_x(x_ptrs, x_m_ok, x_chunk, ahead + stride, half_kw)
        gl.thread_barrier()  # the reduction's scratch may reuse the table's shared memory
        _store_rows(
            acc, out_ptr, pid_k, n0, M, N, stride_om, stride_ok, out_layout, SILU_AND_MUL,
            half_layout,
        )  # fmt: skip
