"""Our pre-quantizing command writes what transformers + bitsandbytes write."""

from __future__ import annotations

import torch
from oracle import load_reference, log_softmax
from prompts import PROMPTS
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from engine.quantize import quantize_checkpoint


def test_quantized_copy_matches_transformers_save_pretrained(checkpoints, tmp_path):
    ours = quantize_checkpoint(checkpoints("llama"), tmp_path / "ours", compute_dtype="float32")
    theirs = checkpoints("llama-nf4-dq")  # transformers' from_pretrained + save_pretrained
    ours_tensors = {k: v for f in ours.glob("*.safetensors") for k, v in load_file(f).items()}
    theirs_tensors = {k: v for f in theirs.glob("*.safetensors") for k, v in load_file(f).items()}
    assert ours_tensors.keys() == theirs_tensors.keys() - {"lm_head.weight"}
    for name, tensor in theirs_tensors.items():
        if name in ours_tensors and not name.endswith(".quant_state.bitsandbytes__nf4"):
            assert torch.equal(ours_tensors[name], tensor), name
    # transformers reads our copy back, and both it and our engine agree on it.
    reference = load_reference(ours)
    llm = LLM(model=str(ours), dtype="float32")
    assert llm.llm_engine.runner.load_report.quantization == "bitsandbytes-nf4-dq-prequantized"
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=0, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    expected = log_softmax(reference, ids)
    for j in range(1, len(ids)):
        assert abs(out.prompt_logprobs[j][ids[j]].logprob - expected[j - 1][ids[j]].item()) < 2e-3
    assert torch.equal(expected, log_softmax(load_reference(theirs), ids))
