"""Typed engine configuration, with vLLM's argument names."""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

BLOCK_SIZES = (1, 8, 16, 32, 64, 128)  # KV cache block sizes, as vLLM allows them

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> str:
    """Normalise a dtype given as a string or a torch.dtype to one of DTYPES' keys or "auto"."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"dtype {dtype} is not supported; use one of bfloat16, float16, float32")
    name = dtype.removeprefix("torch.")
    if name != "auto" and name not in DTYPES:
        raise ValueError(
            f"dtype {dtype!r} is not supported; use auto, bfloat16, float16 or float32"
        )
    return name


class EngineConfig(BaseModel):
    """Everything the engine needs to load a model and serve it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="Local directory or Hugging Face hub id of the checkpoint.")
    tokenizer: str | None = Field(
        None, description="Tokenizer directory or hub id; defaults to model."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: str = Field("auto", description="Activation dtype: auto, bfloat16, float16 or float32.")
    quantization: Literal["bitsandbytes"] | None = Field(
        None,
        description="Quantize a 16/32-bit checkpoint while loading; inferred from config.json "
        "for pre-quantized checkpoints.",
    )
    load_format: Literal["auto", "bitsandbytes", "safetensors"] = Field(
        "auto", description="Checkpoint format; 'bitsandbytes' is accepted for vLLM compatibility."
    )
    quantization_config: dict[str, object] | None = Field(
        None,
        description="bitsandbytes options for in-flight quantization, with transformers' "
        "BitsAndBytesConfig names (bnb_4bit_quant_type, bnb_4bit_use_double_quant, ...).",
    )
    trust_remote_code: bool = Field(
        False, description="Accepted for compatibility; no remote code runs."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="Number of tensor-parallel ranks.")
    max_model_len: int | None = Field(
        None, ge=1, description="Longest prompt + output; defaults to the model's context length."
    )
    seed: int = Field(0, description="Seed for requests that do not set their own.")
    device: str | None = Field(
        None, description="cuda, cuda:N or cpu; None picks CUDA when present."
    )
    block_size: int = Field(16, ge=1, description="Tokens per KV cache block.")
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of GPU memory the engine may use (weights + KV cache).",
    )
    kv_cache_memory_bytes: int | None = Field(
        None,
        gt=0,
        description="KV cache size in bytes; overrides gpu_memory_utilization. "
        "On CPU the default is 1 GiB.",
    )
    num_gpu_blocks_override: int | None = Field(
        None, ge=1, description="Exact number of KV cache blocks (testing and tuning)."
    )
    max_num_seqs: int = Field(256, ge=1, description="Most sequences in one batch.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Most tokens in one step; defaults to max(2048, max_num_seqs)."
    )
    enable_chunked_prefill: bool = Field(
        True, description="Split long prompts over several steps, mixed with decodes."
    )
    enforce_eager: bool = Field(
        False,
        description="Run every step eagerly; otherwise decode steps, and one sequence's "
        "prefill of up to 256 tokens, replay CUDA graphs (on CUDA with the Triton kernels; with "
        "tensor parallelism, on every rank).",
    )
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto",
        description="auto: the model's dtype; fp8 (= fp8_e4m3) or fp8_e5m2: one byte per "
        "cached key and value, unscaled (vLLM's default scale of 1.0): twice the cached "
        "tokens of a 16-bit cache and half the bytes a decode step reads from it, at a small "
        "cost in accuracy.",
    )
    async_scheduling: bool = Field(
        True,
        description="One rank (a GPU or the CPU): while a decode step runs, queue the next one "
        "behind it (fed the tokens it samples, on the device) and process the first one's "
        "tokens on the host meanwhile, so the GPU does not wait for the host between steps.",
    )
    kernels: Literal["auto", "triton", "native"] = Field(
        "auto",
        description="auto: nibble's Triton kernels (fused 4-bit matmul, paged attention, fused "
        "norms) on CUDA when Triton is installed; triton: require them; native: PyTorch and "
        "bitsandbytes only.",
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: str | torch.dtype) -> str:
        return parse_dtype(value)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
            raise ValueError(f"device {value!r} is not cpu, cuda or cuda:N")
        return value

    @field_validator("block_size")
    @classmethod
    def _block_size(cls, value: int) -> int:
        if value not in BLOCK_SIZES:  # the attention kernels tile the cache in powers of two
            raise ValueError(f"block_size {value} is not one of {BLOCK_SIZES}")
        return value

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_num_batched_tokens is not None and (
            self.max_num_batched_tokens < self.max_num_seqs
        ):  # fewer tokens a step than sequences would cap the batch at the token budget
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )
        if self.load_format == "bitsandbytes" and self.quantization not in (None, "bitsandbytes"):
            raise ValueError("load_format='bitsandbytes' needs quantization='bitsandbytes' or None")
        if self.quantization_config is not None and self.quantization is None:
            raise ValueError("quantization_config is given but quantization is None")
        return self

    @property
    def batched_tokens_limit(self) -> int:
        return self.max_num_batched_tokens or max(2048, self.max_num_seqs)
