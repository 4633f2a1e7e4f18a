"""Resolves what the engine arguments mean for one checkpoint: files, configs, dtype, limits.

Rank 0 and the other tensor-parallel ranks resolve the same spec and build their runners from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig, PretrainedConfig

from engine.config import DTYPES, EngineConfig
from engine.layers.quant import QuantizationConfig, resolve_quant_config
from engine.layers.quant.bitsandbytes import stored_blocksize
from engine.model_files import resolve_model_dir, safetensors_files
from engine.model_runner import ModelRunner


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(name: str, hf_config: PretrainedConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    checkpoint = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(checkpoint, str):
        checkpoint = DTYPES.get(checkpoint)
    if checkpoint in (torch.bfloat16, torch.float16):
        return checkpoint
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class ModelSpec:
    config: EngineConfig
    model_dir: Path
    hf_config: PretrainedConfig
    quant_config: QuantizationConfig | None
    dtype: torch.dtype
    device: torch.device
    max_model_len: int

    @classmethod
    def resolve(cls, config: EngineConfig) -> ModelSpec:
        device = pick_device(config.device)
        model_dir = resolve_model_dir(config.model, config.revision)
        hf_config = AutoConfig.from_pretrained(model_dir)
        quantization = (
            "bitsandbytes" if config.load_format == "bitsandbytes" else config.quantization
        )
        checkpoint_quant = getattr(hf_config, "quantization_config", None)
        if checkpoint_quant is not None and not isinstance(checkpoint_quant, dict):
            checkpoint_quant = checkpoint_quant.to_dict()
        if (
            checkpoint_quant is not None
            and checkpoint_quant.get("quant_method") == "bitsandbytes"
            and "bnb_4bit_blocksize" not in checkpoint_quant
        ):  # transformers keeps the block size in each weight's quant_state only
            blocksize = stored_blocksize(safetensors_files(model_dir))
            if blocksize is not None:
                checkpoint_quant = {**checkpoint_quant, "bnb_4bit_blocksize": blocksize}
        quant_config = resolve_quant_config(
            checkpoint_quant, quantization, config.quantization_config
        )
        dtype = pick_dtype(config.dtype, hf_config, device)
        return cls(
            config, model_dir, hf_config, quant_config, dtype, device,
            _max_model_len(config, hf_config),
        )  # fmt: skip

    def build_runner(self) -> ModelRunner:
        return ModelRunner(
            self.config, self.hf_config, self.model_dir, self.quant_config, self.dtype,
            self.device, self.max_model_len,
        )  # fmt: skip

    def eos_token_ids(self, tokenizer) -> frozenset[int]:
        ids: set[int] = set()
        try:
            eos = GenerationConfig.from_pretrained(self.model_dir).eos_token_id
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        except OSError:
            pass
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        return frozenset(ids)


def _max_model_len(config: EngineConfig, hf_config: PretrainedConfig) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    return config.max_model_len
