"""The portable 4-bit tensor-core matmul (Triton, any GPU): W decoded from bitsandbytes' packed
bytes (`decode_4bit.py`), scaled and cast to x's dtype in registers, then `tl.dot`, x's even and
odd columns meeting W's high and low nibbles as two dots. The Hopper kernels (`mma_4bit.py`,
`wgmma_4bit.py`) beat it there; `matmul_4bit.py` chooses by measurement."""

from __future__ import annotations

import triton
import triton.language as tl

from engine.kernels.decode_4bit import CONSTRAINTS, DECODE_ASM

_CONSTRAINTS = tl.constexpr(CONSTRAINTS)
_DECODE_ASM = tl.constexpr(DECODE_ASM)


@triton.jit
def _decode(packed, t0, t1, t2, t3, t4, t5, t6, t7):
    """uint8 bytes -> (high-nibble value, low-nibble value) as fp32 codes, given the code table's
    eight words (decode_4bit.py)."""
    return tl.inline_asm_elementwise(
        _DECODE_ASM, _CONSTRAINTS, [packed, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=(tl.float32, tl.float32), is_pure=True, pack=4,
    )  # fmt: skip


@triton.jit(do_not_specialize=["M"])  # row counts vary per eager step (wgmma_4bit.py)
def gemm_4bit_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, W_LEFT: tl.constexpr,
):  # fmt: skip
    """More rows: out^T[BLOCK_N, BLOCK_M] += W_high x_even^T + W_low x_odd^T on tensor cores, W
    decoded, scaled and cast to x's dtype in registers. W_LEFT: W is the dot's left operand (it
    stays in registers); else the right one (x tiles go in as the left, W through shared memory).
    Which is faster depends on the GPU and M; the tuner measures both."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    half_k: tl.constexpr = BLOCK_K // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_b = tl.arange(0, half_k)
    w_base = w_ptr + rows[:, None] * stride_w + offs_b[None, :]
    if W_LEFT:  # x tiles [half_k, BLOCK_M], acc = out^T
        x_base = x_ptr + offs_m[None, :] * stride_xm + 2 * offs_b[:, None]
        x_rows_ok = m_ok[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:  # x tiles [BLOCK_M, half_k], acc = out
        x_base = x_ptr + offs_m[:, None] * stride_xm + 2 * offs_b[None, :]
        x_rows_ok = m_ok[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dot_dtype = x_ptr.dtype.element_ty
    # The code table, one copy per lane (decode_4bit.code_table), read per thread: ordinary
    # registers, which prmt reads directly (uniform ones would be copied at every use).
    t_ptrs = table_ptr + (offs_n[:, None] % 32) * 16  # TABLE_STRIDE; the bf16 words
    t0, t1, t2, t3 = [tl.load(t_ptrs + i) for i in (0, 1, 2, 3)]
    t4, t5, t6, t7 = [tl.load(t_ptrs + i) for i in (4, 5, 6, 7)]
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        scale_offs = rows[:, None] * stride_a + (k0 + 2 * offs_b[None, :]) // BLOCKSIZE
        if EVEN_K:
            packed = tl.load(w_base + k0 // 2)
            scale = tl.load(absmax_ptr + scale_offs)
            x_even = tl.load(x_base + k0, mask=x_rows_ok, other=0.0)
            x_odd = tl.load(x_base + k0 + 1, mask=x_rows_ok, other=0.0)
        else:
            b_ok = (k0 + 2 * offs_b) < K
            packed = tl.load(w_base + k0 // 2, mask=b_ok[None, :], other=0)
            scale = tl.load(absmax_ptr + scale_offs, mask=b_ok[None, :], other=0.0)
            if W_LEFT:
                x_ok = b_ok[:, None] & x_rows_ok
            else:
                x_ok = b_ok[None, :] & x_rows_ok
            x_even = tl.load(x_base + k0, mask=x_ok, other=0.0)
            x_odd = tl.load(x_base + k0 + 1, mask=x_ok, other=0.0)
        high, low = _decode(packed, t0, t1, t2, t3, t4, t5, t6, t7)
        w_even = (high * scale).to(dot_dtype)
        w_odd = (low * scale).to(dot_dtype)
        if W_LEFT:
            acc = tl.dot(w_even, x_even, acc)
            acc = tl.dot(w_odd, x_odd, acc)
        else:
            acc = tl.dot(x_even, tl.trans(w_even), acc)
            acc = tl.dot(x_odd, tl.trans(w_odd), acc)
    if W_LEFT:
        out_offs = pid_k * stride_ok + offs_m[None, :] * stride_om + offs_n[:, None]
        out_ok = m_ok[None, :] & (offs_n < N)[:, None]
    else:
        out_offs = pid_k * stride_ok + offs_m[:, None] * stride_om + offs_n[None, :]
        out_ok = m_ok[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)
