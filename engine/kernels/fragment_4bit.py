"""Decoding 4-bit weights straight into a tensor-core MMA's A fragment, in the fragment's own K
order (`mma_4bit.py`).

A warp owns 16 weight rows; lane (g, c) = (lane / 4, lane % 4) holds rows g and g + 8, the rows
the A fragment of `mma.sync` m16n8k16 gives it. Per step of 128 values it loads 16 consecutive
bytes of each row (bytes 16c..16c+15, one 128-bit load, under one absmax) as four int32 words:
bytes kept across loop iterations would be re-packed into registers one by one. An MMA sums
over K in any order, so the kernel lets K run in the order the lanes hold it: within a step,
physical k = 16j + 8h + 2c + e is value 32c + 4j + 2h + e of the row (byte 16c + 2j + h,
nibble e). x must meet it in that same order (`x_in_fragment_order`), so the product is exact."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from engine.kernels.decode_4bit import decode_word_pairs

STEP_VALUES = gl.constexpr(128)  # K per step: 16 bytes per lane and row, 4 lanes per row
_UNPACK = gl.constexpr("mov.b32 {$0, $1}, $2;")  # a pair register as its two 16-bit halves


@gluon.constexpr_function
def word_layout(num_warps):
    """Weight words [w, h, g, c, word]: row 16w + 8h + g; lane 4g + c; 16 bytes per lane and row."""
    return gl.BlockedLayout(
        [1, 2, 1, 1, 4], [1, 1, 8, 4, 1], [num_warps, 1, 1, 1, 1], [4, 3, 2, 1, 0]
    )


@gluon.jit
def lane_coordinates(W: gl.constexpr):
    """This lane's coordinates in `word_layout(W)`: the local row 16w + 8h + g [w, h, g, 1], the
    chunk c [1, 1, 1, 4], the word [1, 1, 1, 1, 4], and a lane index for `load_code_table`."""
    s_layout: gl.constexpr = gl.SliceLayout(4, word_layout(W))
    L0: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, s_layout)))
    L1: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, s_layout)))
    L2: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, s_layout)))
    L3: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, s_layout)))
    r_w = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, W, layout=L0), 1), 2), 3)
    r_h = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 2, layout=L1), 0), 2), 3)
    r_g = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 8, layout=L2), 0), 1), 3)
    c = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=L3), 0), 1), 2)
    word = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(
        2, gl.SliceLayout(3, word_layout(W))))))  # fmt: skip
    word = gl.expand_dims(gl.expand_dims(gl.expand_dims(gl.expand_dims(word, 0), 1), 2), 3)
    return 16 * r_w + 8 * r_h + r_g, c, word, gl.expand_dims(4 * r_g + c, 4)


@gluon.jit
def weight_pointers(
    w_ptr, absmax_ptr, rows, c, word, stride_w, stride_a, BLOCKSIZE: gl.constexpr
):  # fmt: skip
    """Step 0's word pointers [w, h, g, c, word] and absmax pointers [w, h, g, c] of `rows`."""
    chunk_ptrs = w_ptr + gl.expand_dims(rows * stride_w + 16 * c, 4)  # 16-byte aligned
    w_ptrs = chunk_ptrs.to(gl.pointer_type(gl.int32), bitcast=True) + word
    s_ptrs = absmax_ptr + rows * stride_a + (32 * c) // BLOCKSIZE
    return w_ptrs, s_ptrs


@gluon.jit
def load_words(w_ptrs, s_ptrs, k, k_end, chunk_end, BLOCKSIZE: gl.constexpr):
    """The step at value k: weight words [w, h, g, c, word] and absmax [w, h, g, c], zeros for
    the 16-byte chunks past k_end (`chunk_end`: 32c + 32), which request nothing."""
    ok = k + chunk_end <= k_end
    packed = gl.load(w_ptrs + k // 8, mask=gl.expand_dims(ok, 4), other=0)
    scale = gl.load(s_ptrs + k // BLOCKSIZE, mask=ok, other=0.0)
    return packed, scale


@gluon.jit
def a_fragment(
    packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16: gl.constexpr, A_LAYOUT: gl.constexpr
):  # fmt: skip
    """One step's words -> the A operand [16 * num_warps, 128] in physical K order."""
    pairs = decode_word_pairs(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, X_FP16)
    half = gl.float16 if X_FP16 else gl.bfloat16
    even, odd = gl.inline_asm_elementwise(
        _UNPACK, "=h,=h,r", [pairs], dtype=(half, half), is_pure=True, pack=1
    )
    w = gl.join(even, odd)  # [w, h, g, c, word, 2, 2, nibble]: byte = 4 word + ...
    # byte = 2j + h2 -> [w, h, g, c, j, h2, nibble] -> [w, h, g, j, h2, c, nibble]
    w = gl.reshape(w, [w.shape[0], 2, 8, 4, 8, 2, 2])
    w = gl.permute(w, [0, 1, 2, 4, 5, 3, 6])
    return gl.convert_layout(gl.reshape(w, [w.shape[0] * 16, 128]), A_LAYOUT)


@gluon.jit
def x_in_fragment_order(xs):
    """x values [n, c, 32] (value 32c + v of a step) -> [n, 128] in physical K order."""
    n: gl.constexpr = xs.shape[0]
    # [n, c, value = 4j + 2h2 + e] -> [n, j, h2, c, e]: physical 16j + 8h2 + 2c + e
    x = gl.permute(gl.reshape(xs, [n, 4, 8, 2, 2]), [0, 2, 3, 1, 4])
    return gl.reshape(x, [n, 128])
