"""The per-step attention metadata, visible to every attention layer during one forward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionBatch:
    """Sequences whose queries are padded to one [num_seqs, max_query_len] block.

    The step's tokens [token_start, token_end) belong to this batch, in sequence order."""

    token_start: int
    token_end: int
    flat_index: torch.Tensor  # [num_tokens] position of each token in the padded block
    query_positions: torch.Tensor  # [num_seqs, max_query_len] (padding: 0)
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] (padding: block 0)
    context_lens: torch.Tensor  # [num_seqs] tokens in the cache once this step has written
    # [num_seqs * max_query_len] each padded place's token row (-1: padding), for the prefill
    # kernel: built by the first layer that needs it, then shared by the step's other layers.
    query_rows: torch.Tensor | None = None
    # The longest of context_lens, where the host knows it: the decode kernel splits no context
    # into more parts than it has tiles (CUDA graphs are captured per split count).
    max_context_len: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.query_positions.shape[0]

    @property
    def max_query_len(self) -> int:
        return self.query_positions.shape[1]


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] cache slot written by each token
    batches: list[AttentionBatch]


_context: AttentionMetadata | None = None


@contextmanager
def set_forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    global _context
    if _context is not None:
        raise RuntimeError("a forward pass is already running; forward contexts do not nest")
    _context = metadata
    try:
        yield
    finally:
        _context = None


def get_forward_context() -> AttentionMetadata:
    if _context is None:
        raise RuntimeError("attention ran outside set_forward_context")
    return _context
