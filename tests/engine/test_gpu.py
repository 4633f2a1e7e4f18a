"""The oracle comparison on a CUDA GPU in bfloat16, the way the model is served there.

Skipped where no GPU is present (CI); results from the GPU host are committed under
benchmarks/results/."""

from __future__ import annotations

import pytest
import torch
from checkpoints import bnb_config
from oracle import greedy, load_reference, log_softmax
from prompts import PROMPTS

from engine import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
MAX_NEW = 8
# bf16 activations: both sides round differently in norms, rotary and attention.
TOLERANCE = 0.1
MIN_IDENTICAL = 6  # of the 8 prompts, greedy continuations identical token for token


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["inflight", "prequant"])
def test_bf16_matches_transformers_on_gpu(checkpoints, family, mode):
    config = bnb_config("nf4", True, torch.bfloat16)
    if mode == "prequant":
        path = checkpoints(f"{family}-nf4-dq")
        llm = LLM(model=str(path), dtype="bfloat16")
        reference = load_reference(path, dtype=torch.bfloat16)
    else:
        path = checkpoints(family)
        llm = LLM(model=str(path), dtype="bfloat16", quantization="bitsandbytes")
        reference = load_reference(path, config, dtype=torch.bfloat16)
    assert llm.llm_engine.device.type == "cuda"
    vocab = llm.llm_engine.hf_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=vocab)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    identical = 0
    for output in outputs:
        ids = output.prompt_token_ids
        completion = output.outputs[0]
        identical += completion.token_ids == greedy(reference, ids, MAX_NEW)
        expected = log_softmax(reference, ids)[-1]
        ours = torch.tensor([completion.logprobs[0][t].logprob for t in range(vocab)])
        assert (ours - expected).abs().max().item() < TOLERANCE
    assert identical >= MIN_IDENTICAL
