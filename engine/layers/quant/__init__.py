"""Chooses the quantization method from the checkpoint's config.json and the user's arguments."""

from __future__ import annotations

from engine.layers.quant.base import LinearMethod, QuantizationConfig, WeightShard
from engine.layers.quant.bitsandbytes import BitsAndBytesConfig, check_bnb_version
from engine.layers.quant.unquantized import UnquantizedLinearMethod

__all__ = [
    "BitsAndBytesConfig",
    "LinearMethod",
    "QuantizationConfig",
    "UnquantizedLinearMethod",
    "WeightShard",
    "resolve_quant_config",
]

# Keys of transformers' BitsAndBytesConfig that a user may pass and that have no effect on 4-bit.
_IGNORED_USER_KEYS = {
    "quant_method", "llm_int8_threshold", "llm_int8_has_fp16_weight",
    "llm_int8_enable_fp32_cpu_offload", "_load_in_4bit", "_load_in_8bit",
}  # fmt: skip


def resolve_quant_config(
    checkpoint_quant: dict[str, object] | None,
    quantization: str | None,
    user_config: dict[str, object] | None,
) -> QuantizationConfig | None:
    """The quantization to load with, or None for a plain 16/32-bit model.

    checkpoint_quant: config.json's `quantization_config`; quantization / user_config: the
    engine arguments. Contradictions raise ValueError saying what and why."""
    if checkpoint_quant is not None:
        method = checkpoint_quant.get("quant_method")
        if method != "bitsandbytes":
            raise ValueError(
                f"the checkpoint is quantized with {method!r}, but nibble serves bitsandbytes "
                "4-bit models only; use a bitsandbytes checkpoint or a 16-bit one with "
                "quantization='bitsandbytes'"
            )
        if user_config:
            raise ValueError(
                "quantization_config was given for a checkpoint that is already quantized with "
                "bitsandbytes; its own quantization_config in config.json is used"
            )
        check_bnb_version()
        return BitsAndBytesConfig(**checkpoint_quant, prequantized=True)
    if quantization is None:
        return None
    if quantization != "bitsandbytes":
        raise ValueError(f"quantization {quantization!r} is not supported; use 'bitsandbytes'")
    check_bnb_version()
    user_config = dict(user_config or {})
    known = set(BitsAndBytesConfig.model_fields) - {"prequantized", "name"} | _IGNORED_USER_KEYS
    unknown = sorted(set(user_config) - known)
    if unknown:
        raise ValueError(
            f"unknown bitsandbytes option(s) {unknown}; known: {sorted(known - _IGNORED_USER_KEYS)}"
        )
    return BitsAndBytesConfig(**user_config, prequantized=False)
