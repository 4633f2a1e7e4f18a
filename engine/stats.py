"""What one engine step measured, for whoever exports metrics (the engine itself exports none)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sequence import Sequence


@dataclass(slots=True)
class FinishedStats:
    """Timings of one finished (or aborted) sequence, in seconds."""

    finish_reason: str
    e2e: float  # arrival to finish
    queue: float | None  # arrival to first scheduled (None if never scheduled)
    prefill: float | None  # first scheduled to first token
    decode: float | None  # first token to finish
    time_per_output_token: float | None
    num_output_tokens: int

    @classmethod
    def of(cls, seq: Sequence, now: float) -> FinishedStats:
        scheduled, first = seq.first_scheduled_time, seq.first_token_time
        decode = now - first if first is not None else None
        tpot = (
            decode / (seq.num_output_tokens - 1) if decode and seq.num_output_tokens > 1 else None
        )
        return cls(
            finish_reason=seq.finish_reason or "abort", e2e=now - seq.arrival_time,
            queue=scheduled - seq.arrival_time if scheduled is not None else None,
            prefill=first - scheduled if first is not None and scheduled is not None else None,
            decode=decode, time_per_output_token=tpot, num_output_tokens=seq.num_output_tokens,
        )  # fmt: skip


@dataclass(slots=True)
class StepStats:
    step_seconds: float = 0.0
    num_seqs: int = 0
    num_tokens: int = 0
    num_preempted: int = 0
    num_launched_ahead: int = 0  # decode steps queued before the previous one was read back
    num_generated_tokens: int = 0
    num_prompt_tokens: int = 0  # of requests whose first token came this step
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    time_to_first_token: list[float] = field(default_factory=list)
    inter_token_latency: list[float] = field(default_factory=list)
    finished: list[FinishedStats] = field(default_factory=list)
