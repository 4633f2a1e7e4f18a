"""The quantization-method interface: the layer owns sharding, the method owns storage and matmul.

A faster kernel plugs in as another LinearMethod without touching model code."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class WeightShard:
    """Where part of a checkpoint tensor goes in this rank's parameter.

    Take `size` entries of the checkpoint tensor along `dim` from `src_start`, and write them at
    row `dst_row` of the parameter (dim 0 for column-parallel shards; whole rows for dim 1)."""

    dim: int
    src_start: int
    size: int
    dst_row: int = 0

    def narrow(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.narrow(self.dim, self.src_start, self.size)


class LinearMethod(ABC):
    """Creates a linear layer's weights, loads checkpoint shards into them, and applies them."""

    @abstractmethod
    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_size_per_partition: int,
        params_dtype: torch.dtype,
    ) -> None: ...

    @abstractmethod
    def load_weight(self, layer: nn.Module, loaded: object, shard: WeightShard) -> None:
        """Copy one checkpoint tensor (or a packed bundle) into layer.weight at `shard`."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027
        """Convert loaded weights into the form `apply` uses (quantize, repack, ...)."""

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor: ...

    def apply_silu_and_mul(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, act: nn.Module
    ) -> torch.Tensor:
        """act(apply(...)) for a layer whose output is [gate | up] and `act` SiLU-and-mul: a
        method whose kernel can apply the activation as it writes its output overrides this."""
        return act(self.apply(layer, x, bias))

    def weight_bytes(self, layer: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in layer.parameters(recurse=False))


class QuantizationConfig(ABC):
    name: str

    @abstractmethod
    def get_linear_method(self, prefix: str) -> LinearMethod:
        """The method for the linear layer named `prefix` (e.g. model.layers.0.mlp.down_proj)."""


# Merged layers are named as in vLLM; checkpoints name their parts.
PACKED_MODULES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


def checkpoint_prefixes(prefix: str) -> list[str]:
    """The checkpoint module names behind one of our layers (model.x.qkv_proj -> q/k/v_proj)."""
    head, _, last = prefix.rpartition(".")
    parts = PACKED_MODULES.get(last)
    if parts is None:
        return [prefix]
    return [f"{head}.{p}" if head else p for p in parts]
