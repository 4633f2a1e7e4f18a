"""Sampling parameters, stop conditions, logprobs and detokenization."""

from __future__ import annotations

import pytest
import torch
from oracle import load_reference, log_softmax
from prompts import PROMPTS
from transformers import AutoTokenizer

from engine import LLM, SamplingParams
from engine.detokenizer import Detokenizer
from engine.sequence import Sequence


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(model=str(checkpoints("llama")), dtype="float32", quantization="bitsandbytes")


def _texts(outputs):
    return [o.outputs[0].text for o in outputs]


def test_seed_reproducible_whatever_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = llm.generate(
        [PROMPTS[0], PROMPTS[1], PROMPTS[2]], [unseeded, params, unseeded], use_tqdm=False
    )
    assert mixed[1].outputs[0].token_ids == alone
    other = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPTS[1]], other, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_top_k_1_equals_greedy(llm):
    greedy_params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    top1 = SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True)
    expected = [
        o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy_params, use_tqdm=False)
    ]
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, top1, use_tqdm=False)] == expected


def test_n_gives_distinct_completions(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    (out,) = llm.generate([PROMPTS[3]], params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    again = llm.generate([PROMPTS[3]], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_stop_string_across_tokens_is_cut(llm):
    base = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate([PROMPTS[1]], base, use_tqdm=False)[0].outputs[0]
    text = full.text
    stop = text[5:9]  # four characters from the middle, spanning several byte-level tokens
    assert len(stop) == 4 and stop not in text[:5]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop, "\x00"])
    out = llm.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    keep = SamplingParams(
        temperature=0, max_tokens=24, ignore_eos=True, stop=stop, include_stop_str_in_output=True
    )
    out = llm.generate([PROMPTS[1]], keep, use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop) + len(stop)]


def test_stop_token_ids_eos_and_min_tokens(llm):
    base = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = llm.generate([PROMPTS[0]], base, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = tokens[3]
    first = tokens.index(stop_id)
    out = llm.generate(
        [PROMPTS[0]],
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == tokens[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens bans stop tokens until reached, so generation goes past them.
    banned = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_id], min_tokens=10)
    out = llm.generate([PROMPTS[0]], banned, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and stop_id not in out.token_ids
    assert out.finish_reason == "length"


def test_eos_ends_unless_ignored(checkpoints):
    llm = LLM(model=str(checkpoints("llama")), dtype="float32")
    free = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = llm.generate([PROMPTS[0]], free, use_tqdm=False)[0].outputs[0].token_ids
    # Declare a token this prompt is known to produce to be the model's end of sequence.
    engine = llm.llm_engine
    engine.eos_token_ids = frozenset({tokens[4]})
    params = SamplingParams(temperature=0, max_tokens=10)
    out = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[: tokens.index(tokens[4]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert llm.generate([PROMPTS[0]], free, use_tqdm=False)[0].outputs[0].token_ids == tokens


def test_logprobs_agree_with_reference(llm, checkpoints):
    reference = load_reference(checkpoints("llama"), _bnb_for(llm))
    params = SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logprobs=5, prompt_logprobs=3
    )
    (out,) = llm.generate([PROMPTS[2]], params, use_tqdm=False)
    c = out.outputs[0]
    all_ids = out.prompt_token_ids + c.token_ids
    expected = log_softmax(reference, all_ids)
    n_prompt = len(out.prompt_token_ids)
    for step, position in enumerate(c.logprobs):
        row = expected[n_prompt - 1 + step]
        token = c.token_ids[step]
        assert token in position and len(position) in (5, 6)
        assert abs(position[token].logprob - row[token].item()) < 2e-3
        top = row.topk(5)
        for rank, (value, tid) in enumerate(zip(top.values, top.indices, strict=True), 1):
            assert abs(position[int(tid)].logprob - value.item()) < 2e-3
            assert position[int(tid)].rank == rank
        assert position[token].decoded_token == llm.get_tokenizer().decode([token])
    assert c.cumulative_logprob == pytest.approx(
        sum(p[t].logprob for p, t in zip(c.logprobs, c.token_ids, strict=True))
    )
    # Prompt logprobs: None for the first token, then the actual token's log-probability.
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n_prompt
    for j in range(1, n_prompt):
        token = out.prompt_token_ids[j]
        assert abs(out.prompt_logprobs[j][token].logprob - expected[j - 1][token].item()) < 2e-3


def _bnb_for(llm):
    from checkpoints import bnb_config

    return bnb_config("nf4", True, llm.llm_engine.dtype)


def test_repetition_penalty_matches_reference(llm, checkpoints):
    reference = load_reference(checkpoints("llama"), _bnb_for(llm))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5)
    for prompt in PROMPTS[:4]:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        ids = torch.tensor([out.prompt_token_ids], device=reference.device)
        ref = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
            repetition_penalty=1.5, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist()


def test_frequency_and_presence_penalties_reduce_repeats(llm):
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    penalized = SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0
    )
    for prompt in PROMPTS[:3]:
        a = llm.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
        b = llm.generate([prompt], penalized, use_tqdm=False)[0].outputs[0].token_ids
        assert len(set(b)) >= len(set(a))
        assert len(b) - len(set(b)) < len(a) - len(set(a)) or len(set(a)) == len(a)


def test_chat_applies_template(llm):
    messages = [{"role": "user", "content": "Hello world"}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    (chat,) = llm.chat(messages, params, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert templated.endswith("<|assistant|>")
    assert chat.prompt_token_ids == tokenizer.encode(templated)
    (plain,) = llm.generate([templated], params, use_tqdm=False)
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids
    assert len(llm.chat([messages, messages], params, use_tqdm=False)) == 2


def test_incremental_detokenization_of_multibyte_text(checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(checkpoints("llama"))
    text = "Grüße aus Köln, 東京 🦊 naïve café"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 4  # several tokens per character somewhere
    detok = Detokenizer(tokenizer)
    prompt = tokenizer.encode("Hello")
    seq = Sequence(0, "r", 0, list(prompt), len(prompt), SamplingParams(), frozenset(), 0.0)
    detok.start(seq)
    for token in ids:
        seq.token_ids.append(token)
        detok.step(seq)
        assert "\ufffd" not in seq.text
        assert text.startswith(seq.text)
    assert seq.text == text


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(n=0), "n"),
        (dict(top_k=-3), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(presence_penalty=3.0), "presence_penalty"),
        (dict(frequency_penalty=-3.0), "frequency_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(logprobs=2.5), "logprobs"),
        (dict(prompt_logprobs=-2), "prompt_logprobs"),
        (dict(seed=2**64), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        SamplingParams(**kwargs)


def test_invalid_prompts_raise_and_lose_nothing(llm):
    engine = llm.llm_engine
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [5] * engine.max_model_len}], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([{"prompt_token_ids": [10**9]}], use_tqdm=False)
    # A bad prompt in a batch rejects the batch before anything runs; the engine stays usable.
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], use_tqdm=False)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert llm.generate(["fine"], SamplingParams(max_tokens=2), use_tqdm=False)[0].finished


def test_top_k_past_the_vocabulary_keeps_every_token(llm):
    """As in vLLM: a top_k larger than the vocabulary samples as if it were off (it once
    indexed past the sorted logits and failed the step)."""
    vocab = llm.llm_engine.limits.vocab_size
    seeded = dict(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    wide = llm.generate([PROMPTS[0]], SamplingParams(top_k=vocab + 1000, **seeded), use_tqdm=False)
    off = llm.generate([PROMPTS[0]], SamplingParams(**seeded), use_tqdm=False)
    assert wide[0].outputs[0].token_ids == off[0].outputs[0].token_ids


def test_logprobs_past_the_vocabulary_are_refused_before_running(llm):
    engine = llm.llm_engine
    vocab = engine.limits.vocab_size
    for name in ("logprobs", "prompt_logprobs"):
        params = SamplingParams(max_tokens=2, **{name: vocab + 1})
        with pytest.raises(ValueError, match=rf"^{name} must be <= the vocabulary size"):
            llm.generate([PROMPTS[0]], params, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    full = SamplingParams(max_tokens=2, logprobs=vocab)  # the whole vocabulary is allowed
    assert len(llm.generate([PROMPTS[0]], full, use_tqdm=False)[0].outputs[0].logprobs[0]) >= vocab


def test_a_failed_step_leaves_nothing_behind(llm, monkeypatch):
    """A step that raises (a fault injected into the real engine's second step) aborts the
    call's requests: their blocks are free and the next call runs as if nothing happened."""
    engine = llm.llm_engine
    greedy = SamplingParams(temperature=0, max_tokens=4)
    expected = llm.generate([PROMPTS[1]], greedy, use_tqdm=False)
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected step failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(PROMPTS[:3], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    monkeypatch.setattr(engine, "step", real_step)
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    again = llm.generate([PROMPTS[1]], greedy, use_tqdm=False)
    assert again[0].outputs[0].token_ids == expected[0].outputs[0].token_ids
