"""Decode attention straight over the paged KV cache, and the cache write, in Triton.

One program per (sequence, KV head, split) walks its share of the sequence's block table a tile
of tokens at a time with an online softmax; the query heads that share the KV head (GQA) ride
along as the rows of one `tl.dot`. Nothing is gathered or padded on the host side, so the launch
is the same for any mix of context lengths: CUDA graphs capture it once per batch size.

With few sequences (batch 1: one program per KV head, a quarter of an H200's SMs) the context is
split (flash-decoding): each split's program writes its unnormalized sum with its running max
and denominator, and `_combine_splits` rescales and adds them. The split count depends only on
the batch shape, never on context lengths, so it is fixed inside a captured graph."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.gpu_info import sm_count
from engine.kernels.pdl import pdl_launch, pdl_start

MAX_SPLITS = 8


@triton.jit
def _paged_decode(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    partial_ptr, stats_ptr, scale, sliding_window,
    stride_q_tok, stride_q_head, stride_bt, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_tok, stride_c_head,
    QUERY_GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """NUM_SPLITS == 1: out gets the attention. Otherwise partial [seq, head, split, HEAD_DIM]
    gets each split's unnormalized sum and stats [seq, head, split, 2] its (max, denominator)."""
    pdl_start(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    offs_g = tl.arange(0, GROUP_PAD)
    g_ok = offs_g < QUERY_GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * QUERY_GROUP + offs_g
    q = tl.load(
        q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=g_ok[:, None], other=0.0,
    )  # fmt: skip
    m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    first = ctx * 0  # ctx's integer type on both branches
    if sliding_window > 0:  # the query sits at position ctx - 1
        first = tl.maximum(ctx - sliding_window, 0)
    # This split's tiles: an equal share of those the window covers (possibly none).
    first_tile = first // TILE
    per_split = (tl.cdiv(ctx, TILE) - first_tile + NUM_SPLITS - 1) // NUM_SPLITS
    start = (first_tile + split * per_split) * TILE
    end = tl.minimum(ctx, start + per_split * TILE)
    for t0 in range(start, end, TILE):
        offs_t = t0 + tl.arange(0, TILE)
        t_ok = (offs_t < ctx) & (offs_t >= first)
        blocks = tl.load(
            block_tables_ptr + seq * stride_bt + offs_t // BLOCK_SIZE, mask=t_ok, other=0
        )
        rows = (
            blocks.to(tl.int64) * stride_c_block
            + (offs_t % BLOCK_SIZE) * stride_c_tok
            + kv_head * stride_c_head
        )
        k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        k = k.to(q.dtype)  # an fp8 cache widens here (a no-op otherwise)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + rows[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty (padding) row gives zeros
        tl.store(
            out_ptr + seq * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None],
        )  # fmt: skip
    else:
        row = (seq * tl.num_programs(1) * QUERY_GROUP + heads) * NUM_SPLITS + split
        tl.store(partial_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None])
        tl.store(stats_ptr + row * 2, m_i, mask=g_ok)
        tl.store(stats_ptr + row * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _combine_splits(
    partial_ptr, stats_ptr, out_ptr, num_heads, stride_o_tok, stride_o_head,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per (sequence, head): the splits' sums, each rescaled to the common max."""
    pdl_start(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = (seq * num_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    m = tl.load(stats_ptr + row * 2)
    den = tl.load(stats_ptr + row * 2 + 1)
    m_max = tl.max(m, axis=0)
    # Splits with no tokens hold max -inf: weight zero (and no NaN when every split is empty).
    weight = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(partial_ptr + row[:, None] * HEAD_DIM + offs_d[None, :])
    total = tl.sum(acc * weight[:, None], axis=0)
    den_total = tl.sum(den * weight, axis=0)
    out = total / tl.where(den_total > 0, den_total, 1.0)  # an empty (padding) row gives zeros
    tl.store(
        out_ptr + seq * stride_o_tok + head * stride_o_head + offs_d,
        out.to(out_ptr.dtype.element_ty),
    )


def default_num_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits of the context per (sequence, KV head): enough programs for two per SM, and one
    split once the batch alone fills the GPU."""
    if device.type != "cuda":  # Triton's CPU interpreter (tests)
        return 1
    programs = num_seqs * num_kv_heads
    sms = sm_count(device)
    if programs >= sms:
        return 1
    return min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(2 * sms, programs)))


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim], one query per sequence at position context_len - 1.
    key/value_cache: [num_blocks, block_size, num_kv_heads, head_dim]. Returns q's shape.
    num_splits (a power of two up to MAX_SPLITS): how many programs share each sequence's
    context; by default `default_num_splits`."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, q.device)
    if num_splits not in (1, 2, 4, 8):
        raise ValueError(f"num_splits must be 1, 2, 4 or 8, got {num_splits}")
    partial = stats = out  # unused with one split
    if num_splits > 1:
        partial = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        stats = torch.empty(
            (num_seqs, num_heads, num_splits, 2), dtype=torch.float32, device=q.device
        )
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _paged_decode[(num_seqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, block_tables, context_lens, out, partial, stats,
        scale, sliding_window or 0,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        QUERY_GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=max(64, block_size), PRECISION=precision,
        NUM_SPLITS=num_splits, num_warps=4, **pdl_launch(q.device),
    )  # fmt: skip
    if num_splits > 1:
        _combine_splits[(num_seqs, num_heads)](
            partial, stats, out, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, num_warps=4, **pdl_launch(q.device),
        )  # fmt: skip
    return out


@triton.jit
def _store_kv(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_v_tok, stride_c_slot,
    KV_WIDTH: tl.constexpr, WIDTH_PAD: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl_start(PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs = tl.arange(0, WIDTH_PAD)
    ok = (offs < KV_WIDTH) & (slot >= 0)  # slot -1: a CUDA-graph padding row, not stored
    k = tl.load(k_ptr + token * stride_k_tok + offs, mask=ok)
    v = tl.load(v_ptr + token * stride_v_tok + offs, mask=ok)
    cache_dtype = k_cache_ptr.dtype.element_ty  # the model's dtype, or fp8 (rounded here)
    tl.store(k_cache_ptr + slot * stride_c_slot + offs, k.to(cache_dtype), mask=ok)
    tl.store(v_cache_ptr + slot * stride_c_slot + offs, v.to(cache_dtype), mask=ok)


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Writes each token's keys and values ([tokens, kv_heads * head_dim], rows may be strided
    views of the fused qkv output) into its cache slot; tokens with slot -1 are skipped."""
    num_tokens, width = k.shape
    if num_tokens == 0:
        return
    _store_kv[(num_tokens,)](
        k, v, key_cache, value_cache, slot_mapping, k.stride(0), v.stride(0), width,
        KV_WIDTH=width, WIDTH_PAD=triton.next_power_of_2(width), num_warps=4,
        **pdl_launch(k.device),
    )  # fmt: skip
