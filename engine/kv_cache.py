"""Sizes the paged KV cache from a memory budget and binds it to the attention layers."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from engine.config import EngineConfig
from engine.layers.attention import Attention

logger = logging.getLogger(__name__)
CPU_DEFAULT_KV_BYTES = 1 << 30


FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
              "fp8_e5m2": torch.float8_e5m2}  # fmt: skip


def kv_cache_dtype(choice: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for EngineConfig.kv_cache_dtype."""
    return model_dtype if choice == "auto" else FP8_DTYPES[choice]


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def block_bytes(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block across all layers (keys and values)."""
    per_token = sum(2 * a.num_kv_heads * a.head_dim for a in attention_layers(model))
    return per_token * block_size * dtype.itemsize


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int, dtype, device) -> None:
    for layer in attention_layers(model):
        shape = (2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.kv_cache = torch.zeros(shape, dtype=dtype, device=device)


def free_kv_cache(model: nn.Module) -> None:
    for layer in attention_layers(model):
        layer.kv_cache = None


def determine_num_blocks(
    config: EngineConfig,
    model: nn.Module,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    profile_run: Callable[[], None],
) -> int:
    """The number of KV cache blocks: an explicit count, an explicit byte budget, or on GPU what
    gpu_memory_utilization leaves after weights and the peak activations of a profiling step;
    never more than max_num_seqs sequences of max_model_len tokens can use."""
    if config.num_gpu_blocks_override is not None:
        return config.num_gpu_blocks_override
    per_block = block_bytes(model, config.block_size, dtype)
    max_useful = -(-max_model_len // config.block_size) * config.max_num_seqs
    if config.kv_cache_memory_bytes is not None:
        budget = config.kv_cache_memory_bytes
    elif device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        profile_run()
        activation_peak = torch.cuda.max_memory_allocated(device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * config.gpu_memory_utilization) - (total - free) - activation_peak
        logger.info(
            "GPU memory: %.2f GiB total, %.2f GiB in use, %.2f GiB peak activations",
            total / 2**30, (total - free) / 2**30, activation_peak / 2**30,
        )  # fmt: skip
    else:
        return min(CPU_DEFAULT_KV_BYTES // per_block, max_useful)
    # No more blocks than max_num_seqs sequences of max_model_len tokens can ever use.
    num_blocks = min(budget // per_block, max_useful)
    if num_blocks < 1:
        raise ValueError(
            f"no memory left for the KV cache (budget {budget / 2**30:.2f} GiB); raise "
            "gpu_memory_utilization or kv_cache_memory_bytes, or lower max_num_batched_tokens"
        )
    return num_blocks
