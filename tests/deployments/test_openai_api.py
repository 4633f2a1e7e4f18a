"""The OpenAI API of the real Serve app, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from ray import serve
from serve_configs import config_args

from engine import LLM, SamplingParams

MODEL, TP_MODEL = "nibble-demo", "nibble-demo-tp2"
PROMPT = "The Python interpreter"


def _offline(model: str) -> LLM:
    """A served model's configuration, run through the offline API (one rank, in-process)."""
    models = config_args("cpu-two-models.yaml")["models"]
    args = next(m for m in models if m["served_model_name"] == model)
    return LLM(
        model=args["model"], quantization="bitsandbytes", dtype=args["dtype"],
        max_model_len=args["max_model_len"],
    )  # fmt: skip


def test_models_list(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {MODEL, TP_MODEL}
    assert models[MODEL].max_model_len == 1024


@pytest.mark.parametrize("model", [MODEL, TP_MODEL])
def test_greedy_text_matches_offline(client, model):
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = _offline(model).generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert r.usage.completion_tokens == len(expected.token_ids)


def test_completion_streamed_with_usage_equals_plain(client):
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_plain_and_streamed(client):
    messages = [{"role": "user", "content": "What is a list?"}]
    plain = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=16, temperature=0
    )
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens == 16 or plain.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_n_seed_and_stop(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, n=2, seed=5, temperature=1.0
    )
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].text != r.choices[1].text
    again = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=12, n=2, seed=5, temperature=1.0
    )
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    full = (
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0)
        .choices[0]
        .text
    )
    stop = full[6:9]
    cut = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop]
    )
    assert (
        cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    )


def test_logprobs_and_echo(client):
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 5 and all(len(top) == 3 for top in lp.top_logprobs)
    assert all(t <= 0 for t in lp.token_logprobs)
    assert all(
        max(top.values()) == pytest.approx(t)
        for top, t in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    echo = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=1
    )
    assert echo.choices[0].text == PROMPT + r.choices[0].text
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    # Streamed, the same text and logprobs: the prompt's first, offsets running on past it.
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True, logprobs=1,
            stream=True,
        )
    )  # fmt: skip
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in chunks:
        for name in streamed:
            streamed[name] += getattr(c.choices[0].logprobs, name) if c.choices[0].logprobs else []
    assert "".join(c.choices[0].text for c in chunks) == echo.choices[0].text
    whole = echo.choices[0].logprobs
    assert streamed["tokens"] == whole.tokens and streamed["text_offset"] == whole.text_offset
    assert streamed["token_logprobs"][1:] == pytest.approx(whole.token_logprobs[1:])
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)


def test_prompt_forms(client, base_url):
    body = {"model": MODEL, "prompt": PROMPT}
    tokens = httpx.post(f"{base_url}/tokenize", json=body).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=tokens, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    batch = client.completions.create(
        model=MODEL, prompt=[PROMPT, "A module"], max_tokens=6, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == by_text.choices[
        0
    ].text


def test_tokenize_detokenize_health_version(base_url):
    with httpx.Client(base_url=base_url) as http:
        tokens = http.post("/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
        text = http.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
        assert text["prompt"] == PROMPT
        assert http.get("/health").status_code == 200
        assert http.get("/version").json()["version"]


def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_errors_have_openai_shape(client, base_url):
    e = _error(lambda: client.completions.create(model="nope", prompt="x"))
    assert e.status_code == 404 and e.body["param"] == "model" and "nope" in e.body["message"]
    e = _error(lambda: client.completions.create(model=MODEL, prompt="x", temperature=-1))
    assert e.status_code == 400 and e.body["param"] == "temperature"
    e = _error(lambda: client.completions.create(model=MODEL, prompt="x", max_tokens=5000))
    assert e.status_code == 400 and "maximum context length" in e.body["message"]
    e = _error(lambda: client.completions.create(model=MODEL, prompt="x", top_p=2))
    assert e.status_code == 400 and e.body["param"] == "top_p"
    e = _error(lambda: client.completions.create(model=MODEL, prompt="", max_tokens=2))
    assert e.status_code == 400 and e.body["type"] == "invalid_request_error"
    e = _error(lambda: client.chat.completions.create(model=MODEL, messages=[], max_tokens=2))
    assert e.status_code == 400
    e = _error(lambda: client.completions.create(model=MODEL, prompt="x", logprobs=50))
    assert e.status_code == 400 and e.body["param"] == "logprobs"
    with httpx.Client(base_url=base_url) as http:
        r = http.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": [10**9]})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # Nothing above left work behind.
    assert _stats(MODEL)["num_unfinished_requests"] == 0


def test_more_bad_requests_are_openai_4xx_and_lose_nothing(client, base_url):
    """Requests that once gave a 500, a silent default, or a crashed worker group."""
    # top_k past the vocabulary (4096) keeps every token, as in vLLM; it once failed the step
    # and took the model's workers down for every client.
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0.7, extra_body={"top_k": 5000}
    )
    assert out.choices[0].finish_reason == "length"
    with httpx.Client(base_url=base_url) as http:
        assert http.get("/health").status_code == 200
        # Token ids are range-checked before the tokenizer (which fails on negative ones).
        for prompt in ([-1, 5], [[5, 6], [-3]]):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        # /tokenize and /detokenize errors keep their status through the replica.
        for path, body in [
            ("/tokenize", {"model": MODEL}),
            ("/tokenize", {"model": MODEL, "prompt": "x", "extra": 1}),
            ("/detokenize", {"model": MODEL, "tokens": [-1]}),
            ("/detokenize", {"model": MODEL, "tokens": [99999]}),
        ]:
            r = http.post(path, json=body)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
        assert http.get("/v1/models/nope").json()["error"]["param"] == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    e = _error(lambda: client.models.retrieve("nope"))
    assert e.status_code == 404
    chat = [{"role": "user", "content": "hi"}]
    e = _error(
        lambda: client.chat.completions.create(model=MODEL, messages=chat, max_completion_tokens=0)
    )
    assert e.status_code == 400 and e.body["param"] == "max_completion_tokens"
    e = _error(
        lambda: client.chat.completions.create(
            model=MODEL, messages=chat, logprobs=True, top_logprobs=25
        )
    )
    assert e.status_code == 400 and e.body["param"] == "top_logprobs"
    # No tool calling: every way of asking for it is refused, not silently dropped.
    tool_turns = [
        {"role": "user", "content": "add 2 and 3"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"},
        }]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]  # fmt: skip
    for kwargs, param in [
        (dict(tool_choice="required"), "tool_choice"),
        (dict(extra_body={"functions": [{"name": "add"}]}), "functions"),
        (dict(extra_body={"function_call": "auto"}), "function_call"),
        (dict(messages=tool_turns), "messages"),
    ]:
        kwargs = {"messages": chat, **kwargs}
        e = _error(lambda kw=kwargs: client.chat.completions.create(model=MODEL, **kw))
        assert e.status_code == 400 and e.body["param"] == param, (param, e.body)
    # Checked before the response starts, streamed or not.
    for stream in (False, True):
        e = _error(
            lambda s=stream: client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=2, seed=2**64, stream=s
            )
        )
        assert e.status_code == 400 and e.body["param"] == "seed"
    e = _error(
        lambda: client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2, stream_options={"include_usage": True}
        )
    )
    assert e.status_code == 400 and e.body["param"] == "stream_options"
    assert _stats(MODEL)["num_unfinished_requests"] == 0


def test_a_chat_template_that_refuses_messages_is_a_400():
    """Templates raise to refuse a conversation (roles that do not alternate, say): the client
    gets a 400 naming the messages, not a 500."""
    from deployments.openai_serving import OpenAIServing
    from deployments.protocol import OpenAIError
    from engine.model_files import load_tokenizer
    from engine.validation import RequestLimits

    tokenizer = load_tokenizer("benchmarks/demo_model/model")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    limits = RequestLimits(len(tokenizer), 1024, 4096, 16, 2048, True)
    serving = OpenAIServing(MODEL, tokenizer, limits, generate=None)
    body = {"model": MODEL, "messages": [{"role": "system", "content": "s"}, {"role": "user",
            "content": "u"}]}  # fmt: skip
    with pytest.raises(OpenAIError) as info:
        serving.chat_completions(body)
    assert info.value.status == 400 and info.value.param == "messages"
    assert "must alternate" in info.value.message
    body["messages"] = body["messages"][1:]
    _, jobs = serving.chat_completions(body)  # an alternating conversation goes through
    assert tokenizer.decode(jobs[0].prompt_ids) == "u"


def _stats(model: str, app: str = "nibble") -> dict:
    return serve.get_deployment_handle(f"model:{model}", app_name=app).stats.remote().result()


def test_disconnect_mid_stream_frees_blocks(base_url):
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 900,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(base_url=base_url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept open (a closed iterator would close the response)
            events = [line for line in (next(lines) for _ in range(6)) if line]
            assert events and all(e.startswith("data: {") for e in events)
            stats = _stats(MODEL)
            assert stats["num_unfinished_requests"] == 1
            assert stats["num_free_blocks"] < stats["num_blocks"]
        # Leaving the block closes the connection mid-stream.
    for _ in range(100):
        stats = _stats(MODEL)
        if stats["num_unfinished_requests"] == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert stats["num_unfinished_requests"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_api_keys_body_limit_and_backpressure(secure_url):
    secured = openai.OpenAI(base_url=f"{secure_url}/v1", api_key="sk-test-key", max_retries=0)
    assert (
        secured.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text
        is not None
    )
    wrong = openai.OpenAI(base_url=f"{secure_url}/v1", api_key="sk-wrong", max_retries=0)
    e = _error(lambda: wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2))
    assert e.status_code == 401 and e.body["type"] == "authentication_error"
    e = _error(lambda: secured.completions.create(model=MODEL, prompt="word " * 2000, max_tokens=2))
    assert e.status_code == 413
    with httpx.Client(base_url=secure_url) as http:
        assert http.get("/health").status_code == 200  # health needs no key

    async def one() -> httpx.Response:
        async with httpx.AsyncClient(base_url=secure_url, timeout=60) as http:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
            return await http.post(
                "/v1/completions", json=body, headers={"Authorization": "Bearer sk-test-key"}
            )

    async def many() -> list[httpx.Response]:
        return await asyncio.gather(*[one() for _ in range(6)])

    responses = asyncio.run(many())
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    rejected = next(r for r in responses if r.status_code == 503)
    assert (
        rejected.headers["retry-after"] and rejected.json()["error"]["type"] == "server_overloaded"
    )
    assert (
        json.loads(next(r for r in responses if r.status_code == 200).text)["usage"][
            "completion_tokens"
        ]
        == 200
    )


def test_health_answers_while_every_request_slot_is_taken(secure_url):
    """/secure serves one request at a time (max_ongoing_requests=1): with it taken by a long
    stream, /health answers within seconds, 200 with the model `busy`, not after the stream."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 600, "ignore_eos": True, "stream": True}
    headers = {"Authorization": "Bearer sk-test-key"}
    with httpx.Client(base_url=secure_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line).startswith("data: {")  # it is running
            start = time.monotonic()
            health = http.get("/health")
            elapsed = time.monotonic() - start
            assert health.status_code == 200 and health.json()["busy"] == [MODEL], health.text
            assert elapsed < 6, elapsed
    with httpx.Client(base_url=secure_url, timeout=60) as http:  # the slot is free again
        assert _until_ok(lambda: http.get("/health").json() == {"status": "ok"})


def _until_ok(check, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False
