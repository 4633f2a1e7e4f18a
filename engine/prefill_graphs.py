"""CUDA graphs for prefill steps of one sequence: its prompt (or a chunk of it) padded to a
token bucket and replayed as one launch.

Measured on an H200 at batch 1, the eager prefill of a 128-token prompt took 27-30 ms, of
which 7.7 ms was GPU work: the rest was Python launching about 400 kernels, and the first token
(and, at batch 1, the whole request) waited on it. A step whose only group is one sequence of at
most the largest bucket's tokens, with its block table no wider than the bucket's, replays the
graph of the smallest bucket that holds it instead:
- pad tokens get cache slot -1 (the cache write skips them) and position 0;
- the padded rows sit after the real ones, so under the causal mask no real token sees them;
- the block table is padded with block 0, whose keys the context length masks off.
The graphs share the decode graphs' memory pool (steps never overlap) and are used where decode
graphs are: with the Triton kernels on, not `enforce_eager`. Prefills of several sequences, or
longer than the largest bucket, run eagerly: their GPU work already outweighs the launches."""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from engine.cuda_graphs import capture_buckets
from engine.forward_context import AttentionBatch, AttentionMetadata, set_forward_context

logger = logging.getLogger(__name__)

PREFILL_SIZES = (16, 32, 64, 128, 256)


class PrefillGraphRunner:
    def __init__(
        self, model: nn.Module, sizes: tuple[int, ...], block_size: int, device: torch.device
    ) -> None:
        self.model = model
        self.sizes = sorted(sizes)
        self.block_size = block_size
        self.device = device
        n = self.sizes[-1]
        # Rows: input ids, positions (0 for padding: also the query positions), cache slots.
        self.inputs = torch.zeros((3, n), dtype=torch.long, device=device)
        self.flat_index = torch.arange(n, device=device)  # one sequence: token i at row i
        self.block_table = torch.zeros((1, self.width(n)), dtype=torch.long, device=device)
        self.context_len = torch.zeros(1, dtype=torch.long, device=device)
        # Ids, positions, slots, then the context length and the block table: one copy a step,
        # from two pinned buffers used in turn (as the decode graphs' are), so that a step's
        # inputs are never written while the copy of the previous one's may be pending.
        staging = [torch.zeros(3 * n + 1 + self.width(n), dtype=torch.long) for _ in range(2)]
        self.staging = [b.pin_memory() for b in staging] if device.type == "cuda" else staging
        self._turn = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_seconds = 0.0
        self.replays = 0

    def width(self, size: int) -> int:
        """Block-table width of a bucket: the blocks its tokens fill."""
        return -(-size // self.block_size)

    def forward(self, size: int) -> torch.Tensor:
        """The forward pass over the static buffers' first `size` tokens (what a graph holds)."""
        input_ids, positions, slots = self.inputs[:, :size]
        batch = AttentionBatch(
            token_start=0,
            token_end=size,
            flat_index=self.flat_index[:size],
            query_positions=positions.view(1, size),
            block_tables=self.block_table[:, : self.width(size)],
            context_lens=self.context_len,
        )
        with set_forward_context(AttentionMetadata(slots, [batch])):
            return self.model(input_ids, positions)

    @torch.inference_mode()
    def capture(self, pool=None) -> bool:
        """Captures every bucket into `pool` (the decode graphs'); False (and no graphs) if any
        launch cannot be captured."""
        try:
            self._capture(pool)
            return True
        except RuntimeError as exc:
            torch.cuda.synchronize(self.device)
            logger.warning("prefill CUDA graph capture failed, prefill runs eagerly: %s", exc)
            return False

    def _capture(self, pool) -> None:
        start = time.perf_counter()
        self.inputs.zero_()
        self.inputs[2].fill_(-1)  # capture-time tokens write nothing to the cache
        self.context_len.fill_(1)
        self.graphs, _ = capture_buckets(self.forward, self.sizes, self.device, pool)
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured %d prefill CUDA graphs (%d..%d tokens) in %.1f s",
            len(self.graphs), self.sizes[0], self.sizes[-1], self.capture_seconds,
        )  # fmt: skip

    def bucket(self, num_tokens: int, num_blocks: int) -> int | None:
        """The smallest bucket holding the tokens and the block table, if any."""
        for size in self.sizes:
            if num_tokens <= size and num_blocks <= self.width(size):
                return size
        return None

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        block_table: list[int],
        context_len: int,
        replay: bool = True,
    ) -> torch.Tensor:
        """Hidden states [tokens, hidden] of one sequence's prefill step. `replay=False` runs the
        padded forward pass eagerly instead of its graph (what the graph holds, on any device)."""
        n = len(input_ids)
        size = self.bucket(n, len(block_table))
        if size is None:
            raise ValueError(f"no prefill bucket holds {n} tokens over {len(block_table)} blocks")
        width, top = self.width(size), self.sizes[-1]
        staging = self.staging[self._turn]
        self._turn ^= 1
        staging.zero_()
        rows = staging[: 3 * top].view(3, top)
        rows[0, :n] = torch.tensor(input_ids)
        rows[1, :n] = torch.tensor(positions)
        rows[2, :n] = torch.tensor(slot_mapping)
        rows[2, n:size] = -1
        staging[3 * top] = context_len
        tail = staging[3 * top + 1 :]
        tail[: len(block_table)] = torch.tensor(block_table)
        device_staging = staging.to(self.device, non_blocking=True)
        self.inputs[:, :size].copy_(device_staging[: 3 * top].view(3, top)[:, :size])
        self.context_len.copy_(device_staging[3 * top : 3 * top + 1])
        self.block_table[0, :width].copy_(device_staging[3 * top + 1 : 3 * top + 1 + width])
        if replay:
            graph, out = self.graphs[size]
            graph.replay()
            self.replays += 1
        else:
            out = self.forward(size)
        return out[:n]
