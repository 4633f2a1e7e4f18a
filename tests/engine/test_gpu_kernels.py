"""The Triton kernels and CUDA graphs end to end: the same greedy tokens as the bitsandbytes /
PyTorch path of the engine, and graph replay equal to eager kernel steps.

Skipped where no GPU is present (CI); results from the GPU host are committed under
benchmarks/results/."""

from __future__ import annotations

import pytest
import torch
from prompts import PROMPTS

from engine import LLM, SamplingParams
from engine.kernels import kernels_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and kernels_available()), reason="needs a CUDA GPU"
    ),
]
MAX_NEW = 12


def run(llm: LLM, prompts=PROMPTS, logprobs: int | None = 5):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=logprobs)
    return llm.generate(prompts, params, use_tqdm=False)


def in_flight_bf16(path: str, **engine_args) -> LLM:
    """The test checkpoint quantized in flight, served in bf16 on a small cache."""
    return LLM(
        model=path, quantization="bitsandbytes", dtype="bfloat16", kv_cache_memory_bytes=1 << 28,
        **engine_args,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["inflight", "prequant"])
def test_kernels_and_graphs_match_bitsandbytes_path(checkpoints, mode):
    if mode == "prequant":
        kwargs = dict(model=str(checkpoints("llama-nf4-dq")))
    else:
        kwargs = dict(model=str(checkpoints("llama")), quantization="bitsandbytes")
    fast = LLM(**kwargs, dtype="bfloat16", kv_cache_memory_bytes=1 << 28)
    runner = fast.llm_engine.runner
    assert runner.use_kernels and runner.graphs is not None
    fast_out = run(fast)
    del fast
    reference = LLM(
        **kwargs, dtype="bfloat16", kernels="native", enforce_eager=True,
        kv_cache_memory_bytes=1 << 28,
    )  # fmt: skip
    ref_out = run(reference)
    identical = 0
    for ours, ref in zip(fast_out, ref_out, strict=True):
        a, b = ours.outputs[0], ref.outputs[0]
        identical += a.token_ids == b.token_ids
        # The first token's logprob: bf16 kernels round differently, not by much.
        assert (
            abs(a.logprobs[0][a.token_ids[0]].logprob - b.logprobs[0][a.token_ids[0]].logprob)
            < 0.05
        )
    assert identical >= len(PROMPTS) - 1, f"{identical}/{len(PROMPTS)} identical"


def test_graph_replay_equals_eager_kernels(checkpoints):
    """Same kernels, with and without CUDA graphs, on a batch that shrinks as requests finish
    (5 sequences, a padded bucket of 8): the tokens and logprobs are bit-identical."""
    path = str(checkpoints("llama"))
    prompts = PROMPTS[:5]
    lengths = [3, 12, 7, 12, 1]
    outs = {}
    for eager in (False, True):
        llm = in_flight_bf16(path, enforce_eager=eager)
        params = [
            SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3)
            for n in lengths
        ]
        outs[eager] = llm.generate(prompts, params, use_tqdm=False)
        assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.runner.num_blocks
        del llm
    for graph, eager in zip(outs[False], outs[True], strict=True):
        assert graph.outputs[0].token_ids == eager.outputs[0].token_ids
        for a, b in zip(graph.outputs[0].logprobs, eager.outputs[0].logprobs, strict=True):
            assert {t: round(v.logprob, 4) for t, v in a.items()} == {
                t: round(v.logprob, 4) for t, v in b.items()
            }


def test_one_sequence_graphs_follow_the_split_count_of_its_context(checkpoints):
    """One sequence decoding from 20 to 300 tokens of context: the attention kernel splits the
    context in 2, then 4, then 8 (the test model's 2 KV heads leave the GPU room for 8), each
    step replaying the graph captured for its count; eager steps choose the same counts, so
    tokens and logprobs are bit-identical."""
    path = str(checkpoints("llama"))
    prompt = [{"prompt_token_ids": list(range(3, 23))}]
    params = SamplingParams(temperature=0, max_tokens=280, ignore_eos=True, logprobs=3)
    outs = {}
    for eager in (False, True):
        llm = in_flight_bf16(path, enforce_eager=eager)
        if not eager:
            assert {(1, 2), (1, 4), (1, 8)} <= set(llm.llm_engine.runner.graphs.graphs)
        outs[eager] = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.runner.num_blocks
        del llm
    assert outs[False].token_ids == outs[True].token_ids
    for a, b in zip(outs[False].logprobs, outs[True].logprobs, strict=True):
        assert {t: round(v.logprob, 4) for t, v in a.items()} == {
            t: round(v.logprob, 4) for t, v in b.items()
        }


def test_one_sequence_prefill_replays_its_graph(checkpoints):
    """Prompts generated one at a time prefill through the prefill graphs (padded to a token
    bucket): the greedy tokens of eager steps, first-token logprobs within bf16 rounding (the
    padded step's matmuls run the next bucket's kernels)."""
    path = str(checkpoints("llama"))
    outs = {}
    for eager in (False, True):
        llm = in_flight_bf16(path, enforce_eager=eager)
        graphs = llm.llm_engine.runner.prefill_graphs
        assert (graphs is None) == eager
        outs[eager] = [run(llm, [prompt])[0] for prompt in PROMPTS]
        if graphs is not None:  # a one-token prompt is a decode step (its graph)
            prefills = sum(len(out.prompt_token_ids) > 1 for out in outs[eager])
            assert prefills >= len(PROMPTS) - 1 and graphs.replays == prefills
        assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.runner.num_blocks
        del llm
    identical = 0
    for graph, eager in zip(outs[False], outs[True], strict=True):
        a, b = graph.outputs[0], eager.outputs[0]
        identical += a.token_ids == b.token_ids
        first = a.token_ids[0]
        assert abs(a.logprobs[0][first].logprob - b.logprobs[0][first].logprob) < 0.05
    assert identical >= len(PROMPTS) - 1, f"{identical}/{len(PROMPTS)} identical"
