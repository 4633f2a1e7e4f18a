"""OpenAI completions and chat completions over one model's `generate`: request validation,
tokenization, choices, logprobs, usage, and server-sent-event streaming."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import jinja2
from pydantic import ValidationError

from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    SamplingRequest,
    TokenizeRequest,
    bad_request,
)
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.validation import RequestLimits, validate_request

DONE = "data: [DONE]\n\n"


def parse(model_cls, body: dict):
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param) from None


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class ChoiceState:
    """What one choice has already streamed."""

    text_sent: int = 0
    logprobs_sent: int = 0
    role_sent: bool = False
    finished: bool = False


@dataclass
class Job:
    """One prompt's engine request and where its choices go in the response."""

    prompt_text: str | None
    prompt_ids: list[int]
    params: SamplingParams
    first_index: int
    final: RequestOutput | None = None
    states: list[ChoiceState] = field(default_factory=list)


class OpenAIServing:
    def __init__(
        self, model_name: str, tokenizer, limits: RequestLimits, generate: Callable
    ) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.limits = limits
        self.generate = generate

    async def run(self, handler, body: dict) -> AsyncIterator[object]:
        """Yields a head first ({"status": 200, "stream": bool} or {"status": 4xx, "error": ...}),
        then either SSE strings or one response dict."""
        try:
            request, jobs = handler(body)
        except OpenAIError as e:
            yield e.result()
            return
        yield {"status": 200, "stream": request.stream}
        chat = isinstance(request, ChatCompletionRequest)
        try:
            if request.stream:
                async for chunk in self._stream(request, jobs, chat):
                    yield chunk
            else:
                yield await self._complete(request, jobs, chat)
        except OpenAIError as e:  # after the head: the error travels in the body
            if request.stream:  # an error event, then the end of the stream, as vLLM ends it
                yield sse(e.body())
                yield DONE
            else:
                yield e.result()

    # Requests to jobs.

    def _check_length(self, ids: list[int], max_tokens: int | None, param: str) -> None:
        if max_tokens is not None and len(ids) + max_tokens > self.limits.max_model_len:
            raise bad_request(
                f"this model's maximum context length is {self.limits.max_model_len} tokens; "
                f"the prompt has {len(ids)} and {param} asks for {max_tokens} more",
                param,
            )

    def completions(self, body: dict) -> tuple[CompletionRequest, list[Job]]:
        request = parse(CompletionRequest, body)
        if request.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if request.best_of not in (None, request.n):
            raise bad_request("best_of must equal n", "best_of")
        echo_logprobs = request.logprobs if request.echo else None
        params = request.sampling_params(request.max_tokens, request.logprobs, echo_logprobs)
        jobs = []
        for i, prompt in enumerate(request.prompts()):
            if isinstance(prompt, str):
                text, ids = prompt, self.tokenizer.encode(prompt)
            else:  # ids checked before the tokenizer sees them (it fails on negative ones)
                text, ids = None, list(prompt)
            self._check_length(ids, request.max_tokens, "max_tokens")
            self._validate(ids, params)
            text = self.tokenizer.decode(ids) if text is None else text
            jobs.append(Job(text, ids, params, i * request.n))
        return request, jobs

    def chat_completions(self, body: dict) -> tuple[ChatCompletionRequest, list[Job]]:
        request = parse(ChatCompletionRequest, body)
        given = request.max_completion_tokens is not None  # 0 is an error, not "unset"
        max_tokens = request.max_completion_tokens if given else request.max_tokens
        param = "max_completion_tokens" if given else "max_tokens"
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"{param} must be an integer >= 1, got {max_tokens}", param)
        params = request.sampling_params(max_tokens, request.requested_logprobs())
        ids = self._apply_chat_template(request.conversation(), request.add_generation_prompt)
        self._check_length(ids, max_tokens, param)
        self._validate(ids, params)
        return request, [Job(None, ids, params, 0)]

    def _apply_chat_template(self, conversation, add_generation_prompt: bool) -> list[int]:
        if not self.tokenizer.chat_template:
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        try:
            ids = self.tokenizer.apply_chat_template(
                conversation,
                tokenize=True,
                add_generation_prompt=add_generation_prompt,
                return_dict=False,
            )
        except jinja2.TemplateError as e:  # templates raise to refuse a conversation
            message = f"the chat template refused these messages: {e}"
            raise bad_request(message, "messages") from None
        return list(ids)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        try:
            validate_request(ids, params, self.limits)
        except ValueError as e:
            raise bad_request(str(e), "prompt") from None

    # Running jobs.

    async def _outputs(self, jobs: list[Job]) -> AsyncIterator[tuple[Job, RequestOutput]]:
        """Outputs of all jobs, interleaved as they arrive."""
        if len(jobs) == 1:
            async for output in self.generate(
                jobs[0].prompt_text, jobs[0].prompt_ids, jobs[0].params
            ):
                yield jobs[0], output
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def drain(job: Job) -> None:
            try:
                async for output in self.generate(job.prompt_text, job.prompt_ids, job.params):
                    await queue.put((job, output))
            except Exception as e:  # noqa: BLE001 - handed to the consumer
                await queue.put(e)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(drain(job)) for job in jobs]
        try:
            remaining = len(jobs)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def _complete(self, request: SamplingRequest, jobs: list[Job], chat: bool) -> dict:
        async for job, output in self._outputs(jobs):
            job.final = output
        choices = []
        for job in jobs:
            for c in job.final.outputs:
                choices.append(self._choice(request, job, c, chat))
        return {
            "id": _id(chat), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": choices,
            "usage": self._usage(jobs),
        }  # fmt: skip

    def _choice(self, request, job: Job, c: CompletionOutput, chat: bool) -> dict:
        index = job.first_index + c.index
        if chat:
            logprobs = None
            if c.logprobs is not None:
                k = job.params.logprobs
                logprobs = {"content": self._chat_logprobs(c.logprobs, c.token_ids, k)}
            message = {"role": "assistant", "content": c.text}
            return {
                "index": index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": c.finish_reason,
            }
        text = c.text
        logprobs = None
        if c.logprobs is not None:
            positions = list(c.logprobs)
            tokens = list(c.token_ids)
            if request.echo:
                positions = (job.final.prompt_logprobs or []) + positions
                tokens = job.prompt_ids + tokens
            logprobs = self._completion_logprobs(positions, tokens, 0, job.params.logprobs)
        if request.echo:
            text = (job.prompt_text or "") + text
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
        }

    def _usage(self, jobs: list[Job]) -> dict:
        prompt = sum(len(j.prompt_ids) for j in jobs)
        completion = sum(len(c.token_ids) for j in jobs if j.final for c in j.final.outputs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def _stream(
        self, request: SamplingRequest, jobs: list[Job], chat: bool
    ) -> AsyncIterator[str]:
        stream_id, created = _id(chat), int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            payload = {
                "id": stream_id,
                "object": kind,
                "created": created,
                "model": self.model_name,
                "choices": choices,
            }
            if usage is not None or request.include_usage:
                payload["usage"] = usage
            return sse(payload)

        holdback = max((len(s) for s in jobs[0].params.stop_strings), default=1) - 1
        echo = not chat and request.echo
        for job in jobs:
            job.states = [ChoiceState() for _ in range(job.params.n)]
        async for job, output in self._outputs(jobs):
            if echo and job.final is None:  # the prompt first, with its logprobs (known now)
                for i in range(job.params.n):
                    yield chunk([self._echoed_prompt(job, output, job.first_index + i)])
            job.final = output
            for c in output.outputs:
                state = job.states[c.index]
                if state.finished:
                    continue
                done = c.finish_reason is not None
                end = len(c.text) if done else max(state.text_sent, len(c.text) - holdback)
                delta = c.text[state.text_sent : end]
                new_logprobs = (c.logprobs or [])[state.logprobs_sent :] if done or delta else []
                if not (delta or done or (chat and not state.role_sent)):
                    continue
                choice = {"index": job.first_index + c.index, "finish_reason": c.finish_reason}
                if chat:
                    choice["delta"] = {"content": delta}
                    if not state.role_sent:
                        choice["delta"]["role"] = "assistant"
                        state.role_sent = True
                    if c.logprobs is not None:
                        start = state.logprobs_sent
                        tokens = c.token_ids[start : start + len(new_logprobs)]
                        content = self._chat_logprobs(new_logprobs, tokens, job.params.logprobs)
                        choice["logprobs"] = {"content": content}
                else:
                    choice["text"] = delta
                    choice["logprobs"] = None
                    if c.logprobs is not None:
                        start = state.logprobs_sent
                        tokens = c.token_ids[start : start + len(new_logprobs)]
                        # Offsets run on from the echoed prompt, as in the whole response.
                        offset = state.text_sent + (len(job.prompt_text or "") if echo else 0)
                        choice["logprobs"] = self._completion_logprobs(
                            new_logprobs, tokens, offset, job.params.logprobs
                        )
                state.text_sent = end
                state.logprobs_sent += len(new_logprobs)
                state.finished = done
                yield chunk([choice])
        if request.include_usage:
            yield chunk([], self._usage(jobs))
        yield DONE

    def _echoed_prompt(self, job: Job, first: RequestOutput, index: int) -> dict:
        """A streamed completion's first chunk under `echo`: the prompt, with its logprobs when
        logprobs were asked for (the whole response's prompt part)."""
        logprobs = None
        if job.params.logprobs is not None:
            positions = first.prompt_logprobs or [None] * len(job.prompt_ids)
            logprobs = self._completion_logprobs(positions, job.prompt_ids, 0, job.params.logprobs)
        return {
            "index": index, "text": job.prompt_text or "", "logprobs": logprobs,
            "finish_reason": None,
        }  # fmt: skip

    # Logprobs in OpenAI's two shapes. Each position holds the top-k tokens (ranks 1..k) and
    # the chosen token (whatever its rank).

    def _completion_logprobs(self, positions, tokens: list[int], offset: int, k: int) -> dict:
        result = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, position in zip(tokens, positions, strict=False):
            # The engine decoded each generated token already; the first prompt token has no
            # logprob entry, so it is decoded here.
            text = position[token].decoded_token if position else self.tokenizer.decode([token])
            result["tokens"].append(text)
            result["text_offset"].append(offset)
            offset += len(text)
            if position is None:  # the first prompt token has no logprob
                result["token_logprobs"].append(None)
                result["top_logprobs"].append(None)
                continue
            result["token_logprobs"].append(position[token].logprob)
            result["top_logprobs"].append(
                {lp.decoded_token: lp.logprob for lp in _top(position, k)}
            )
        return result

    def _chat_logprobs(self, positions, tokens: list[int], k: int) -> list[dict]:
        def entry(lp) -> dict:
            text = lp.decoded_token or ""
            return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}

        return [
            entry(position[token]) | {"top_logprobs": [entry(lp) for lp in _top(position, k)]}
            for token, position in zip(tokens, positions, strict=False)
        ]

    # Tokenizer endpoints.

    def tokenize(self, body: dict) -> dict:
        request = parse(TokenizeRequest, body)
        if (request.prompt is None) == (request.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if request.messages is not None:
            conversation = [{"role": m.role, "content": m.text()} for m in request.messages]
            ids = self._apply_chat_template(conversation, request.add_generation_prompt)
        else:
            ids = self.tokenizer.encode(
                request.prompt, add_special_tokens=request.add_special_tokens
            )
        return {"tokens": ids, "count": len(ids), "max_model_len": self.limits.max_model_len}

    def detokenize(self, body: dict) -> dict:
        request = parse(DetokenizeRequest, body)
        if any(not 0 <= t < self.limits.vocab_size for t in request.tokens):
            raise bad_request(f"tokens must be in [0, {self.limits.vocab_size})", "tokens")
        return {"prompt": self.tokenizer.decode(request.tokens)}


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def _top(position, k: int) -> list:
    return sorted((lp for lp in position.values() if lp.rank <= k), key=lambda lp: lp.rank)
