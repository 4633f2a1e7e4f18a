"""Triton GPU kernels: the fused 4-bit matmul, paged-attention decode and fused elementwise ops.

Importing this package never fails: on machines without Triton or a CUDA device the engine keeps
its portable PyTorch / bitsandbytes paths, and `kernels_available()` says so."""

from __future__ import annotations

import importlib.util
import os

import torch


def kernels_available(device: torch.device | None = None) -> bool:
    """True where the Triton kernels can run: a CUDA device and Triton installed (or Triton's
    CPU interpreter, TRITON_INTERPRET=1, which the elementwise kernel tests use to
    check the logic; the 4-bit matmul kernels are PTX and Gluon, CUDA only)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.cuda.is_available() and (device is None or device.type == "cuda")


def enable_kernels(model: torch.nn.Module, enabled: bool) -> None:
    """Turns the Triton paths of a loaded model's layers on or off (each layer that has one
    carries a `use_kernels` flag)."""
    for module in model.modules():
        if hasattr(module, "use_kernels"):
            module.use_kernels = enabled
