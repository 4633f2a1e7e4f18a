"""Plain 16/32-bit linear layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.quant.base import LinearMethod, WeightShard


def copy_shard(param: torch.Tensor, loaded: torch.Tensor, shard: WeightShard, name: str) -> None:
    src = shard.narrow(loaded)
    dst = param.narrow(0, shard.dst_row, src.shape[0])
    if dst.shape != src.shape:
        raise ValueError(
            f"{name}: checkpoint shard {tuple(src.shape)} does not fit {tuple(dst.shape)}"
        )
    dst.copy_(src)


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(
        self, layer, input_size_per_partition, output_size_per_partition, params_dtype
    ):
        weight = torch.empty(
            output_size_per_partition, input_size_per_partition, dtype=params_dtype
        )
        layer.weight = nn.Parameter(weight, requires_grad=False)

    def load_weight(self, layer, loaded, shard):
        if not hasattr(loaded, "narrow"):  # a Packed4bitWeight
            raise ValueError(
                f"{layer.prefix}: the checkpoint holds a quantized weight but this layer is not "
                "quantized (check quantization_config's llm_int8_skip_modules)"
            )
        copy_shard(layer.weight.data, loaded, shard, layer.prefix)

    def apply(self, layer, x, bias):
        return F.linear(x, layer.weight, bias)
