"""A checkpoint tensor that is read from disk only where it is sliced.

With tensor parallelism each rank narrows a weight to its own shard; reading through a safetensors
slice means no rank reads the parts of a tensor that it does not hold."""

from __future__ import annotations

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class LazyTensor:
    def __init__(self, safe_slice) -> None:
        self._slice = safe_slice
        self.shape = torch.Size(safe_slice.get_shape())
        self.dtype = _DTYPES[safe_slice.get_dtype()]

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._slice[index]

    def load(self) -> torch.Tensor:
        return self._slice[:]


def materialize(tensor: torch.Tensor | LazyTensor) -> torch.Tensor:
    return tensor.load() if isinstance(tensor, LazyTensor) else tensor
