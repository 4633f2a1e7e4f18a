"""The small-batch 4-bit matmul on tensor cores, decoding through a shared-memory byte table: a
Gluon kernel whose inner step is one block of inline PTX (lookups, then `mma.sync`).

Per byte it spends three instructions: a shift and a `lop3` build the address, one 4-byte
`ld.shared` returns the byte's two codes as a 16-bit pair (`decode_4bit.fill_half_pair_table`:
the register an MMA's A fragment holds for two consecutive values of K). The absmax is not
applied per weight: each step covers one 64-value group of K (one absmax block or part of one),
its four MMAs start from zero, and the step's partial sums are scaled once per row and added to
the accumulator in fp32. Up to 8 rows of x ride along as the MMA's N side.

Lane (g, c) of a warp (g = lane / 4, c = lane % 4) owns weight rows g and g + 8 of the warp's 16
and, per step, bytes 8c..8c+7 of each row's 32 (two int32 words a row), and x values
16c..16c+15 of the step (row g of x). The MMA's K order is physical K permuted within the step:
MMA j takes bytes 2j and 2j + 1 of every lane's eight, and x's matching pairs, so the product
is exact. The table holds the codes in x's 16-bit type: a bf16 model's weights are
code(bf16) * absmax(fp32), within bf16 rounding of bitsandbytes' dequantized weights."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.language.extra.cuda import gdc_wait

from engine.kernels.decode_4bit import HALF_PAIR_COPIES, fill_half_pair_table

STEP_VALUES = 64  # K per step: one absmax group


def _step_asm(fp16: bool, wide: bool) -> str:
    """$0..$3: the step's fp32 sums (the m16n8 C fragment: rows g, g, g + 8, g + 8; x rows 2c,
    2c + 1, 2c, 2c + 1); $4, $5: row g's words (bytes 0-3, 4-7), $6, $7: row g + 8's; $8..$15:
    the lane's eight x pairs in order; $16: its table copy's offset (lane * 4). Entry e of copy
    l is at shared byte e * 128 + l * 4 (a shift and a lop3 build the address), or if `wide`
    at e * 256 + l * 4 (one prmt builds it: the byte as the address's second byte)."""
    kind = "f16" if fp16 else "bf16"
    lines = ["{", ".reg .b32 t, a, base, z, d0, d1, d2, d3;"]
    lines += [f".reg .b32 q{i};" for i in range(16)]
    lines += ["mov.u32 base, global_smem;", "mov.b32 z, 0;"]
    for w in range(4):  # q[4w + b]: byte b of word w as a code pair
        for b in range(4):
            if wide:  # bytes (offset, byte b, 0, 0): the offset's upper bytes are zero
                lines.append(f"prmt.b32 a, ${4 + w}, $16, {0x6504 | (b << 4)};")
            else:
                shift = (
                    f"shl.b32 t, ${4 + w}, 7;" if b == 0 else f"shr.u32 t, ${4 + w}, {8 * b - 7};"
                )
                lines += [shift, "lop3.b32 a, t, 0x7f80, $16, 0xea;"]  # (byte << 7) | offset
            lines += ["add.u32 a, a, base;", f"ld.shared.b32 q{4 * w + b}, [a];"]
    for j in range(4):  # bytes 2j, 2j + 1 of each row's eight: word j // 2, bytes 2 (j % 2) + 0/1
        g_word, h_word, b = j // 2, 2 + j // 2, 2 * (j % 2)
        a = f"q{4 * g_word + b}, q{4 * h_word + b}, q{4 * g_word + b + 1}, q{4 * h_word + b + 1}"
        c = "z, z, z, z" if j == 0 else "d0, d1, d2, d3"
        lines.append(
            f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{d0, d1, d2, d3}}, "
            f"{{{a}}}, {{${8 + 2 * j}, ${9 + 2 * j}}}, {{{c}}};"
        )
    lines += ["mov.b32 $0, d0;", "mov.b32 $1, d1;", "mov.b32 $2, d2;", "mov.b32 $3, d3;", "}"]
    return "\n".join(lines)


_STEP_BF16 = gl.constexpr(_step_asm(False, False))
_STEP_FP16 = gl.constexpr(_step_asm(True, False))
_WIDE_STEP_BF16 = gl.constexpr(_step_asm(False, True))
_WIDE_STEP_FP16 = gl.constexpr(_step_asm(True, True))
_STEP_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 4 + ["r"] * 13))
_LANE = gl.constexpr("mov.u32 $0, %laneid;")
_COPIES = gl.constexpr(HALF_PAIR_COPIES)
_STEP = gl.constexpr(STEP_VALUES)


@gluon.jit
def _split8(t, layout: gl.constexpr):
    """[n, 8] -> its eight columns in order, each [n] in `layout` (where they already are)."""
    even, odd = gl.split(gl.reshape(t, [t.shape[0], 4, 2]))
    e0, e1 = gl.split(gl.reshape(even, [t.shape[0], 2, 2]))  # columns 0, 4 | 2, 6
    o0, o1 = gl.split(gl.reshape(odd, [t.shape[0], 2, 2]))  # 1, 5 | 3, 7
    p0, p4 = gl.split(e0)
    p2, p6 = gl.split(e1)
    p1, p5 = gl.split(o0)
    p3, p7 = gl.split(o1)
    return (
        gl.convert_layout(p0, layout), gl.convert_layout(p1, layout),
        gl.convert_layout(p2, layout), gl.convert_layout(p3, layout),
        gl.convert_layout(p4, layout), gl.convert_layout(p5, layout),
        gl.convert_layout(p6, layout), gl.convert_layout(p7, layout),
    )  # fmt: skip


@gluon.jit
def _load_step(w_g, w_h, s_g, s_h, k0, K, BLOCKSIZE: gl.constexpr):
    """The step at value k0: rows g's and g + 8's two words each [n, 2] and absmax [n]; nothing
    (zeros) past K."""
    live = k0 < K
    words_g = gl.load(w_g + k0 // 8, mask=live, other=0)
    words_h = gl.load(w_h + k0 // 8, mask=live, other=0)
    scale_g = gl.load(s_g + k0 // BLOCKSIZE, mask=live, other=0.0)
    scale_h = gl.load(s_h + k0 // BLOCKSIZE, mask=live, other=0.0)
    return words_g, words_h, scale_g, scale_h


@gluon.jit
def _mma_step(
    acc0, acc1, acc2, acc3, words_g, words_h, scale_g, scale_h, x_ptrs, x_ok, k0, K,
    copy_offset, X_FP16: gl.constexpr, WIDE: gl.constexpr, ONE: gl.constexpr,
):  # fmt: skip
    """acc += this step's products, scaled per row: acc0, acc1 (row g), acc2, acc3 (g + 8)."""
    if WIDE:
        asm: gl.constexpr = _WIDE_STEP_FP16 if X_FP16 else _WIDE_STEP_BF16
    else:
        asm: gl.constexpr = _STEP_FP16 if X_FP16 else _STEP_BF16
    pairs = gl.load(x_ptrs + k0 // 2, mask=x_ok & (k0 < K), other=0)
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(pairs, ONE)
    g0, g1 = gl.split(words_g)
    h0, h1 = gl.split(words_h)
    d0, d1, d2, d3 = gl.inline_asm_elementwise(
        asm, _STEP_CONSTRAINTS,
        [
            gl.convert_layout(g0, ONE), gl.convert_layout(g1, ONE),
            gl.convert_layout(h0, ONE), gl.convert_layout(h1, ONE),
            x0, x1, x2, x3, x4, x5, x6, x7, copy_offset,
        ],
        dtype=(gl.float32,) * 4, is_pure=False, pack=1,
    )  # fmt: skip
    # Not pure: the asm reads the table in shared memory, so it stays after the fill's barrier.
    sg = gl.convert_layout(scale_g, ONE)
    sh = gl.convert_layout(scale_h, ONE)
    return acc0 + d0 * sg, acc1 + d1 * sg, acc2 + d2 * sh, acc3 + d3 * sh


# Not specialized on M (row counts vary per eager step; see wgmma_4bit.py).
@gluon.jit(do_not_specialize=["M"])
def table_mma_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: gl.constexpr, X_FP16: gl.constexpr, SPLIT_K: gl.constexpr, STEPS: gl.constexpr,
    WIDE: gl.constexpr, PDL: gl.constexpr,
):  # fmt: skip
    """out [SPLIT_K, M, N] (fp32 partials) or [M, N] = x [M <= 8, K] @ W^T; x_ptr: x as int32
    pairs (row stride stride_xm pairs), w_ptr: the packed weight as int32 words (row stride
    stride_w words); 16 weight rows per warp. STEPS (2 or 4) steps per iteration, all their
    words requested before any is used."""
    W: gl.constexpr = gl.num_warps()
    # One thread per element of [32 * W] tensors; [32 * W, v] ones hold v values a thread.
    ONE: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
    TWO: gl.constexpr = gl.BlockedLayout([1, 2], [32, 1], [W, 1], [1, 0])
    EIGHT: gl.constexpr = gl.BlockedLayout([1, 8], [32, 1], [W, 1], [1, 0])

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    n0 = pid_n * 16 * W

    t2 = gl.arange(0, 32 * W, layout=gl.SliceLayout(1, TWO))
    g2 = (t2 % 32) // 4
    c2 = t2 % 4
    row_g = n0 + (t2 // 32) * 16 + g2
    rows_g = gl.minimum(row_g, N - 1)  # rows past N re-read the last one; never stored
    rows_h = gl.minimum(row_g + 8, N - 1)
    word = gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(0, TWO)), 0)
    w_g = w_ptr + gl.expand_dims(rows_g * stride_w + 2 * c2, 1) + word
    w_h = w_ptr + gl.expand_dims(rows_h * stride_w + 2 * c2, 1) + word
    s_g = absmax_ptr + rows_g * stride_a
    s_h = absmax_ptr + rows_h * stride_a

    t8 = gl.arange(0, 32 * W, layout=gl.SliceLayout(1, EIGHT))
    g8 = (t8 % 32) // 4
    pair = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, EIGHT)), 0)
    x_ptrs = x_ptr + gl.expand_dims(g8 * stride_xm + 8 * (t8 % 4), 1) + pair
    x_ok = gl.expand_dims(g8 < M, 1) & (pair < 8)

    stride: gl.constexpr = _STEP * SPLIT_K
    k0 = pid_k * _STEP
    # The first iteration's words are requested before the table is filled, to overlap it.
    wg0, wh0, sg0, sh0 = _load_step(w_g, w_h, s_g, s_h, k0, K, BLOCKSIZE)
    wg1, wh1, sg1, sh1 = _load_step(w_g, w_h, s_g, s_h, k0 + stride, K, BLOCKSIZE)
    if STEPS == 4:
        wg2, wh2, sg2, sh2 = _load_step(w_g, w_h, s_g, s_h, k0 + 2 * stride, K, BLOCKSIZE)
        wg3, wh3, sg3, sh3 = _load_step(w_g, w_h, s_g, s_h, k0 + 3 * stride, K, BLOCKSIZE)
    fill_half_pair_table(table_ptr, X_FP16, WIDE, W)
    lane = gl.inline_asm_elementwise(
        _LANE, "=r,r", [gl.zeros([32 * W], gl.int32, ONE)], dtype=gl.int32, is_pure=True, pack=1
    )
    copy_offset = lane * 4
    # Launched as a programmatic dependent (PDL; matmul_4bit), the program starts while the
    # kernel before it finishes: everything above reads only weights, scales and the code
    # table, which no kernel of a forward pass writes; x is read after this wait.
    if PDL:
        gdc_wait()

    acc0 = gl.zeros([32 * W], gl.float32, ONE)
    acc1 = gl.zeros([32 * W], gl.float32, ONE)
    acc2 = gl.zeros([32 * W], gl.float32, ONE)
    acc3 = gl.zeros([32 * W], gl.float32, ONE)
    for k0 in range(pid_k * _STEP, K, STEPS * stride):
        acc0, acc1, acc2, acc3 = _mma_step(
            acc0, acc1, acc2, acc3, wg0, wh0, sg0, sh0, x_ptrs, x_ok, k0, K, copy_offset,
            X_FP16, WIDE, ONE,
        )  # fmt: skip
        acc0, acc1, acc2, acc3 = _mma_step(
            acc0, acc1, acc2, acc3, wg1, wh1, sg1, sh1, x_ptrs, x_ok, k0 + stride, K,
            copy_offset, X_FP16, WIDE, ONE,
        )  # fmt: skip
        if STEPS == 4:
            acc0, acc1, acc2, acc3 = _mma_step(
                acc0, acc1, acc2, acc3, wg2, wh2, sg2, sh2, x_ptrs, x_ok, k0 + 2 * stride, K,
                copy_offset, X_FP16, WIDE, ONE,
            )  # fmt: skip
            acc0, acc1, acc2, acc3 = _mma_step(
                acc0, acc1, acc2, acc3, wg3, wh3, sg3, sh3, x_ptrs, x_ok, k0 + 3 * stride, K,
                copy_offset, X_FP16, WIDE, ONE,
            )  # fmt: skip
        ahead = k0 + STEPS * stride
        wg0, wh0, sg0, sh0 = _load_step(w_g, w_h, s_g, s_h, ahead, K, BLOCKSIZE)
        wg1, wh1, sg1, sh1 = _load_step(w_g, w_h, s_g, s_h, ahead + stride, K, BLOCKSIZE)
        if STEPS == 4:
            wg2, wh2, sg2, sh2 = _load_step(w_g, w_h, s_g, s_h, ahead + 2 * stride, K, BLOCKSIZE)
            wg3, wh3, sg3, sh3 = _load_step(w_g, w_h, s_g, s_h, ahead + 3 * stride, K, BLOCKSIZE)

    # C fragment: acc0, acc1 = (row g; x rows 2c, 2c + 1), acc2, acc3 = (row g + 8; the same).
    t = gl.arange(0, 32 * W, layout=ONE)
    o_row = n0 + (t // 32) * 16 + (t % 32) // 4
    o_m = 2 * (t % 4)
    out = out_ptr + pid_k * stride_ok
    gl.store(out + o_m * stride_om + o_row, acc0.to(out_ptr.dtype.element_ty),
             mask=(o_m < M) & (o_row < N))  # fmt: skip
    gl.store(out + (o_m + 1) * stride_om + o_row, acc1.to(out_ptr.dtype.element_ty),
             mask=(o_m + 1 < M) & (o_row < N))  # fmt: skip
    gl.store(out + o_m * stride_om + o_row + 8, acc2.to(out_ptr.dtype.element_ty),
             mask=(o_m < M) & (o_row + 8 < N))  # fmt: skip
    gl.store(out + (o_m + 1) * stride_om + o_row + 8, acc3.to(out_ptr.dtype.element_ty),
             mask=(o_m + 1 < M) & (o_row + 8 < N))  # fmt: skip
