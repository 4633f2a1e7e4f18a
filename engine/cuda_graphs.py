"""CUDA graphs for decode steps: the whole forward pass replayed as one launch.

A decode-only step of B sequences runs the graph captured for the smallest batch bucket >= B
and, for buckets small enough that the attention kernel splits each context over several
programs, for the step's split count, which its longest context caps (`Attention.decode_splits`):
such a bucket has a graph per split count.
The graph reads its inputs from static buffers that each step refills: token ids, positions,
cache slots, block tables and context lengths. Padding rows get slot -1 (the cache write skips
them) and context length 0 (attention returns zeros), so they touch nothing. Graphs are used
only with the Triton kernels on: the paged-attention kernel's launch depends on context
lengths only through that split count (the 4-bit matmul inside may be bitsandbytes' own).
With tensor parallelism the graph holds the rank's all-reduces too (NCCL collectives replay
inside graphs)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

from engine.forward_context import AttentionBatch, AttentionMetadata, set_forward_context
from engine.kv_cache import attention_layers

logger = logging.getLogger(__name__)

K = TypeVar("K")


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8 up to 64, of 32 up to 256 (as far as max_num_seqs)."""
    limit = min(max_num_seqs, 256)
    sizes = [s for s in [1, 2, 4, *range(8, 65, 8), *range(96, 257, 32)] if s <= limit]
    return sizes if limit in sizes else [*sizes, limit]


def capture_buckets(
    forward: Callable[[K], torch.Tensor],
    sizes: list[K],
    device: torch.device,
    pool: tuple | None = None,
) -> tuple[dict[K, tuple[torch.cuda.CUDAGraph, torch.Tensor]], tuple]:
    """forward(size) captured for every size (a bucket, or a key that sorts by it) into one
    memory pool (a new one unless given), largest first so that later graphs reuse its memory:
    ({size: (graph, its output)}, pool)."""
    graphs = {}
    for size in sorted(sizes, reverse=True):
        forward(size)  # warm-up: compiles the Triton kernels for this shape
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (the NCCL watchdog's event queries, with
        # tensor parallelism) must not invalidate this thread's capture.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = forward(size)
        pool = graph.pool()
        graphs[size] = (graph, out)
    torch.cuda.synchronize(device)
    return graphs, pool


def split_contexts(
    sizes: list[int],
    contexts: list[int | None],
    decode_splits: Callable[[int, int | None], int],
) -> dict[tuple[int, int], int | None]:
    """The decode graphs to capture: (bucket, split count) -> a longest context (tokens; None:
    any) that asks for that count, from `contexts` that between them reach every count
    (`paged_attention.split_deciding_contexts`); decode_splits(bucket, context) is the step's
    own rule."""
    return {(size, decode_splits(size, context)): context for size in sizes for context in contexts}


class DecodeGraphRunner:
    def __init__(
        self,
        model: nn.Module,
        sizes: list[int],
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.sizes = sorted(sizes)
        self.max_batch = self.sizes[-1]
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        n = self.max_batch
        # Rows: input ids, positions, slots, context lengths; one host->device copy per step.
        # Two pinned staging buffers, used in turn: with a step launched ahead of the one being
        # read back, the next step's inputs are written while the previous copy may be pending.
        self.inputs = torch.zeros((4, n), dtype=torch.long, device=device)
        # Flat, so that a bucket's [4, size] view of it is contiguous: copy_ would first copy a
        # strided source into ordinary (pageable) memory, whose copy waits for the stream.
        self.staging = [torch.zeros(4 * n, dtype=torch.long).pin_memory() for _ in range(2)]
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.long, device=device)
        # Block tables as [batch, width] from the front of a flat buffer (contiguous for the copy).
        self.table_staging = [
            torch.zeros(n * max_blocks_per_seq, dtype=torch.long).pin_memory() for _ in range(2)
        ]
        self._turn = 0
        self.attention = attention_layers(model)[0]  # the layers share one shape
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._split_contexts: dict[tuple[int, int], int | None] = {}  # set by capture
        self.pool = None  # the graphs' memory pool, once captured (prefill graphs share it)
        self.capture_seconds = 0.0

    def _forward(self, key: tuple[int, int]) -> torch.Tensor:
        """The forward pass of graph `key` (bucket, split count): its batch, and a longest
        context that makes the attention choose that count."""
        batch, _ = key
        input_ids, positions, slots, context_lens = self.inputs[:, :batch]
        decode = AttentionBatch(
            token_start=0,
            token_end=batch,
            flat_index=self.inputs[0, :0],  # unused by the decode kernel
            query_positions=positions.view(-1, 1),
            block_tables=self.block_tables[:batch],
            context_lens=context_lens,
            max_context_len=self._split_contexts[key],
        )
        with set_forward_context(AttentionMetadata(slots, [decode])):
            return self.model(input_ids, positions)

    @torch.inference_mode()
    def capture(self) -> bool:
        """Captures every size; False (and no graphs: steps run eagerly) if any launch in the
        forward pass cannot be captured."""
        try:
            self._capture()
            return True
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            logger.warning("CUDA graph capture failed, decode runs eagerly: %s", exc)
            return False

    def _capture(self) -> None:
        start = time.perf_counter()
        self.inputs[2].fill_(-1)  # capture-time rows write nothing to the cache
        self.inputs[3].zero_()
        from engine.kernels.paged_attention import split_deciding_contexts

        contexts = split_deciding_contexts(self.attention.kv_cache.shape[2])
        self._split_contexts = split_contexts(self.sizes, contexts, self.attention.decode_splits)
        keys = list(self._split_contexts)
        self.graphs, self.pool = capture_buckets(self._forward, keys, self.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d) in %.1f s",
            len(self.graphs), self.sizes[0], self.max_batch, self.capture_seconds,
        )  # fmt: skip

    def bucket(self, batch: int) -> int | None:
        for size in self.sizes:
            if batch <= size:
                return size
        return None

    def can_run(self, num_tokens: int, max_query_len: int, num_blocks: int) -> bool:
        return (
            max_query_len == 1
            and self.bucket(num_tokens) is not None
            and num_blocks <= self.max_blocks_per_seq
        )

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        device_input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, hidden] of one decode step of B sequences; `device_input_ids`, when
        given, replaces `input_ids` (tokens a previous step sampled, not yet read back)."""
        batch = len(input_ids)
        size = self.bucket(batch)
        pad = size - batch
        staging = self.staging[self._turn][: 4 * size].view(4, size)
        width = len(block_tables[0])
        tables = self.table_staging[self._turn][: batch * width].view(batch, width)
        self._turn ^= 1
        staging[0, :batch] = torch.tensor(input_ids)
        staging[1, :batch] = torch.tensor(positions)
        staging[2, :batch] = torch.tensor(slot_mapping)
        staging[3, :batch] = torch.tensor(context_lens)
        if pad:
            staging[:, batch:] = 0
            staging[2, batch:] = -1
        self.inputs[:, :size].copy_(staging, non_blocking=True)
        if device_input_ids is not None:
            self.inputs[0, :batch].copy_(device_input_ids)
        tables.copy_(torch.tensor(block_tables))
        self.block_tables[:batch, :width].copy_(tables, non_blocking=True)
        graph, out = self.graph_for(size, max(context_lens))
        graph.replay()
        return out[:batch]

    def graph_for(
        self, size: int, max_context_len: int
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph (and its output) of bucket `size` for a step whose longest context is
        max_context_len tokens."""
        return self.graphs[(size, self.attention.decode_splits(size, max_context_len))]
