"""Fused RMSNorm (with the residual add), SiLU-and-mul and rotary embedding, in Triton.

Each replaces several PyTorch kernels with one. They round where the PyTorch reference rounds
(the normalised value to the activation dtype before the weight; silu before the product), so
they give the same numbers as the portable path up to fp32 rounding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import pdl_launch, pdl_start


@triton.jit
def _rms_norm(
    x_ptr, residual_ptr, weight_ptr, out_ptr, eps, stride_x, stride_r, stride_o, width,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    ok = offs < width
    # The weight is no kernel's output: requested before the wait, it is not one more memory
    # latency after the reduction (where the compiler would otherwise issue it).
    w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    pdl_start(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=ok, other=0.0).to(tl.float32)
        x = (x + r).to(out_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=ok)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """weight * norm(x), or with `residual`: residual += x (in place) and weight * norm(residual).
    x: [tokens, hidden] (last dim contiguous)."""
    out = torch.empty_like(x)
    rows, width = x.shape
    if rows:
        _rms_norm[(rows,)](
            x, residual if residual is not None else x, weight, out, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), width,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(width),
            num_warps=8 if width >= 4096 else 4, **pdl_launch(x.device),
        )  # fmt: skip
    return out


@triton.jit
def _silu_and_mul(
    x_ptr, out_ptr, stride_x, stride_o, width, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < width
    gate = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + offs, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(out_ptr.dtype.element_ty), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up]: [tokens, 2 * width] -> [tokens, width]."""
    rows, double = x.shape
    width = double // 2
    out = torch.empty((rows, width), dtype=x.dtype, device=x.device)
    if rows:
        block = 1024
        _silu_and_mul[(rows, triton.cdiv(width, block))](
            x, out, x.stride(0), out.stride(0), width, BLOCK=block, num_warps=4,
            **pdl_launch(x.device),
        )  # fmt: skip
    return out


@triton.jit
def _rotary(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, stride_q_tok, stride_k_tok, stride_cos,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_start(PDL)
    token = tl.program_id(0)
    pos = tl.load(positions_ptr + token)
    offs_d = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d)[None, :]
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d)[None, :]
    offs_h = tl.arange(0, HEADS_PAD)
    for which in tl.static_range(2):
        if which == 0:
            base = q_ptr + token * stride_q_tok
            ok = (offs_h < NUM_HEADS)[:, None]
        else:
            base = k_ptr + token * stride_k_tok
            ok = (offs_h < NUM_KV_HEADS)[:, None]
        first = base + offs_h[:, None] * (2 * HALF) + offs_d[None, :]
        x1 = tl.load(first, mask=ok, other=0.0)
        x2 = tl.load(first + HALF, mask=ok, other=0.0)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        tl.store(first, (x1 * cos - x2 * sin).to(dtype), mask=ok)
        tl.store(first + HALF, (x2 * cos + x1 * sin).to(dtype), mask=ok)


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotates q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] in place (rotate-half
    layout); cos/sin: [max_position, head_dim / 2] fp32. Heads must be contiguous per token."""
    tokens, num_heads, head_dim = q.shape
    if tokens:
        _rotary[(tokens,)](
            q, k, positions, cos, sin, q.stride(0), k.stride(0), cos.stride(0),
            NUM_HEADS=num_heads, NUM_KV_HEADS=k.shape[1],
            HEADS_PAD=triton.next_power_of_2(max(num_heads, k.shape[1])), HALF=head_dim // 2,
            num_warps=4, **pdl_launch(q.device),
        )  # fmt: skip
