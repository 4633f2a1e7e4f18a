"""Host lists to device tensors without waiting for the GPU."""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`. On CUDA they go through pinned memory: a copy from
    ordinary (pageable) memory first waits for the stream to drain, which would stall a step
    launched ahead of the host (async scheduling) behind the one before it."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)
