"""Attention over the paged KV cache: portable PyTorch (CPU and GPU), or Triton kernels on GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.forward_context import AttentionBatch, get_forward_context
from engine.layers.rotary import RotaryEmbedding


class Attention(nn.Module):
    """Writes this step's keys and values into the cache, then attends each query to its
    sequence's cached tokens up to its own position (causal), optionally in a sliding window."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        # [2, num_blocks, block_size, num_kv_heads, head_dim], bound by the model runner.
        self.kv_cache: torch.Tensor | None = None
        self.use_kernels = False  # set by engine.kernels.enable_kernels

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        """q: [tokens, heads * head_dim]; k, v: [tokens, kv_heads * head_dim] (rows may be
        strided views). Where kernels are on, the cache write and every group's attention run
        Triton kernels (decode and prefill); elsewhere (CPU) SDPA runs over the gathered blocks.
        With `rotary`, q and k are rotated to `positions` first: on a decode-only step with
        kernels on, inside the decode kernel, which also writes the new keys and values."""
        return self._rotate_and_attend(q, k, v, positions, rotary, self.use_kernels)

    def forward_native(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor | None = None,
        rotary: RotaryEmbedding | None = None,
    ) -> torch.Tensor:
        return self._rotate_and_attend(q, k, v, positions, rotary, use_kernels=False)

    def _rotate_and_attend(self, q, k, v, positions, rotary, use_kernels: bool) -> torch.Tensor:
        if rotary is not None:
            if use_kernels and (out := self._fused_decode(q, k, v, positions, rotary)) is not None:
                return out
            q, k = self._rotate(q, k, positions, rotary, native=not use_kernels)
        return self._forward(q, k, v, use_kernels)

    def _rotate(
        self, q: torch.Tensor, k: torch.Tensor, positions, rotary, native: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        q, k = rotary.forward_native(positions, q, k) if native else rotary(positions, q, k)
        return q.flatten(1), k.flatten(1)

    def _fused_decode(self, q, k, v, positions, rotary) -> torch.Tensor | None:
        """The attention of a decode-only step by one kernel that also rotates q and k and
        writes the cache, or None where that does not apply."""
        metadata = get_forward_context()
        if not (rotary.use_kernels and len(metadata.batches) == 1):
            return None
        b = metadata.batches[0]
        if b.max_query_len != 1 or b.num_seqs != q.shape[0]:
            return None
        from engine.kernels.paged_attention import NewTokens, paged_decode_attention

        # Only where the context is split (few sequences): there the two kernels it saves are
        # most of the cost; with many sequences each program's longer prologue costs more
        # (measured on an H200: +3.9% tokens/s at batch 1, -2.8% at batch 64).
        splits = self.decode_splits(b.num_seqs, b.max_context_len)
        if splits == 1:
            return None
        new = NewTokens(positions, rotary.cos, rotary.sin, k, v, metadata.slot_mapping)
        out = paged_decode_attention(
            q.view(-1, self.num_heads, self.head_dim), self.kv_cache[0], self.kv_cache[1],
            b.block_tables, b.context_lens, self.scale, self.sliding_window, splits, rotary=new,
        )  # fmt: skip
        return out.reshape(-1, self.num_heads * self.head_dim)

    def decode_splits(self, num_seqs: int, max_context_len: int | None) -> int:
        """Programs per (sequence, KV head) of the decode kernel for a decode step of num_seqs
        sequences, the longest max_context_len tokens (None: any). Above 1 the kernel also
        rotates and writes the new tokens (`_fused_decode`); at 1 separate kernels do."""
        from engine.kernels.paged_attention import default_num_splits

        assert self.kv_cache is not None, "KV cache not bound"
        block_size = self.kv_cache.shape[2]
        device = self.kv_cache.device
        return default_num_splits(num_seqs, self.num_kv_heads, device, max_context_len, block_size)

    def _forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, use_kernels: bool
    ) -> torch.Tensor:
        metadata = get_forward_context()
        assert self.kv_cache is not None, "KV cache not bound"
        key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
        if use_kernels:
            from engine.kernels.paged_attention import paged_decode_attention, store_kv_cache
            from engine.kernels.paged_prefill import paged_prefill_attention, query_rows

            store_kv_cache(k, v, key_cache, value_cache, metadata.slot_mapping)
        else:
            flat_keys = key_cache.view(-1, self.num_kv_heads, self.head_dim)
            flat_values = value_cache.view(-1, self.num_kv_heads, self.head_dim)
            shape = (-1, self.num_kv_heads, self.head_dim)
            # Slot -1 marks a padding token (CUDA-graph buckets): skipped, as the kernel does.
            keep = metadata.slot_mapping >= 0
            slots = metadata.slot_mapping[keep]
            flat_keys[slots] = k.reshape(shape)[keep].to(flat_keys.dtype)
            flat_values[slots] = v.reshape(shape)[keep].to(flat_values.dtype)

        q = q.view(-1, self.num_heads, self.head_dim)
        outputs = []
        for b in metadata.batches:
            rows = q[b.token_start : b.token_end]
            if not use_kernels:
                out = self._attend(rows, key_cache, value_cache, b)
            elif b.max_query_len == 1:
                out = paged_decode_attention(
                    rows, key_cache, value_cache, b.block_tables, b.context_lens, self.scale,
                    self.sliding_window, self.decode_splits(b.num_seqs, b.max_context_len),
                )  # fmt: skip
            else:
                if b.query_rows is None:  # once per step, not once per layer
                    b.query_rows = query_rows(b.flat_index, b.num_seqs, b.max_query_len)
                out = paged_prefill_attention(
                    rows, key_cache, value_cache, b.flat_index, b.query_positions,
                    b.block_tables, b.context_lens, self.scale, self.sliding_window,
                    b.query_rows,
                )  # fmt: skip
            outputs.append(out)
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def _attend(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, b: AttentionBatch
    ) -> torch.Tensor:
        num_seqs, max_q = b.num_seqs, b.max_query_len
        padded = q.new_zeros(num_seqs * max_q, self.num_heads, self.head_dim)
        padded[b.flat_index] = q
        padded = padded.view(num_seqs, max_q, self.num_heads, self.head_dim).transpose(1, 2)

        # Gather each sequence's blocks: [num_seqs, kv_heads, max_blocks * block_size, head_dim].
        # (An fp8 cache is widened to q's dtype: kv_cache_dtype.)
        keys = key_cache[b.block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        values = value_cache[b.block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)

        key_pos = torch.arange(keys.shape[2], device=q.device)
        query_pos = b.query_positions.unsqueeze(-1)  # [num_seqs, max_q, 1]
        mask = (key_pos <= query_pos) & (key_pos < b.context_lens.view(-1, 1, 1))
        if self.sliding_window is not None:
            mask &= key_pos > query_pos - self.sliding_window
        out = F.scaled_dot_product_attention(
            padded, keys, values, attn_mask=mask.unsqueeze(1), scale=self.scale, enable_gqa=True
        )
        out = out.transpose(1, 2).reshape(num_seqs * max_q, self.num_heads, self.head_dim)
        return out[b.flat_index]
