"""Messages that cross the driver / rank-0 process boundary."""

from __future__ import annotations

from dataclasses import dataclass

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.validation import RequestLimits


@dataclass(frozen=True, slots=True)
class AddRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What rank 0 reports once the model is loaded."""

    limits: RequestLimits
    num_blocks: int
    load_seconds: float
    weight_bytes: int
    weight_bytes_16bit: int
    quantization: str


@dataclass(frozen=True, slots=True)
class OutputBatch:
    """Everything rank 0 produced since the last poll; `error` if its loop died."""

    outputs: list[RequestOutput]
    rejected: list[tuple[str, str]]  # (request_id, reason) refused when added
    error: str | None = None
    step_running_s: float = 0.0  # how long the step in progress has run (0: none is)
