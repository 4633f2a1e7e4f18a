"""The process groups of one worker group: NCCL (GPU) or gloo (CPU) for tensors, and always a
gloo group for broadcasting each step's plan (small Python objects) from rank 0."""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.distributed import TensorParallelGroup, set_tp_group

TIMEOUT = timedelta(minutes=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_distributed(
    rank: int, world_size: int, master_addr: str, master_port: int, device: torch.device
) -> dist.ProcessGroup:
    """Join the group; install it as the engine's tensor-parallel group. Returns the CPU group."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
        world_size=world_size, timeout=TIMEOUT,
    )  # fmt: skip
    cpu_group = (
        dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else dist.group.WORLD
    )
    set_tp_group(TensorParallelGroup(rank=rank, size=world_size, group=dist.group.WORLD))
    return cpu_group


def broadcast_object(obj: object, group: dist.ProcessGroup) -> object:
    """Rank 0 sends obj; every other rank returns what rank 0 sent."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
