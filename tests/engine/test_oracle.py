"""Our model code against transformers (+ bitsandbytes) on the same checkpoints."""

from __future__ import annotations

import pytest
import torch
from checkpoints import bnb_config
from oracle import greedy, load_reference, log_softmax
from prompts import PROMPTS

from engine import LLM, SamplingParams

MAX_NEW = 8
# Stated tolerances on log-probabilities (max abs difference over the vocabulary). Unquantized
# float32 differs only by summation order; 4-bit too: our matmul_4bit path vs. bitsandbytes'
# dequantize-then-matmul (kept off its bf16 CPU repack: oracle.load_reference), both in float32.
TOLERANCE = {"fp32": 1e-4, "4bit": 2e-3}

CASES = [
    # (id, family, checkpoint suffix or None, in-flight bnb options or None)
    ("llama-fp32", "llama", None, None),
    ("qwen2-fp32", "qwen2", None, None),
    ("qwen3-fp32", "qwen3", None, None),
    ("mistral-fp32", "mistral", None, None),
    ("llama-inflight-nf4-dq", "llama", None, ("nf4", True)),
    ("qwen2-inflight-nf4-dq", "qwen2", None, ("nf4", True)),
    ("qwen3-inflight-fp4", "qwen3", None, ("fp4", False)),
    ("llama-prequant-nf4-dq", "llama", "nf4-dq", None),
    ("llama-prequant-nf4", "llama", "nf4", None),
    ("llama-prequant-fp4-dq", "llama", "fp4-dq", None),
    ("llama-prequant-fp4", "llama", "fp4", None),
    ("qwen2-prequant-nf4-dq", "qwen2", "nf4-dq", None),
    ("qwen3-prequant-nf4-dq", "qwen3", "nf4-dq", None),
]


def _build(checkpoints, family, prequant, inflight):
    """(our LLM, the reference model, tolerance) for one case."""
    if prequant:
        path = checkpoints(f"{family}-{prequant}")
        llm = LLM(model=str(path), dtype="float32")  # quantization inferred from config.json
        return llm, load_reference(path), TOLERANCE["4bit"]
    path = checkpoints(family)
    if inflight:
        quant_type, dq = inflight
        options = dict(
            bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=dq,
            bnb_4bit_compute_dtype="float32",
        )  # fmt: skip
        llm = LLM(
            model=str(path), dtype="float32", quantization="bitsandbytes",
            quantization_config=options,
        )  # fmt: skip
        return llm, load_reference(path, bnb_config(quant_type, dq)), TOLERANCE["4bit"]
    return LLM(model=str(path), dtype=torch.float32), load_reference(path), TOLERANCE["fp32"]


@pytest.mark.parametrize(
    ("family", "prequant", "inflight"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_matches_transformers(checkpoints, family, prequant, inflight):
    llm, reference, tolerance = _build(checkpoints, family, prequant, inflight)
    tokenizer = llm.get_tokenizer()
    vocab = llm.llm_engine.hf_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=vocab)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)  # one batch, 8 prompt lengths
    assert len({len(o.prompt_token_ids) for o in outputs}) == len(PROMPTS)
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = tokenizer.encode(prompt)
        assert output.prompt_token_ids == ids
        completion = output.outputs[0]
        assert completion.token_ids == greedy(reference, ids, MAX_NEW), prompt
        assert completion.finish_reason == "length"
        # Last-position distribution of the prompt, over the whole vocabulary.
        expected = log_softmax(reference, ids)[-1]
        ours = torch.full((vocab,), float("nan"))
        for token, logprob in completion.logprobs[0].items():
            ours[token] = logprob.logprob
        assert not ours.isnan().any()
        assert (ours - expected).abs().max().item() < tolerance, prompt
