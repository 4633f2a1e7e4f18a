"""Builds the model on its device and loads safetensors weights into it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from engine.layers.linear import LinearBase
from engine.layers.quant import QuantizationConfig
from engine.layers.quant.bitsandbytes import BitsAndBytesConfig, BitsAndBytesLinearMethod
from engine.lazy_tensor import LazyTensor
from engine.model_files import safetensors_files
from engine.models.registry import build_model

logger = logging.getLogger(__name__)
GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class LoadReport:
    load_seconds: float
    weight_bytes: int
    weight_bytes_16bit: int  # the same model with every weight in 16 bits
    quantization: str  # "none" | "bitsandbytes-nf4-prequantized" | ...
    quantization_seconds: float = 0.0  # time spent quantizing while loading

    @property
    def ratio_to_16bit(self) -> float:
        return self.weight_bytes / self.weight_bytes_16bit


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def iterate_checkpoint(files: list[Path]) -> Iterator[tuple[str, LazyTensor]]:
    """Every tensor of the checkpoint, read lazily (each consumer reads only what it slices)."""
    total = sum(1 for f in files for _ in safe_open(f, framework="pt").keys())
    with tqdm(total=total, desc="Loading weights", unit="tensor", leave=False) as bar:
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    yield name, LazyTensor(f.get_slice(name))
                    bar.update()


def load_model(
    model_dir: Path,
    hf_config: PretrainedConfig,
    quant_config: QuantizationConfig | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[nn.Module, LoadReport]:
    start = time.perf_counter()
    with torch.device(device), _default_dtype(dtype):
        model = build_model(hf_config, quant_config)

    def on_linear_loaded(layer: LinearBase) -> None:
        layer.quant_method.process_weights_after_loading(layer)

    weights = iterate_checkpoint(safetensors_files(model_dir))
    if isinstance(quant_config, BitsAndBytesConfig):
        weights = quant_config.read_checkpoint(weights)
    with torch.no_grad():
        model.load_weights(weights, on_linear_loaded)
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report = LoadReport(
        load_seconds=time.perf_counter() - start,
        weight_bytes=_weight_bytes(model),
        weight_bytes_16bit=_weight_bytes_16bit(model),
        quantization=_describe(quant_config),
        quantization_seconds=sum(getattr(m, "quantize_seconds", 0.0) for m in model.modules()),
    )
    logger.info(
        "loaded %s in %.1f s: weights %.3f GiB (%.2fx of %.3f GiB in 16-bit), quantization %s",
        model_dir, report.load_seconds, report.weight_bytes / GiB, report.ratio_to_16bit,
        report.weight_bytes_16bit / GiB, report.quantization,
    )  # fmt: skip
    return model, report


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied counted once


def _weight_bytes_16bit(model: nn.Module) -> int:
    """What the weights would take with every tensor in 16 bits."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if isinstance(module, LinearBase) and isinstance(
            module.quant_method, BitsAndBytesLinearMethod
        ):
            bias = module.bias.numel() if module.bias is not None else 0
            total += (module.shape[0] * module.shape[1] + bias) * 2
        else:
            total += sum(p.numel() * 2 for p in params)
    return total


def _describe(quant_config: QuantizationConfig | None) -> str:
    if not isinstance(quant_config, BitsAndBytesConfig):
        return "none"
    kind = "prequantized" if quant_config.prequantized else "inflight"
    dq = "-dq" if quant_config.bnb_4bit_use_double_quant else ""
    return f"bitsandbytes-{quant_config.bnb_4bit_quant_type}{dq}-{kind}"
