"""Programmatic dependent launch (PDL, Hopper and newer): a kernel launched as a programmatic
dependent may start while the kernel before it in the stream is still running. It lets its own
dependents start at once (`gdc_launch_dependents`), then waits (`gdc_wait`: the kernel before it
has finished and its writes are visible) before it touches any memory. Inside a decode step's
CUDA graph this hides most of the launch gap between the step's many small kernels; the 4-bit
GEMV also loads its weights and fills its table before it waits."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from engine.kernels.gpu_info import capability


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on this device are launched as programmatic dependents."""
    return os.environ.get("TRITON_INTERPRET") != "1" and capability(device) >= (9, 0)


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """The keyword arguments of a Triton launch whose kernel starts with `pdl_start(PDL)`."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {"PDL": False}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A dependent kernel's first statement: its own dependents may start, and nothing below
    runs before the kernel it depends on has finished."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
