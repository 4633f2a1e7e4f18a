"""The reference: transformers' own models (with bitsandbytes for 4-bit), on the same files."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def load_reference(
    path: Path, quantization: BitsAndBytesConfig | None = None, dtype=torch.float32
) -> torch.nn.Module:
    kwargs = {"quantization_config": quantization} if quantization else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    # On CPUs with AVX512-BF16, bitsandbytes' Linear4bit repacks its weights at the first
    # forward and from then on multiplies in bf16 whatever the compute dtype; the reference
    # stays on bitsandbytes' portable path (dequantize, then a float32 matmul) on every CPU.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


@torch.no_grad()
def log_softmax(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), vocab] log-probabilities of the next token at every position."""
    logits = model(torch.tensor([token_ids], device=model.device)).logits[0].float()
    return torch.log_softmax(logits, dim=-1).cpu()
