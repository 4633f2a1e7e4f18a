"""Builds small seeded checkpoints with transformers, as a user's files would look."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<|end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention keeps keys and values in fixed-size blocks.",
    "Quantization stores each weight in four bits with a scale per block.",
    "Hello world! Bonjour le monde. Grüße aus Köln, naïve café, 東京 and emoji 🦊.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000; symbols: + - * / = < > ( ) [ ] { }.",
]


def build_tokenizer(directory: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer, trained deterministically on a small corpus."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


_FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def build_model(
    directory: Path,
    family: str = "llama",
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> Path:
    """A random-initialised model with its tokenizer, saved the way transformers saves it."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    config_cls, model_cls = _FAMILIES[family]
    settings = dict(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    if family == "qwen3":
        settings["head_dim"] = 32
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**settings)).to(dtype)
    with torch.no_grad():  # larger weights than the init default, so tokens depend on them
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.08 if p.dim() > 1 else 0.02)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def bnb_config(
    quant_type: str = "nf4", double_quant: bool = True, compute_dtype=torch.float32
) -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
    )  # fmt: skip


def prequantize(source: Path, target: Path, quant: BitsAndBytesConfig) -> Path:
    """Quantize with transformers + bitsandbytes and save_pretrained (before any forward pass,
    which on CPU would repack the weights)."""
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quant, dtype=torch.float32
    )
    model.save_pretrained(target)
    for f in source.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, target / f.name)
    return target
