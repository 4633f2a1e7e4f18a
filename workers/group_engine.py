"""The engine interface of LLMEngine (add_request, step, abort_request, ...) over a worker group,
for drivers in another process: the offline LLM with tensor_parallel_size > 1, and Serve."""

from __future__ import annotations

from collections.abc import Iterable

from engine.config import EngineConfig
from engine.llm_engine import NewRequest
from engine.model_files import load_tokenizer
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.validation import validate_request
from workers.group import PlacementStrategy, WorkerGroup
from workers.messages import AbortRequest, AddRequest


class GroupEngine:
    def __init__(
        self,
        config: EngineConfig,
        placement_strategy: PlacementStrategy = PlacementStrategy.STRICT_PACK,
        poll_timeout_s: float = 0.05,
    ) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model, config.tokenizer, config.revision)
        self.group = WorkerGroup(config, placement_strategy)
        self.limits = self.group.info.limits
        self.max_model_len = self.limits.max_model_len
        self.poll_timeout_s = poll_timeout_s
        self.unfinished: set[str] = set()

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.limits)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
    ) -> None:
        self.add_requests([(request_id, prompt, params, prompt_token_ids)])

    def add_requests(self, requests: Iterable[NewRequest]) -> None:
        """add_request for each (request_id, prompt, params, prompt_token_ids), all checked
        first and sent to rank 0 as one message: its next step sees every one of them."""
        messages = []
        for request_id, prompt, params, prompt_token_ids in requests:
            if request_id in self.unfinished or any(m.request_id == request_id for m in messages):
                raise ValueError(f"request id {request_id!r} is already running")
            if prompt_token_ids is None:
                prompt_token_ids = self.tokenizer.encode(prompt)
            self.validate_prompt(prompt_token_ids, params)
            messages.append(AddRequest(request_id, prompt, list(prompt_token_ids), params))
        self.unfinished.update(m.request_id for m in messages)
        self.group.submit(messages)

    def abort_request(self, request_id: str) -> None:
        if request_id in self.unfinished:
            self.group.submit([AbortRequest(request_id)])

    def has_unfinished_requests(self) -> bool:
        return bool(self.unfinished)

    def step(self) -> list[RequestOutput]:
        """Outputs that arrived since the last call (waits briefly when there are none). Raises
        WorkerGroupError, and forgets every unfinished request, when the group is down."""
        try:
            batch = self.group.poll(self.poll_timeout_s)
        except Exception:
            self.unfinished.clear()
            raise
        # Every finished output is taken in before a rejection is raised: the batch is gone
        # after this call, and a request dropped from it would wait forever.
        for output in batch.outputs:
            if output.finished:
                self.unfinished.discard(output.request_id)
        for request_id, _ in batch.rejected:
            self.unfinished.discard(request_id)
        if batch.rejected:
            request_id, reason = batch.rejected[0]
            raise ValueError(f"request {request_id} was rejected: {reason}")
        return batch.outputs

    def shutdown(self) -> None:
        self.group.shutdown()
