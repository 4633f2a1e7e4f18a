"""bitsandbytes 4-bit (NF4/FP4) linear layers, pre-quantized or quantized while loading.

Both paths end in the same storage, so one `apply` serves them: the packed 4-bit codes (uint8,
two per byte, row-major like bnb) and one fp32 absmax per block. Double-quantized statistics are
de-nested at load exactly as bitsandbytes does it before every matmul, so the numbers match bnb's
while each step skips the de-nesting (at 0.375 bits per weight more than nested storage)."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import safe_open
from torch import nn

from engine.config import DTYPES
from engine.distributed import get_tp_group
from engine.kernels import kernels_available
from engine.layers.quant.base import (
    LinearMethod,
    QuantizationConfig,
    WeightShard,
    checkpoint_prefixes,
)
from engine.layers.quant.unquantized import UnquantizedLinearMethod
from engine.lazy_tensor import materialize

logger = logging.getLogger(__name__)

MIN_BNB_VERSION = (0, 45, 3)
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def check_bnb_version() -> None:
    version = tuple(int(p) for p in bnb.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_BNB_VERSION:
        raise ImportError(
            f"bitsandbytes >= {'.'.join(map(str, MIN_BNB_VERSION))} is required, "
            f"found {bnb.__version__}; pip install -U bitsandbytes"
        )


@dataclass(frozen=True, slots=True)
class Packed4bitWeight:
    """One checkpoint weight in bnb's 4-bit layout, statistics de-nested to fp32."""

    name: str
    data: torch.Tensor  # uint8, flat: out * in / 2 bytes
    absmax: torch.Tensor  # float32, flat: out * in / blocksize
    shape: tuple[int, int]  # (out, in) of the dequantized weight
    quant_type: str
    blocksize: int


def skipped_by(module: str, patterns: Iterable[str]) -> bool:
    """Whether llm_int8_skip_modules keeps this linear layer (its full module name) in 16 bits,
    by the rule of transformers, which writes and reads these checkpoints: a pattern matching
    from the name's start, as a regex, up to a module boundary ("model.layers.1" reaches
    "model.layers.1.mlp.down_proj" but not layer 10; "model\\.layers\\.\\d+\\.self_attn"), or
    the name's end ("lm_head", "down_proj"). "mlp" alone skips nothing."""
    return any(re.match(rf"(?:{p}){_BOUNDARY}", module) or module.endswith(p) for p in patterns)


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"  # just after a dot, or before one or the end


class BitsAndBytesConfig(QuantizationConfig, BaseModel):
    """4-bit bitsandbytes settings, with transformers' BitsAndBytesConfig names."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    name: Literal["bitsandbytes"] = "bitsandbytes"

    load_in_4bit: bool = Field(True, description="Must be true: 4-bit is what nibble serves.")
    load_in_8bit: bool = Field(
        False, description="8-bit (LLM.int8) checkpoints are not supported yet."
    )
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    bnb_4bit_use_double_quant: bool = Field(True, description="Quantize the block statistics too.")
    bnb_4bit_compute_dtype: str | None = Field(
        None, description="dtype of the matmul; None uses the model's dtype."
    )
    bnb_4bit_blocksize: int = Field(64, description="Weights per absmax block (nibble extension).")
    bnb_4bit_quant_storage: str = Field("uint8", description="Storage dtype of packed weights.")
    llm_int8_skip_modules: list[str] | None = Field(
        None,
        description="Linear layers kept unquantized: a name prefix or regex, or a name suffix "
        "(transformers' rule).",
    )
    prequantized: bool = Field(False, description="Weights come packed in the checkpoint.")

    @field_validator("bnb_4bit_compute_dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: object) -> str | None:
        if value is None:
            return None
        name = str(value).removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"bnb_4bit_compute_dtype {value!r} is not one of {sorted(DTYPES)}")
        return name

    def model_post_init(self, _context: object) -> None:
        if self.load_in_8bit or not self.load_in_4bit:
            raise ValueError(
                "this checkpoint uses bitsandbytes 8-bit (LLM.int8) quantization, which nibble "
                "does not support yet; use a 4-bit (load_in_4bit) checkpoint or a 16-bit one with "
                "quantization='bitsandbytes'"
            )
        if self.bnb_4bit_blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(
                f"bnb_4bit_blocksize {self.bnb_4bit_blocksize} is not a bnb block size"
            )
        if not isinstance(getattr(torch, self.bnb_4bit_quant_storage, None), torch.dtype):
            raise ValueError(
                f"bnb_4bit_quant_storage {self.bnb_4bit_quant_storage!r} is not a torch dtype"
            )

    def compute_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return DTYPES[self.bnb_4bit_compute_dtype] if self.bnb_4bit_compute_dtype else model_dtype

    def is_skipped(self, prefix: str) -> bool:
        names = checkpoint_prefixes(prefix)
        skipped = [self._matches_skip(name) for name in names]
        if any(skipped) and not all(skipped):
            raise ValueError(
                f"llm_int8_skip_modules skips only some of {names}, which nibble runs as one "
                "merged layer; skip all of them or none"
            )
        return all(skipped)

    def _matches_skip(self, name: str) -> bool:
        return skipped_by(name, self.llm_int8_skip_modules or [])

    def get_linear_method(self, prefix: str) -> LinearMethod:
        if self.is_skipped(prefix):
            return UnquantizedLinearMethod()
        return BitsAndBytesLinearMethod(self)

    def read_checkpoint(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, object]]:
        """Group each packed weight with its statistics into one Packed4bitWeight."""
        if not self.prequantized:
            yield from weights
            return
        pending: dict[str, dict[str, torch.Tensor]] = {}
        # transformers stores the packed bytes in this dtype (bnb_4bit_quant_storage), viewed
        # back as bytes here.
        storage = getattr(torch, self.bnb_4bit_quant_storage)
        for name, tensor in weights:
            base, part = _split_bnb_name(name, tensor, storage)
            if base is None:
                yield name, tensor
                continue
            parts = pending.setdefault(base, {})
            parts[part] = materialize(tensor)
            if "data?" in parts and len(parts) > 1:  # it has a quant_state: packed bytes
                parts["data"] = parts.pop("data?")
            if _is_complete(parts):
                yield base, _unpack(base, pending.pop(base))
        # A weight in the storage dtype that never met a quant_state is a 16-bit one (a norm,
        # the embeddings, a skipped layer) of a model whose storage dtype is its own.
        for base in [b for b, parts in pending.items() if parts.keys() == {"data?"}]:
            yield base, pending.pop(base)["data?"]
        if pending:
            raise ValueError(f"incomplete bitsandbytes state for {sorted(pending)[:3]}")


def _split_bnb_name(
    name: str, tensor: torch.Tensor, storage: torch.dtype = torch.uint8
) -> tuple[str | None, str]:
    """('x.weight', part) for a bnb component of x.weight, else (None, '')."""
    if ".weight.quant_state." in name:
        base, _, _ = name.partition(".quant_state.")
        return base, "quant_state"
    for suffix in _STATE_SUFFIXES:
        if name.endswith(".weight." + suffix):
            return name[: -len(suffix) - 1], suffix
    if name.endswith(".weight") and tensor.dtype == torch.uint8:
        return name, "data"
    if name.endswith(".weight") and tensor.dtype == storage:  # packed, or a 16-bit tensor
        return name, "data?"
    return None, ""


def _is_complete(parts: dict[str, torch.Tensor]) -> bool:
    if not {"data", "absmax", "quant_map", "quant_state"} <= parts.keys():
        return False
    meta = _state_json(parts["quant_state"])
    return "nested_blocksize" not in meta or {"nested_absmax", "nested_quant_map"} <= parts.keys()


def _state_json(tensor: torch.Tensor) -> dict[str, object]:
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))


def _unpack(name: str, parts: dict[str, torch.Tensor]) -> Packed4bitWeight:
    meta = _state_json(parts["quant_state"])
    absmax = parts["absmax"]
    if "nested_blocksize" in meta:
        state2 = bnbF.QuantState(
            absmax=parts["nested_absmax"],
            code=parts["nested_quant_map"],
            blocksize=int(meta["nested_blocksize"]),
            dtype=getattr(torch, str(meta["nested_dtype"])),
        )
        absmax = bnbF.dequantize_blockwise(absmax, state2) + float(meta["nested_offset"])
    out_size, in_size = (int(s) for s in meta["shape"])
    return Packed4bitWeight(
        name=name,
        data=parts["data"].reshape(-1).view(torch.uint8),  # stored as bytes or another dtype
        absmax=absmax.float().reshape(-1),
        shape=(out_size, in_size),
        quant_type=str(meta["quant_type"]),
        blocksize=int(meta["blocksize"]),
    )


class BitsAndBytesLinearMethod(LinearMethod):
    """Holds `qweight` (uint8, out*in/2) and `absmax` (fp32, out*in/blocksize). In-flight mode
    quantizes each shard as it is loaded, so no 16-bit copy of the layer is ever held.

    The matmul is nibble's fused kernel (engine/kernels/matmul_4bit.py) where the layer's
    kernels are on, the shape and dtype allow it (CUDA, fp16/bf16 compute, rows of whole
    absmax blocks) and this GPU's tuned table names a fused launch for the batch bucket and
    shape; otherwise, and as the reference, bitsandbytes' own `matmul_4bit`."""

    def __init__(self, config: BitsAndBytesConfig) -> None:
        self.config = config

    def create_weights(
        self, layer, input_size_per_partition, output_size_per_partition, params_dtype
    ):
        num_values = output_size_per_partition * input_size_per_partition
        if num_values % self.config.bnb_4bit_blocksize:
            raise ValueError(
                f"{layer.prefix}: {output_size_per_partition}x{input_size_per_partition} "
                f"weights do not fill whole {self.config.bnb_4bit_blocksize}-value blocks"
            )
        layer.compute_dtype = self.config.compute_dtype(params_dtype)
        layer.params_dtype = params_dtype
        layer.shape = (output_size_per_partition, input_size_per_partition)
        qweight = torch.empty(num_values // 2, dtype=torch.uint8)
        absmax = torch.empty(num_values // self.config.bnb_4bit_blocksize, dtype=torch.float32)
        layer.qweight = nn.Parameter(qweight, requires_grad=False)
        layer.absmax = nn.Parameter(absmax, requires_grad=False)

    def load_weight(self, layer, loaded, shard):
        if self.config.prequantized:
            if not isinstance(loaded, Packed4bitWeight):
                raise ValueError(
                    f"{layer.prefix}: the checkpoint holds an unquantized {tuple(loaded.shape)} "
                    "weight where a bitsandbytes 4-bit one was expected"
                )
            self._check_format(layer, loaded)
            data, absmax = _narrow_packed(loaded, shard, layer.prefix)
        else:
            if not hasattr(loaded, "is_floating_point") or not loaded.is_floating_point():
                raise ValueError(f"{layer.prefix}: expected a 16/32-bit weight to quantize")
            # Each checkpoint tensor is quantized on its own, as transformers does per module.
            source = shard.narrow(loaded).to(layer.qweight.device, layer.params_dtype)
            start = time.perf_counter()
            data, absmax = self._quantize(source.contiguous())
            if self.config.bnb_4bit_use_double_quant:
                absmax = _double_quantized(
                    absmax, shard, loaded.shape, self.config.bnb_4bit_blocksize
                )
            layer.quantize_seconds = (
                getattr(layer, "quantize_seconds", 0.0) + time.perf_counter() - start
            )
        dst_start = shard.dst_row * layer.shape[1]
        layer.qweight.data.narrow(0, dst_start // 2, data.numel()).copy_(data)
        block = self.config.bnb_4bit_blocksize
        layer.absmax.data.narrow(0, dst_start // block, absmax.numel()).copy_(absmax)

    def _quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        packed, state = bnbF.quantize_4bit(
            weight,
            blocksize=self.config.bnb_4bit_blocksize,
            quant_type=self.config.bnb_4bit_quant_type,
        )
        return packed.reshape(-1), state.absmax.float().reshape(-1)

    def _check_format(self, layer: nn.Module, loaded: Packed4bitWeight) -> None:
        expected = (self.config.bnb_4bit_quant_type, self.config.bnb_4bit_blocksize)
        if (loaded.quant_type, loaded.blocksize) != expected:
            raise ValueError(
                f"{loaded.name}: stored as {loaded.quant_type}/block {loaded.blocksize}, but the "
                f"checkpoint's quantization_config says {expected[0]}/block {expected[1]}"
            )

    def process_weights_after_loading(self, layer):
        layer.quant_state = bnbF.QuantState(
            absmax=layer.absmax.data,
            shape=torch.Size(layer.shape),
            code=bnbF.get_4bit_type(self.config.bnb_4bit_quant_type, device=layer.absmax.device),
            blocksize=self.config.bnb_4bit_blocksize,
            quant_type=self.config.bnb_4bit_quant_type,
            dtype=layer.compute_dtype,
        )
        layer.code_table = None  # the fused kernel's form of the code; None: it cannot run here
        device = layer.absmax.device
        # The fused kernels are PTX: a CUDA device, never Triton's CPU interpreter.
        if device.type == "cuda" and kernels_available(device) and not _triton_interpreter():
            from engine.kernels import matmul_4bit as fused
            from engine.kernels.decode_4bit import code_table

            if fused.supports(layer.shape, self.config.bnb_4bit_blocksize):
                layer.code_table = code_table(layer.quant_state.code, device)

    def apply(self, layer, x, bias):
        return self._apply(layer, x, bias, self._fused_config(layer, x))

    def _apply(self, layer, x, bias, config):
        """The fused kernel with `config`, or (None) bitsandbytes' matmul."""
        if config is not None:
            from engine.kernels import matmul_4bit as fused

            out = fused.matmul_4bit(
                x.to(layer.compute_dtype), layer.qweight, layer.absmax, layer.code_table,
                layer.shape, self.config.bnb_4bit_blocksize, config,
            )  # fmt: skip
        else:
            out = bnb.matmul_4bit(
                x.to(layer.compute_dtype), layer.qweight.view(-1, 1), layer.quant_state
            )
        out = out.to(x.dtype)
        return out if bias is None else out + bias

    def apply_silu_and_mul(self, layer, x, bias, act):
        """Where the fused GEMV runs this layer (a decode step of a batch or two), it applies
        SiLU-and-mul as it writes its output: one kernel instead of two."""
        from engine.kernels import matmul_4bit as fused

        config = self._fused_config(layer, x)
        if config is None or bias is not None or not fused.fused_silu_and_mul(config):
            return act(self._apply(layer, x, bias, config))
        out = fused.matmul_4bit(
            x.to(layer.compute_dtype), layer.qweight, layer.absmax, layer.code_table, layer.shape,
            self.config.bnb_4bit_blocksize, config, silu_and_mul=True,
        )  # fmt: skip
        return out.to(x.dtype)

    @staticmethod
    def _fused_config(layer, x):
        """The fused kernel's launch for this call, or None where bitsandbytes runs it (no
        kernel here, or none measured faster for this shape)."""
        if not (
            layer.use_kernels
            and layer.code_table is not None
            and layer.compute_dtype in (torch.float16, torch.bfloat16)
        ):
            return None
        from engine.kernels import matmul_4bit as fused

        return fused.kernel_for(x.numel() // x.shape[-1], *layer.shape, x.device)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The layer's weight as the matmul sees it (for tests and debugging)."""
        return bnbF.dequantize_4bit(layer.qweight.view(-1, 1), layer.quant_state)


def _narrow_packed(
    loaded: Packed4bitWeight, shard: WeightShard, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice packed codes and statistics exactly; only whole blocks can be sliced."""
    out_size, in_size = loaded.shape
    block = loaded.blocksize
    if shard.dim == 0:
        start, size = shard.src_start * in_size, shard.size * in_size
        if start % block or size % block:
            raise ValueError(
                f"{name}: rows {shard.src_start}..{shard.src_start + shard.size} of {loaded.name} "
                f"(input size {in_size}) do not start and end on {block}-value block boundaries, "
                "so the pre-quantized weight cannot be split here exactly"
            )
        return (
            loaded.data.narrow(0, start // 2, size // 2),
            loaded.absmax.narrow(0, start // block, size // block),
        )
    if in_size % block or shard.src_start % block or shard.size % block:
        raise ValueError(
            f"{name}: input columns {shard.src_start}..{shard.src_start + shard.size} of "
            f"{loaded.name} (input size {in_size}) are not aligned to its {block}-value blocks, so "
            "the pre-quantized weight cannot be split here exactly"
        )
    data = loaded.data.view(out_size, in_size // 2).narrow(1, shard.src_start // 2, shard.size // 2)
    absmax = loaded.absmax.view(out_size, in_size // block)
    absmax = absmax.narrow(1, shard.src_start // block, shard.size // block)
    return data.reshape(-1), absmax.reshape(-1)


_NESTED_BLOCKSIZE = 256  # what bitsandbytes uses to quantize the statistics


def _double_quantized(
    absmax: torch.Tensor, shard: WeightShard, full_shape: torch.Size, blocksize: int
) -> torch.Tensor:
    """Block statistics after double quantization and de-nesting, exactly as bitsandbytes gives
    them for the whole checkpoint tensor (offset = mean of all its absmax, 8-bit blocks of 256).

    A rank holds only its shard's statistics, so with tensor parallelism the ranks gather the
    whole tensor's (1/blocksize of the weights), quantize them as one, and keep their own part:
    every rank then holds what a single rank would."""
    tp = get_tp_group()
    out_size, in_size = full_shape
    aligned = (
        shard.src_start * (in_size if shard.dim == 0 else 1) % blocksize == 0
        and shard.size * (in_size if shard.dim == 0 else out_size) % blocksize == 0
        and (shard.dim == 0 or in_size % blocksize == 0)
    )
    if tp.size == 1 or not aligned:
        return _nest_and_denest(absmax)
    parts = tp.all_gather(absmax.unsqueeze(0), dim=0)
    starts = tp.all_gather(torch.tensor([shard.src_start], device=absmax.device), dim=0).tolist()
    order = sorted(set(starts))  # replicated shards (KV heads) appear once
    unique = [parts[starts.index(s)] for s in order]
    if shard.dim == 0:
        whole = torch.cat(unique)
    else:
        whole = torch.cat([p.view(out_size, -1) for p in unique], dim=1).reshape(-1)
    denested = _nest_and_denest(whole)
    mine = order.index(shard.src_start)
    if shard.dim == 0:
        return denested.narrow(0, mine * absmax.numel(), absmax.numel())
    cols = absmax.numel() // out_size
    return denested.view(out_size, -1).narrow(1, mine * cols, cols).reshape(-1)


def _nest_and_denest(absmax: torch.Tensor) -> torch.Tensor:
    offset = absmax.mean()
    nested, state2 = bnbF.quantize_blockwise(absmax - offset, blocksize=_NESTED_BLOCKSIZE)
    return bnbF.dequantize_blockwise(nested, state2) + offset


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def stored_blocksize(files: Iterable[Path]) -> int | None:
    """The absmax block size a pre-quantized checkpoint's packed weights were stored with,
    from the first weight's quant_state (transformers records it there only, not in
    config.json), or None where no packed weight is found."""
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if ".weight.quant_state.bitsandbytes__" in name:
                    return int(_state_json(f.get_tensor(name))["blocksize"])
    return None
