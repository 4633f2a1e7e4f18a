"""Vocabulary-parallel embedding and LM head: each rank holds a slice of the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import get_tp_group


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        tp = get_tp_group()
        self.num_embeddings = num_embeddings
        self.num_per_partition = -(-num_embeddings // tp.size)
        self.vocab_start = tp.rank * self.num_per_partition
        self.weight = nn.Parameter(
            torch.zeros(self.num_per_partition, embedding_dim), requires_grad=False
        )

    def weight_loader(self, name: str, loaded: torch.Tensor, shard_id: None = None) -> None:
        rows = max(0, min(self.num_per_partition, self.num_embeddings - self.vocab_start))
        self.weight.data[:rows].copy_(loaded.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tp = get_tp_group()
        if tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_per_partition)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits over the full vocabulary (gathered across ranks)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        logits = get_tp_group().all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]
