"""The shipped demo model, loaded through the engine with in-flight NF4, is a trained model:
its perplexity on held-out documentation (a file the training never saw) is far below what
random weights give (about the vocabulary size, 4096)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from engine import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "benchmarks" / "demo_model" / "model"
HELD_OUT = ROOT / "tests" / "data" / "heldout_pydoc.txt"  # from corpus.py's validation split
PERPLEXITY_BOUND = 100.0


@pytest.fixture(scope="module")
def demo():
    return LLM(model=str(DEMO_MODEL), quantization="bitsandbytes", dtype="bfloat16")


def test_held_out_perplexity(demo):
    ids = demo.get_tokenizer().encode(HELD_OUT.read_text())
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    out = demo.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    logprobs = [out.prompt_logprobs[j][ids[j]].logprob for j in range(1, len(ids))]
    perplexity = math.exp(-sum(logprobs) / len(logprobs))
    assert perplexity < PERPLEXITY_BOUND


def test_greedy_text_is_words(demo):
    params = SamplingParams(temperature=0, max_tokens=32)
    text = demo.generate(["The logging module"], params, use_tqdm=False)[0].outputs[0].text
    words = text.split()
    assert len(words) >= 5
    common = {"the", "a", "to", "of", "is", "and", "in", "for", "be", "this", "that", "an"}
    assert any(w.lower().strip(".,") in common for w in words)
