"""Decode steps launched ahead of the host (async_scheduling) give exactly the outputs of one
step at a time, drop the tokens of sequences that ended meanwhile, and leak no cache blocks."""

from __future__ import annotations

import pytest
from prompts import PROMPTS

from engine import LLM, SamplingParams

# Lengths, stops, logprobs and seeded sampling, mixed in one batch: sequences end at different
# steps while the next step is already queued for them.
MIXED = [
    SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
    SamplingParams(temperature=0, max_tokens=17, logprobs=2),
    SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=7, n=2),
    SamplingParams(temperature=0, max_tokens=24, stop=["e"]),
    SamplingParams(temperature=0.7, top_k=20, min_p=0.05, max_tokens=12, seed=3),
]
# Penalties and min_tokens, which count the token in flight on the device.
PENALIZED = [
    SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3),
    SamplingParams(temperature=0, max_tokens=9, frequency_penalty=0.5, min_tokens=4),
    SamplingParams(temperature=0.8, seed=5, max_tokens=10, presence_penalty=0.7,
                   repetition_penalty=1.1),
]  # fmt: skip


def _llm(checkpoints, async_scheduling: bool, **engine_args) -> LLM:
    return LLM(
        model=str(checkpoints("llama")), dtype="float32", quantization="bitsandbytes",
        async_scheduling=async_scheduling, **engine_args,
    )  # fmt: skip


def _summary(outputs) -> list:
    return [
        [
            (
                o.token_ids,
                o.text,
                o.finish_reason,
                o.stop_reason,
                None
                if o.logprobs is None
                else [{t: round(lp.logprob, 4) for t, lp in pos.items()} for pos in o.logprobs],
            )
            for o in out.outputs
        ]  # fmt: skip
        for out in outputs
    ]


def _count_followups(engine) -> list[int]:
    """Counts the steps queued ahead, and those queued while requests waited (a spy on the real
    runner method)."""
    calls = [0, 0]
    launch_followup = engine.runner.launch_followup

    def counted(*args, **kwargs):
        calls[0] += 1
        calls[1] += bool(engine.scheduler.waiting)
        return launch_followup(*args, **kwargs)

    engine.runner.launch_followup = counted
    return calls


@pytest.mark.parametrize("params", [MIXED, PENALIZED])
def test_launched_ahead_matches_step_by_step(checkpoints, params):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    expected = _llm(checkpoints, False).generate(prompts, params, use_tqdm=False)
    llm = _llm(checkpoints, True)
    engine = llm.llm_engine
    followups = _count_followups(engine)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert _summary(outputs) == _summary(expected)
    assert followups[0] > 0
    assert engine._launched is None  # nothing left queued once every request is done
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_while_a_step_is_launched_ahead(checkpoints):
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    solo = _llm(checkpoints, False).generate(PROMPTS[:3], greedy, use_tqdm=False)
    engine = _llm(checkpoints, True).llm_engine
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(str(i), prompt, greedy)
    while engine._launched is None:
        engine.step()
    aborted = engine.abort_request("1")
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id != "1"
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    assert tokens == {"0": solo[0].outputs[0].token_ids, "2": solo[2].outputs[0].token_ids}
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_new_request_is_admitted_at_the_next_step(checkpoints):
    """A request arriving while steps run ahead is scheduled at once, not after the batch."""
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    engine = _llm(checkpoints, True).llm_engine
    engine.add_request("a", PROMPTS[0], greedy)
    while engine._launched is None:
        engine.step()
    engine.add_request("b", PROMPTS[1], greedy)
    engine.step()  # reads back the queued step; queues nothing behind it
    assert engine._launched is None
    engine.step()
    b = engine.requests["b"].seqs[0]
    assert b.num_computed_tokens > 0


def test_aborting_the_last_request_drops_the_queued_step(checkpoints):
    engine = _llm(checkpoints, True).llm_engine
    engine.add_request("a", PROMPTS[0], SamplingParams(temperature=0, max_tokens=24))
    while engine._launched is None:
        engine.step()
    engine.abort_request("a")
    assert engine._launched is None and not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_context_limit_and_a_full_batch(checkpoints):
    """Sequences that run into max_model_len, and requests waiting for a batch slot while the
    full batch runs ahead (they cannot be admitted earlier anyway)."""
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    args = dict(max_model_len=56, max_num_seqs=2)
    expected = _llm(checkpoints, False, **args).generate(PROMPTS[:3], params, use_tqdm=False)
    llm = _llm(checkpoints, True, **args)
    followups = _count_followups(llm.llm_engine)
    outputs = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert _summary(outputs) == _summary(expected)
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert followups[1] > 0  # queued ahead while the third request waited for a slot
