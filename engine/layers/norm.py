"""RMSNorm, computed in float32 like the reference implementations, optionally fused with the
residual add that precedes it (vLLM's layout: the layer returns (normed, new residual))."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.use_kernels = False  # set by engine.kernels.enable_kernels

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x), or with a residual: (norm(x + residual), x + residual)."""
        if self.use_kernels and x.dim() == 2:
            from engine.kernels.fused_ops import rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return rms_norm(x, self.weight, self.eps, residual), residual  # residual updated
        if residual is None:
            return self.forward_native(x)
        residual = x + residual
        return self.forward_native(residual), residual

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
