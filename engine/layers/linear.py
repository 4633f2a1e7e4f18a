"""Linear layers own their tensor-parallel sharding; the quant method owns storage and matmul."""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed import get_tp_group
from engine.layers.quant import (
    LinearMethod,
    QuantizationConfig,
    UnquantizedLinearMethod,
    WeightShard,
)
from engine.lazy_tensor import materialize


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor_parallel_size ({denominator})"
        )
    return numerator // denominator


class LinearBase(nn.Module):
    """Base of all linears. `weight_loader(loaded, shard_id)` is the file loader's entry point."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        input_size_per_partition: int,
        output_size_per_partition: int,
        bias: bool,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_size_per_partition = output_size_per_partition
        self.tp_rank = get_tp_group().rank
        self.tp_size = get_tp_group().size
        self.use_kernels = False  # set by engine.kernels.enable_kernels (quant methods read it)
        self.quant_method: LinearMethod = (
            quant_config.get_linear_method(prefix) if quant_config else UnquantizedLinearMethod()
        )
        params_dtype = torch.get_default_dtype()
        self.quant_method.create_weights(
            self, input_size_per_partition, output_size_per_partition, params_dtype
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size_per_partition), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def weight_shard(self, shard_id: str | int | None) -> WeightShard:
        """Which part of the checkpoint tensor this rank holds, and where it goes."""
        return WeightShard(dim=0, src_start=0, size=self.output_size_per_partition)

    def weight_loader(self, name: str, loaded: object, shard_id: str | int | None = None) -> None:
        shard = self.weight_shard(shard_id)
        if name == "bias":
            if shard.dim == 1:  # row-parallel: the bias is added once, after the all-reduce
                self.bias.data.copy_(materialize(loaded))
            else:
                src = loaded.narrow(0, shard.src_start, shard.size)
                self.bias.data.narrow(0, shard.dst_row, shard.size).copy_(src)
            return
        self.quant_method.load_weight(self, loaded, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size, output_size, bias=False, quant_config=None, prefix=""):
        super().__init__(
            input_size, output_size, input_size, output_size, bias, quant_config, prefix
        )


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank's output is its slice (no communication)."""

    def __init__(self, input_size, output_size, bias=False, quant_config=None, prefix=""):
        tp_size = get_tp_group().size
        out_per_rank = divide(output_size, tp_size, f"{prefix} output size")
        super().__init__(
            input_size, output_size, input_size, out_per_rank, bias, quant_config, prefix
        )

    def weight_shard(self, shard_id):
        size = self.output_size_per_partition
        return WeightShard(dim=0, src_start=self.tp_rank * size, size=size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections in one matmul (gate_proj + up_proj)."""

    def __init__(
        self, input_size, output_sizes: list[int], bias=False, quant_config=None, prefix=""
    ):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, quant_config, prefix)

    def weight_shard(self, shard_id):
        size = self.output_sizes[shard_id] // self.tp_size
        dst_row = sum(self.output_sizes[:shard_id]) // self.tp_size
        return WeightShard(dim=0, src_start=self.tp_rank * size, size=size, dst_row=dst_row)

    def forward_silu_and_mul(self, x: torch.Tensor, act: nn.Module) -> torch.Tensor:
        """act(self(x)) for gate_up: act is SiLU-and-mul over the [gate | up] halves (this
        rank's, with tensor parallelism), which the quantization method may fuse."""
        if len(self.output_sizes) != 2 or self.output_sizes[0] != self.output_sizes[1]:
            raise ValueError(f"{self.prefix}: SiLU-and-mul needs two halves of one size")
        return self.quant_method.apply_silu_and_mul(self, x, self.bias, act)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, split by heads. With more ranks than KV heads, each
    KV head is replicated on tp_size / num_kv_heads ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        tp_size = get_tp_group().size
        self.head_size = head_size
        self.num_heads = divide(total_num_heads, tp_size, f"{prefix} number of attention heads")
        if tp_size >= total_num_kv_heads:
            divide(tp_size, total_num_kv_heads, f"{prefix} replicas of KV heads: tp_size")
            self.num_kv_heads = 1
            self.num_kv_head_replicas = tp_size // total_num_kv_heads
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, f"{prefix} number of KV heads")
            self.num_kv_head_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, quant_config, prefix)

    def weight_shard(self, shard_id):
        q_size = self.num_heads * self.head_size
        kv_size = self.num_kv_heads * self.head_size
        if shard_id == "q":
            return WeightShard(dim=0, src_start=self.tp_rank * q_size, size=q_size)
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        dst_row = q_size if shard_id == "k" else q_size + kv_size
        return WeightShard(dim=0, src_start=kv_rank * kv_size, size=kv_size, dst_row=dst_row)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed by an all-reduce."""

    def __init__(self, input_size, output_size, bias=False, quant_config=None, prefix=""):
        tp_size = get_tp_group().size
        in_per_rank = divide(input_size, tp_size, f"{prefix} input size")
        super().__init__(
            input_size, output_size, in_per_rank, output_size, bias, quant_config, prefix
        )

    def weight_shard(self, shard_id):
        size = self.input_size_per_partition
        return WeightShard(dim=1, src_start=self.tp_rank * size, size=size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.quant_method.apply(self, x, None)
        out = get_tp_group().all_reduce(out)
        return out if self.bias is None else out + self.bias
