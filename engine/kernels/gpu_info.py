"""What the kernels' launch choices read off the GPU: its compute capability and SM count,
looked up once per device."""

from __future__ import annotations

import functools

import torch


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor), or (0, 0) off CUDA."""
    return _capability(_index(device)) if device.type == "cuda" else (0, 0)


def sm_count(device: torch.device) -> int:
    return _sm_count(_index(device))


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
