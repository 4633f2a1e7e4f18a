"""One sequence being generated: its tokens, cache blocks, sampling and text state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.outputs import PositionLogprobs
from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One of the `n` completions of a request. Identity-hashed: the scheduler keys on it."""

    seq_id: int
    request_id: str
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    arrival_time: float
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # Outputs.
    output_logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Incremental detokenization state (see engine/detokenizer.py).
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Timestamps (seconds, time.monotonic) for metrics.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """True while tokens that were not sampled this run (prompt or recomputed) remain."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (
            self.params.prompt_logprobs is not None
            and self.prompt_logprobs is not None
            and len(self.prompt_logprobs) < self.num_prompt_tokens
        )


@dataclass(eq=False)
class Request:
    """One user request: a prompt and its `n` sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_time: float

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
