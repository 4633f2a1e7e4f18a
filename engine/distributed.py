"""Tensor-parallel state seen by the layers. One rank with no process group by default; the
worker group (workers/) installs a real torch.distributed group for tensor_parallel_size > 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)


_tp_group = TensorParallelGroup()


def get_tp_group() -> TensorParallelGroup:
    return _tp_group


def set_tp_group(group: TensorParallelGroup) -> None:
    global _tp_group
    _tp_group = group
