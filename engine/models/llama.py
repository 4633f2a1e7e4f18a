"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (q/k/v biases) and Qwen3 (q/k RMSNorm)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine.layers.norm import RMSNorm
from engine.layers.quant import QuantizationConfig
from engine.layers.rotary import RotaryEmbedding
from engine.lazy_tensor import materialize


@dataclass(frozen=True)
class ArchitectureTraits:
    """How the members of the family differ."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False


def rope_settings(config: PretrainedConfig) -> tuple[float, dict[str, object] | None]:
    """(theta, scaling) from either `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return float(params.get("rope_theta", 10000.0)), dict(params)
    return float(getattr(config, "rope_theta", 10000.0)), getattr(config, "rope_scaling", None)


def rotary_embedding(config) -> RotaryEmbedding:
    """The model's rotary tables, built once and shared by every layer (per layer they took
    about 2 GiB for a 128k-context, 32-layer model)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta, scaling = rope_settings(config)
    return RotaryEmbedding(head_dim, config.max_position_embeddings, theta, scaling)


def layer_sliding_window(config, index: int) -> int | None:
    """Layer `index`'s attention window: the config's, on the layers its `layer_types` (as
    transformers builds them: Qwen2 slides only from max_window_layers on) mark sliding, or on
    every layer where it has none (Mistral); None where sliding is off."""
    window = getattr(config, "sliding_window", None)
    if window is None or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[index] != "sliding_attention":
        return None
    return window


class LlamaAttention(nn.Module):
    def __init__(
        self, config, traits: ArchitectureTraits, quant_config, prefix: str,
        rotary_emb: RotaryEmbedding, sliding_window: int | None,
    ) -> None:  # fmt: skip
        super().__init__()
        hidden_size = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or hidden_size // num_heads
        self.qkv_proj = QKVParallelLinear(
            hidden_size, head_dim, num_heads, num_kv_heads, traits.qkv_bias, quant_config,
            f"{prefix}.qkv_proj",
        )  # fmt: skip
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, hidden_size, traits.o_bias, quant_config, f"{prefix}.o_proj"
        )
        if traits.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            self.num_heads, head_dim, self.num_kv_heads, head_dim**-0.5, sliding_window
        )

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        # The attention layer rotates q and k (on decode steps, inside its kernel).
        out = self.attn(q.flatten(1), k.flatten(1), v, positions, self.rotary_emb)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config, quant_config, prefix: str) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        inter = config.intermediate_size
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; only silu")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [inter, inter], bias, quant_config, f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            inter, config.hidden_size, bias, quant_config, f"{prefix}.down_proj"
        )
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.forward_silu_and_mul(x, self.act_fn))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config, traits, quant_config, prefix: str, rotary_emb: RotaryEmbedding,
        sliding_window: int | None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.self_attn = LlamaAttention(
            config, traits, quant_config, f"{prefix}.self_attn", rotary_emb, sliding_window
        )
        self.mlp = LlamaMLP(config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it): each norm adds the residual
        it follows, so the add and the norm are one fused kernel on GPU."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, traits, quant_config) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        rotary_emb = rotary_embedding(config)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                config,
                traits,
                quant_config,
                f"model.layers.{i}",
                rotary_emb,
                layer_sliding_window(config, i),
            )  # fmt: skip
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# Checkpoint projection -> (our merged layer, shard id).
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
SHARD_IDS = {QKVParallelLinear: ("q", "k", "v"), MergedColumnParallelLinear: (0, 1)}


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: PretrainedConfig,
        traits: ArchitectureTraits,
        quant_config: QuantizationConfig | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, traits, quant_config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden)

    def load_weights(
        self,
        weights: Iterable[tuple[str, object]],
        on_linear_loaded: Callable[[LinearBase], None],
    ) -> None:
        """Route each checkpoint tensor to its module's weight_loader. `on_linear_loaded` runs as
        soon as a linear layer has all its shards (so in-flight quantization frees 16-bit copies
        layer by layer)."""
        modules = dict(self.named_modules())
        pending = {name: _expected_shards(name, m) for name, m in modules.items()}
        if self.config.tie_word_embeddings:
            pending.pop("lm_head")
        pending = {name: shards for name, shards in pending.items() if shards}
        for name, loaded in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module_name, _, param_name = name.rpartition(".")
            head, _, proj = module_name.rpartition(".")
            shard_id = None
            if proj in STACKED_PARAMS:
                merged, shard_id = STACKED_PARAMS[proj]
                module_name = f"{head}.{merged}"
            module = modules.get(module_name)
            if module is None or (module_name, param_name, shard_id) not in pending.get(
                module_name, set()
            ):
                raise ValueError(f"unexpected or repeated weight {name!r} in the checkpoint")
            if hasattr(module, "weight_loader"):
                module.weight_loader(param_name, loaded, shard_id)
            else:
                getattr(module, param_name).data.copy_(materialize(loaded))
            pending[module_name].discard((module_name, param_name, shard_id))
            if not pending[module_name]:
                del pending[module_name]
                if isinstance(module, LinearBase):
                    on_linear_loaded(module)
        if pending:
            missing = sorted(f"{m}.{p}" for shards in pending.values() for m, p, _ in shards)
            raise ValueError(f"weights missing from the checkpoint: {missing[:5]}")


def _expected_shards(name: str, module: nn.Module) -> set[tuple[str, str, object]]:
    shard_ids = SHARD_IDS.get(type(module), (None,))
    params = [p for p, _ in module.named_parameters(recurse=False)]
    if isinstance(module, LinearBase):
        params = ["weight"] + (["bias"] if module.bias is not None else [])
    return {(name, p, s) for p in params for s in shard_ids}
