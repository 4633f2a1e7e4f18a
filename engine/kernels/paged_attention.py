"""Decode attention straight over the paged KV cache, and the cache write, in Triton.

One program per (sequence, KV head, split) walks its share of the sequence's block table a tile
of tokens at a time with an online softmax; the query heads that share the KV head (GQA) ride
along as the rows of one `tl.dot`. Nothing is gathered or padded on the host side, so the launch
is the same for any mix of context lengths: CUDA graphs capture it once per batch size.

With few sequences (batch 1: one program per KV head, a quarter of an H200's SMs) the context is
split (flash-decoding): each split's program writes its unnormalized sum with its running max
and denominator, and the last of a (sequence, KV head)'s splits to finish (an atomic count per
pair, which that program resets) rescales and adds them: no second kernel. The split count
depends on the batch shape and, capped at the longest context's tile count (`split_count`),
on a host-side number: a captured graph holds one count, and small batch buckets have a graph
per count (engine/cuda_graphs.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.kernels.gpu_info import sm_count
from engine.kernels.pdl import pdl_launch, pdl_start

MAX_SPLITS = 8


@triton.jit
def _paged_decode(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    partial_ptr, stats_ptr, counts_ptr, scale, sliding_window,
    stride_q_tok, stride_q_head, stride_bt, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_tok, stride_c_head,
    positions_ptr, cos_ptr, sin_ptr, k_new_ptr, v_new_ptr, slot_mapping_ptr,
    stride_cos, stride_k_tok, stride_v_tok,
    QUERY_GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
    NUM_SPLITS: tl.constexpr, PDL: tl.constexpr, ROTARY: tl.constexpr = False,
    FP16_DOTS: tl.constexpr = False,
):  # fmt: skip
    """NUM_SPLITS == 1: out gets the attention. Otherwise partial [seq, head, split, HEAD_DIM]
    gets each split's unnormalized sum and stats [seq, head, split, 2] its (max, denominator),
    counts [seq, kv_head] (zero between launches) how many splits are done, and the last one
    writes out. Splits whose share of the context is empty do nothing (split 0 always runs:
    it writes an empty row's zeros). ROTARY: q is this step's query before the rotary
    embedding, and the step's new key and value (k_new, v_new, before it too) are not in the
    cache yet: each program rotates its query heads, and the program whose share holds
    position ctx - 1 rotates the key and writes both into slot_mapping's slot. Since nothing
    else in the step writes this layer's cache, a ROTARY program loads its first tile of keys
    and values (all but the new token) before it waits for the kernel before it. FP16_DOTS
    (a bf16 query over an e4m3 cache): the dots run in fp16, to which e4m3 widens in one
    conversion per value pair, where bf16 takes a second conversion per value (e5m2 widens to
    bf16 by bit operations, with none, and keeps the bf16 dots). Whether those conversions
    bound the kernel over an fp8 cache is still to be measured (benchmarks/decode_attention.py).
    The context length is taken as int32 (the engine passes int64): 37 fewer registers in the
    one-split launch over an fp8 cache in an sm_90 compile."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ROTARY:
        if PDL:
            gdc_launch_dependents()  # the wait comes after the first tile's loads
    else:
        pdl_start(PDL)  # the kernel before wrote the new token's key and value
    # Graph inputs, written before the step's first kernel: safe to read before the wait.
    ctx = tl.load(context_lens_ptr + seq).to(tl.int32)
    first = ctx * 0  # ctx's integer type on both branches
    if sliding_window > 0:  # the query sits at position ctx - 1
        first = tl.maximum(ctx - sliding_window, 0)
    # This split's tiles: an equal share of those the window covers (possibly none).
    first_tile = first // TILE
    tiles = tl.cdiv(ctx, TILE) - first_tile
    per_split = (tiles + NUM_SPLITS - 1) // NUM_SPLITS
    busy_splits = tl.maximum(tl.cdiv(tiles, tl.maximum(per_split, 1)), 1)
    if split < busy_splits:
        start = (first_tile + split * per_split) * TILE
        end = tl.minimum(ctx, start + per_split * TILE)
        bt_row = block_tables_ptr + seq * stride_bt
        offs_d = tl.arange(0, HEAD_DIM)
        if ROTARY:  # the first tile's cached tokens (all but the new one), before the wait
            k, v = _load_tile(
                k_cache_ptr, v_cache_ptr, bt_row, start + tl.arange(0, TILE), first,
                tl.minimum(end, ctx - 1), kv_head, offs_d, stride_c_block, stride_c_tok,
                stride_c_head, BLOCK_SIZE,
            )  # fmt: skip
        offs_g = tl.arange(0, GROUP_PAD)
        g_ok = offs_g < QUERY_GROUP
        heads = kv_head * QUERY_GROUP + offs_g
        q_rows = q_ptr + seq * stride_q_tok + heads[:, None] * stride_q_head
        if ROTARY:
            # The rotary tables and the step's positions and slots are no kernel's output
            # either: requested before the wait too.
            half: tl.constexpr = HEAD_DIM // 2
            offs_h = tl.arange(0, half)
            pos = tl.load(positions_ptr + seq)
            cos = tl.load(cos_ptr + pos * stride_cos + offs_h)
            sin = tl.load(sin_ptr + pos * stride_cos + offs_h)
            slot = tl.load(slot_mapping_ptr + seq).to(tl.int64)
            if PDL:
                gdc_wait()
            q1, q2 = _rotate_half(
                q_rows + offs_h[None, :], half, cos[None, :], sin[None, :], g_ok[:, None]
            )
            q = tl.reshape(tl.permute(tl.join(q1, q2), (0, 2, 1)), (GROUP_PAD, HEAD_DIM))
            k_row = k_new_ptr + seq * stride_k_tok + kv_head * HEAD_DIM
            k1, k2 = _rotate_half(k_row + offs_h, half, cos, sin, offs_h < half)
            v_new = tl.load(v_new_ptr + seq * stride_v_tok + kv_head * HEAD_DIM + offs_d)
            cache_dtype = k_cache_ptr.dtype.element_ty  # fp8 caches round here, as store_kv
            k1 = k1.to(cache_dtype)
            k2 = k2.to(cache_dtype)
            v_new = v_new.to(cache_dtype)
            # The program whose tiles hold the new token writes it (none for a padding row).
            owner = (ctx - 1) // TILE - first_tile
            if (per_split > 0) & (owner // tl.maximum(per_split, 1) == split) & (slot >= 0):
                target = slot * stride_c_tok + kv_head * stride_c_head
                tl.store(k_cache_ptr + target + offs_h, k1)
                tl.store(k_cache_ptr + target + half + offs_h, k2)
                tl.store(v_cache_ptr + target + offs_d, v_new)
            tl.debug_barrier()  # the new token is in the cache before any thread reads it
            # ... and in the first tile, if that holds it, from registers.
            is_new = (start + tl.arange(0, TILE) == ctx - 1)[:, None]
            k_new = tl.reshape(tl.permute(tl.join(k1, k2), (1, 0)), (HEAD_DIM,))
            k = tl.where(is_new, k_new[None, :].to(k.dtype), k)
            v = tl.where(is_new, v_new[None, :].to(v.dtype), v)
        else:
            q = tl.load(q_rows + offs_d[None, :], mask=g_ok[:, None], other=0.0)
        if FP16_DOTS:  # clamped: a bf16 value past fp16's range would become inf (NaN stays)
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL)
            q = q.to(tl.float16)
        m_i = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
        if ROTARY:
            # Each tile's keys and values are requested as the tile before it is done with (the
            # first's before the wait): at batch 1 the loads are what the program waits on.
            for t0 in range(start, end, TILE):
                offs_t = t0 + tl.arange(0, TILE)
                t_ok = (offs_t < ctx) & (offs_t >= first)
                p, alpha, m_i, l_i = _softmax_step(q, k, t_ok, m_i, l_i, scale, PRECISION)
                v = v.to(q.dtype)  # an fp8 cache widens here (a no-op otherwise)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                k, v = _load_tile(
                    k_cache_ptr, v_cache_ptr, bt_row, offs_t + TILE, first, end, kv_head, offs_d,
                    stride_c_block, stride_c_tok, stride_c_head, BLOCK_SIZE,
                )  # fmt: skip
        else:
            # Keys, then values once the scores are done: both tiles at once, or the next
            # tile's requested during this one, need more registers than the SM can give
            # programs that many (measured 1.3-1.7x slower at 16-64 rows).
            for t0 in range(start, end, TILE):
                offs_t = t0 + tl.arange(0, TILE)
                t_ok = (offs_t < ctx) & (offs_t >= first)
                rows = cache_rows(
                    bt_row, offs_t, t_ok, kv_head, stride_c_block, stride_c_tok, stride_c_head,
                    BLOCK_SIZE,
                )  # fmt: skip
                # (Pointers computed twice: one tensor of them kept over the softmax spills more.)
                k_at = k_cache_ptr + rows[:, None] + offs_d[None, :]
                k = tl.load(k_at, mask=t_ok[:, None], other=0.0)
                p, alpha, m_i, l_i = _softmax_step(q, k, t_ok, m_i, l_i, scale, PRECISION)
                v_at = v_cache_ptr + rows[:, None] + offs_d[None, :]
                v = tl.load(v_at, mask=t_ok[:, None], other=0.0)
                v = v.to(q.dtype)  # an fp8 cache widens here (a no-op otherwise)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty (padding) row: zeros
            tl.store(
                out_ptr + seq * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :],
                out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None],
            )  # fmt: skip
        else:
            first_row = (seq * tl.num_programs(1) * QUERY_GROUP + heads) * NUM_SPLITS
            row = first_row + split
            tl.store(
                partial_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None]
            )
            tl.store(stats_ptr + row * 2, m_i, mask=g_ok)
            tl.store(stats_ptr + row * 2 + 1, l_i, mask=g_ok)
            # Every thread's stores are done before one thread's release makes them visible
            # to the GPU; the last busy split to count acquires them all.
            tl.debug_barrier()
            count_ptr = counts_ptr + seq * tl.num_programs(1) + kv_head
            done = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
            if done == busy_splits - 1:
                tl.debug_barrier()
                tl.store(count_ptr, 0)  # for the next launch (every busy split has counted)
                _combine_group(
                    partial_ptr, stats_ptr, out_ptr, first_row, heads, g_ok, offs_d,
                    seq * stride_o_tok + heads * stride_o_head, busy_splits, NUM_SPLITS,
                    HEAD_DIM,
                )  # fmt: skip


@triton.jit
def _load_tile(
    k_cache_ptr, v_cache_ptr, block_table_ptr, offs_t, first, end, kv_head, offs_d,
    stride_c_block, stride_c_tok, stride_c_head, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """The keys and values [len(offs_t), HEAD_DIM] of tokens offs_t in [first, end) (zeros
    elsewhere, and no memory traffic for them)."""
    ok = (offs_t < end) & (offs_t >= first)
    rows = cache_rows(
        block_table_ptr, offs_t, ok, kv_head, stride_c_block, stride_c_tok, stride_c_head,
        BLOCK_SIZE,
    )  # fmt: skip
    k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
    v = tl.load(v_cache_ptr + rows[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)
    return k, v


@triton.jit
def _softmax_step(q, k, t_ok, m_i, l_i, scale, PRECISION: tl.constexpr):
    """One tile of the online softmax: the tile's probabilities p (scaled to the new running
    max), the factor alpha that rescales what came before, the new max and denominator."""
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale
    s = tl.where(t_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def cache_rows(
    block_table_ptr, offs_t, t_ok, kv_head, stride_c_block, stride_c_tok, stride_c_head,
    BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    """Where tokens offs_t of a sequence (its block table at block_table_ptr) keep this KV
    head's keys or values in a [num_blocks, block_size, kv_heads, head_dim] cache (tokens not
    t_ok: block 0's, never read)."""
    blocks = tl.load(block_table_ptr + offs_t // BLOCK_SIZE, mask=t_ok, other=0)
    return (
        blocks.to(tl.int64) * stride_c_block
        + (offs_t % BLOCK_SIZE) * stride_c_tok
        + kv_head * stride_c_head
    )


@triton.jit
def _rotate_half(first_half, half: tl.constexpr, cos, sin, mask):
    """The rotary embedding (rotate-half layout) of the values at first_half and half further,
    rounded to their type as the rotary kernel and the portable layer round them."""
    x1 = tl.load(first_half, mask=mask, other=0.0)
    x2 = tl.load(first_half + half, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _combine_group(
    partial_ptr, stats_ptr, out_ptr, first_row, heads, g_ok, offs_d, out_offsets, busy_splits,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """out for a group's heads: the sums of splits 0..busy_splits - 1, each rescaled to the
    common max (the others wrote nothing). Loads skip L1 (.cg): other SMs wrote these rows, and
    this SM's L1 may hold an earlier launch's."""
    offs_s = tl.arange(0, NUM_SPLITS)
    rows = first_row[:, None] + offs_s[None, :]  # [group, split]
    ok = g_ok[:, None] & (offs_s < busy_splits)[None, :]
    m = tl.load(stats_ptr + rows * 2, mask=ok, other=float("-inf"), cache_modifier=".cg")
    den = tl.load(stats_ptr + rows * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, axis=1)
    # Splits with no tokens hold max -inf: weight zero (and no NaN when every split is empty).
    weight = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max)[:, None])
    total = tl.zeros((first_row.shape[0], HEAD_DIM), dtype=tl.float32)
    for s in tl.static_range(NUM_SPLITS):
        part = tl.load(
            partial_ptr + (first_row + s)[:, None] * HEAD_DIM + offs_d[None, :],
            mask=g_ok[:, None] & (s < busy_splits), other=0.0, cache_modifier=".cg",
        )  # fmt: skip
        total += part * tl.sum(tl.where(offs_s[None, :] == s, weight, 0.0), axis=1)[:, None]
    den_total = tl.sum(den * weight, axis=1)
    out = total / tl.where(den_total > 0, den_total, 1.0)[:, None]  # padding rows give zeros
    tl.store(
        out_ptr + out_offsets[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None],
    )  # fmt: skip


def decode_tile(block_size: int) -> int:
    """Tokens per step of the decode kernel's walk over a context."""
    return max(64, block_size)


def split_deciding_contexts(block_size: int) -> list[int | None]:
    """Longest contexts (tokens; None: any longer) that between them ask for every split count
    `split_count` can give: 1, 2, 4 .. MAX_SPLITS tiles, and past that no cap. CUDA graphs
    capture one graph per count (engine/cuda_graphs.py)."""
    tile = decode_tile(block_size)
    return [tile << i for i in range(MAX_SPLITS.bit_length())] + [None]


def split_count(programs: int, sms: int, context_tiles: int | None = None) -> int:
    """Splits of each context for a launch of `programs` (sequence, KV head) pairs on `sms` SMs:
    enough programs for two per SM, one split once the batch alone fills the GPU. Where the
    longest context has fewer tiles than that (context_tiles, if known), the next power of two
    up from its tile count (at least 2): splits past the tile count only add programs with
    nothing to do, which still slow the step (H200, batch 1, contexts of 128-256 tokens: 4
    splits 1.937 ms a step, 8 splits 1.997 ms; with 2000 tokens 8 splits are faster)."""
    if programs >= sms:
        return 1
    splits = min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(2 * sms, programs)))
    if context_tiles is not None:
        splits = min(splits, max(2, triton.next_power_of_2(context_tiles)))
    return splits


def default_num_splits(
    num_seqs: int,
    num_kv_heads: int,
    device: torch.device,
    max_context_len: int | None = None,
    block_size: int | None = None,
) -> int:
    """`split_count` for this device; max_context_len: the batch's longest context (host-side,
    where known), in a cache of block_size-token blocks."""
    if max_context_len is not None and block_size is None:
        raise ValueError("max_context_len needs the cache's block_size (it sets the tile)")
    if device.type != "cuda":  # Triton's CPU interpreter (tests)
        return 1
    tiles = None
    if max_context_len is not None:
        tiles = triton.cdiv(max_context_len, decode_tile(block_size))
    return split_count(num_seqs * num_kv_heads, sm_count(device), tiles)


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
    rotary: NewTokens | None = None,
) -> torch.Tensor:
    """q: [num_seqs, num_heads, head_dim] (heads contiguous), one query per sequence at
    position context_len - 1. key/value_cache: [num_blocks, block_size, num_kv_heads, head_dim].
    Returns q's shape. num_splits (a power of two up to MAX_SPLITS): how many programs share
    each sequence's context; by default `default_num_splits`. rotary: q and the step's new keys
    are still to be rotated, and the new keys and values still to be written to the cache: the
    kernel does both (one launch where the rotary and cache-write kernels made three)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(num_seqs, num_kv_heads, q.device)
    if num_splits not in (1, 2, 4, 8):
        raise ValueError(f"num_splits must be 1, 2, 4 or 8, got {num_splits}")
    partial = stats = out  # unused with one split
    counts = context_lens
    if num_splits > 1:
        partial = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        stats = torch.empty(
            (num_seqs, num_heads, num_splits, 2), dtype=torch.float32, device=q.device
        )
        counts = split_counts(num_seqs * num_kv_heads, q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    new = rotary or NewTokens(context_lens, out, out, out, out, context_lens)  # unused then
    if rotary is not None:
        if key_cache.stride(0) != block_size * key_cache.stride(1) or q.stride(2) != 1:
            raise ValueError("the fused rotary needs contiguous cache blocks and query heads")
    _paged_decode[(num_seqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, block_tables, context_lens, out, partial, stats, counts,
        scale, sliding_window or 0,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        new.positions, new.cos, new.sin, new.key, new.value, new.slot_mapping,
        new.cos.stride(0), new.key.stride(0), new.value.stride(0),
        QUERY_GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, TILE=decode_tile(block_size), PRECISION=precision,
        NUM_SPLITS=num_splits, ROTARY=rotary is not None,
        FP16_DOTS=key_cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16, num_warps=4,
        **pdl_launch(q.device),
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class NewTokens:
    """A decode step's new tokens for `paged_decode_attention` to finish: their positions, the
    rotary tables (cos, sin: [max_position, head_dim / 2] fp32), their keys and values before
    the rotary embedding ([num_seqs, kv_heads * head_dim], rows may be strided views) and
    their cache slots (-1: a padding row, not written)."""

    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    slot_mapping: torch.Tensor


_SPLIT_COUNTS: dict[torch.device, torch.Tensor] = {}


def split_counts(pairs: int, device: torch.device) -> torch.Tensor:
    """The split-done counts of `pairs` (sequence, KV head) pairs: int32 zeros that each launch
    leaves zero again, one buffer per device, grown (outside CUDA-graph capture) as needed."""
    counts = _SPLIT_COUNTS.get(device)
    if counts is None or counts.numel() < pairs:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("split counts must be allocated before CUDA-graph capture")
        counts = torch.zeros(max(pairs, 1024), dtype=torch.int32, device=device)
        _SPLIT_COUNTS[device] = counts
    return counts


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
