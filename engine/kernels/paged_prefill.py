"""Prefill attention straight over the paged KV cache, in Triton: the queries of a group of
sequences (whole prompts, prompt chunks after cached tokens, sliding windows), each attending
causally to its own sequence's cached tokens, with nothing gathered and no mask built.

One program per (sequence, block of its queries, KV head) walks the sequence's block table a
tile of tokens at a time with an online softmax, from the first token any of its queries sees
to the last one (its causal end); the query heads that share the KV head (GQA) ride along as
rows of the same `tl.dot`, as in the decode kernel.

Why not PyTorch's SDPA over the gathered blocks, as the portable path does: on an H200 (torch
2.11) its default backend for a boolean mask, cuDNN, builds a plan on the first call of every
new shape (number of sequences, query length, context length): 46-106 ms, once 706 ms
(benchmarks/results/prefill_attention_h200.json), and nearly every prefill a server sees brings
a new shape. The memory-efficient backend has no such cost but no GQA, and is slower. Warm, the
kernel took 0.9-2.8x less time than SDPA with its gather in that run."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.paged_attention import cache_rows
from engine.kernels.pdl import pdl_launch, pdl_start


# Not specialized on what varies from step to step (Triton would compile a variant per
# divisibility class of each, inside requests).
@triton.jit(do_not_specialize=["sliding_window", "max_query_len", "stride_bt", "stride_qp_seq"])
def _paged_prefill(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, query_positions_ptr,
    rows_ptr, out_ptr, scale, sliding_window, max_query_len,
    stride_q_tok, stride_q_head, stride_bt, stride_qp_seq, stride_qp_query,
    stride_o_tok, stride_o_head, stride_c_block, stride_c_tok, stride_c_head,
    QUERY_GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    PRECISION: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Row r of the program's [BLOCK_Q * GROUP_PAD, HEAD_DIM] tile is query r // GROUP_PAD of
    its block, head r % GROUP_PAD of its KV head's group. rows [seq, max_query_len]: each
    query's row in q and out (-1: padding, neither read nor written)."""
    pdl_start(PDL)
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_Q * GROUP_PAD)
    query = q_block * BLOCK_Q + offs_m // GROUP_PAD
    group = offs_m % GROUP_PAD
    in_block = query < max_query_len
    row = tl.load(rows_ptr + seq * max_query_len + query, mask=in_block, other=-1)
    pos = tl.load(
        query_positions_ptr + seq * stride_qp_seq + query * stride_qp_query, mask=in_block,
        other=0,
    )  # fmt: skip
    live = (row >= 0) & (group < QUERY_GROUP)
    heads = kv_head * QUERY_GROUP + group
    offs_d = tl.arange(0, HEAD_DIM)
    row = tl.where(live, row, 0).to(tl.int64)
    q = tl.load(
        q_ptr + row[:, None] * stride_q_tok + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=live[:, None], other=0.0,
    )  # fmt: skip
    # The tokens any live query sees: up to the last one's position (never past the context),
    # from the first one's window (whole tiles).
    ctx = tl.load(context_lens_ptr + seq)
    end = tl.minimum(tl.max(tl.where(live, pos, -1)) + 1, ctx)
    start = ctx * 0  # ctx's integer type on both branches
    if sliding_window > 0:
        start = tl.maximum(tl.min(tl.where(live, pos, end)) - sliding_window + 1, 0)
    start = start // TILE * TILE
    m_i = tl.full((BLOCK_Q * GROUP_PAD,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_Q * GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_Q * GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    for t0 in range(start, end, TILE):
        offs_t = t0 + tl.arange(0, TILE)
        t_ok = offs_t < end
        rows = cache_rows(
            block_tables_ptr + seq * stride_bt, offs_t, t_ok, kv_head, stride_c_block,
            stride_c_tok, stride_c_head, BLOCK_SIZE,
        )  # fmt: skip
        k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        k = k.to(q.dtype)  # an fp8 cache widens here (a no-op otherwise)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        seen = live[:, None] & t_ok[None, :] & (offs_t[None, :] <= pos[:, None])
        if sliding_window > 0:
            seen &= offs_t[None, :] > pos[:, None] - sliding_window
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen nothing yet (padding, or a tile before its window) keeps
        # m = -inf; exponents are taken from 0 there so that they give 0, not NaN.
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp(s - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + rows[:, None] + offs_d[None, :], mask=t_ok[:, None], other=0.0)
        v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + row[:, None] * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=live[:, None],
    )  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    flat_index: torch.Tensor,
    query_positions: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [tokens, num_heads, head_dim] (heads contiguous), the group's queries in sequence
    order; flat_index [tokens]: each one's place in the padded [num_seqs, max_query_len] block
    of query_positions (its position); block_tables [num_seqs, width]; context_lens [num_seqs]:
    the tokens in the cache, this step's included (written before the call). A query attends to
    its sequence's tokens at positions up to its own (within the sliding window). Returns q's
    shape. key/value_cache: [num_blocks, block_size, num_kv_heads, head_dim]. rows:
    `query_rows(flat_index, num_seqs, max_query_len)`, where the caller keeps it for every
    layer of a step (computed here otherwise)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs, max_query_len = query_positions.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    if rows is None:
        rows = query_rows(flat_index, num_seqs, max_query_len)
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(16, 64 // group_pad)  # 64 rows a tile (more for groups above 4)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _paged_prefill[grid](
        q, key_cache, value_cache, block_tables, context_lens, query_positions, rows, out,
        scale, sliding_window or 0, max_query_len,
        q.stride(0), q.stride(1), block_tables.stride(0), query_positions.stride(0),
        query_positions.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        QUERY_GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=max(64, block_size),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
        **pdl_launch(q.device),
    )  # fmt: skip
    return out


def query_rows(flat_index: torch.Tensor, num_seqs: int, max_query_len: int) -> torch.Tensor:
    """Each place of the padded [num_seqs, max_query_len] query block: its query's row in q
    (flat_index inverted), or -1 for padding. int32, flat."""
    rows = torch.full((num_seqs * max_query_len,), -1, dtype=torch.int32, device=flat_index.device)
    rows[flat_index] = torch.arange(len(flat_index), dtype=torch.int32, device=flat_index.device)
    return rows
