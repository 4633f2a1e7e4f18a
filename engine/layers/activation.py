"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up, with gate and up concatenated on the last dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.use_kernels = False  # set by engine.kernels.enable_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernels and x.dim() == 2:
            from engine.kernels.fused_ops import silu_and_mul

            return silu_and_mul(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
