"""Maps config.json's `architectures` to our model classes."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from engine.layers.quant import QuantizationConfig
from engine.models.llama import ArchitectureTraits, LlamaForCausalLM


def _llama_traits(config: PretrainedConfig) -> ArchitectureTraits:
    bias = bool(getattr(config, "attention_bias", False))
    return ArchitectureTraits(qkv_bias=bias, o_bias=bias)


MODEL_REGISTRY = {
    "LlamaForCausalLM": (LlamaForCausalLM, _llama_traits),
    "MistralForCausalLM": (LlamaForCausalLM, _llama_traits),
    "Qwen2ForCausalLM": (LlamaForCausalLM, lambda c: ArchitectureTraits(qkv_bias=True)),
    "Qwen3ForCausalLM": (
        LlamaForCausalLM,
        lambda c: ArchitectureTraits(
            qkv_bias=bool(getattr(c, "attention_bias", False)),
            o_bias=bool(getattr(c, "attention_bias", False)),
            qk_norm=True,
        ),
    ),
}


def build_model(config: PretrainedConfig, quant_config: QuantizationConfig | None) -> nn.Module:
    architectures = getattr(config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            model_cls, traits = MODEL_REGISTRY[arch]
            return model_cls(config, traits(config), quant_config)
    raise ValueError(
        f"architecture {architectures or '(none in config.json)'} is not supported; "
        f"supported: {sorted(MODEL_REGISTRY)}"
    )
