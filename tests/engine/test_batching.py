"""Continuous batching, chunked prefill, preemption and abort produce the tokens of a solo run."""

from __future__ import annotations

import pytest
from prompts import PROMPTS

from engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _llm(checkpoints, **engine_args) -> LLM:
    return LLM(
        model=str(checkpoints("llama")), dtype="float32", quantization="bitsandbytes", **engine_args
    )


def _solo(llm: LLM, prompt: str, params=GREEDY) -> list[int]:
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids


def _run_all(engine) -> dict[str, list[int]]:
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return tokens


@pytest.fixture(scope="module")
def solo_tokens(checkpoints):
    llm = _llm(checkpoints)
    return {p: _solo(llm, p) for p in PROMPTS}


def test_request_joining_a_running_batch_gets_solo_tokens(checkpoints, solo_tokens):
    engine = _llm(checkpoints).llm_engine
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    for _ in range(5):  # a and b are decoding when c arrives
        engine.step()
    assert all(s.num_output_tokens > 0 for s in engine.scheduler.running)
    engine.add_request("c", PROMPTS[2], GREEDY)
    tokens = _run_all(engine)
    assert tokens == {
        "a": solo_tokens[PROMPTS[0]],
        "b": solo_tokens[PROMPTS[1]],
        "c": solo_tokens[PROMPTS[2]],
    }


def test_chunked_prefill_matches(checkpoints, solo_tokens):
    # 43-token prompt split into chunks of at most 8 tokens, mixed with decodes.
    llm = _llm(checkpoints, max_num_batched_tokens=8, max_num_seqs=4)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [solo_tokens[p] for p in PROMPTS]


def test_preemption_when_kv_cache_is_short(checkpoints, solo_tokens):
    # 12 blocks of 16 tokens: the eight requests need far more together, so some are preempted
    # (recomputed later) rather than failing.
    llm = _llm(checkpoints, num_gpu_blocks_override=12)
    outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    engine = llm.llm_engine
    assert engine.scheduler.num_preemptions_total > 0
    assert [o.outputs[0].token_ids for o in outputs] == [solo_tokens[p] for p in PROMPTS]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preempted_sequence_longer_than_a_step_is_recomputed_in_chunks(checkpoints):
    """Chunked prefill off, 32 tokens a step, 4 blocks of 16: b (a 30-token prompt) is preempted
    once it holds more than 32 tokens, and recomputing its prompt and output fits no step whole.
    It is recomputed in chunks (a waiting prompt is never split) and both get their solo
    tokens."""
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = {"a": list(range(10, 30)), "b": list(range(40, 70))}
    solo = _llm(checkpoints)
    expected = {
        name: solo.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        .outputs[0]
        .token_ids
        for name, ids in prompts.items()
    }
    llm = _llm(
        checkpoints, num_gpu_blocks_override=4, enable_chunked_prefill=False,
        max_num_batched_tokens=32, max_num_seqs=4,
    )  # fmt: skip
    engine = llm.llm_engine
    for name, ids in prompts.items():
        engine.add_request(name, None, params, prompt_token_ids=ids)
    for _ in range(500):  # bounded: before the fix, b was never scheduled again
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                assert out.outputs[0].token_ids == expected[out.request_id], out.request_id
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_num_seqs_bounds_the_batch(checkpoints, solo_tokens):
    llm = _llm(checkpoints, max_num_seqs=2)
    engine = llm.llm_engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, GREEDY)
    engine.step()
    assert len(engine.scheduler.running) == 2
    tokens = _run_all(engine)
    assert [tokens[str(i)] for i in range(len(PROMPTS))] == [solo_tokens[p] for p in PROMPTS]


def test_abort_frees_blocks_at_once(checkpoints):
    engine = _llm(checkpoints).llm_engine
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    engine.add_request("long", PROMPTS[2], params)
    engine.add_request("other", PROMPTS[0], params)
    for _ in range(3):
        engine.step()
    used = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    assert used > 0
    final = engine.abort_request("long")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert len(final.outputs[0].token_ids) == 3
    assert engine.block_manager.num_blocks - engine.block_manager.num_free_blocks < used
    assert [s.request_id for s in engine.scheduler.running] == ["other"]
    engine.abort_request("other")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()
    assert engine.abort_request("unknown") is None


def test_offline_step_budget_is_larger_than_the_servers(checkpoints):
    """LLM takes up to 8192 tokens a step unless told otherwise; the engine config the server
    builds keeps 2048. An explicit budget wins."""
    from engine.config import EngineConfig

    assert _llm(checkpoints).llm_engine.scheduler.max_num_batched_tokens == 8192
    llm = _llm(checkpoints, max_num_batched_tokens=512)
    assert llm.llm_engine.scheduler.max_num_batched_tokens == 512
    assert EngineConfig(model=str(checkpoints("llama"))).batched_tokens_limit == 2048
