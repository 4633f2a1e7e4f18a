"""The engine loop: requests in, one scheduled step at a time, RequestOutputs out."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import Detokenizer, check_stop, reaches_length_limit
from engine.model_files import load_tokenizer
from engine.model_runner import ModelRunnerOutput, StepPlan
from engine.model_spec import ModelSpec
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampler import SamplerOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.sequence import Request, Sequence
from engine.stats import FinishedStats, StepStats
from engine.validation import RequestLimits, validate_request

logger = logging.getLogger(__name__)

# A request as a driver hands it over: (request_id, prompt, params, prompt_token_ids).
NewRequest = tuple[str, str | None, SamplingParams, list[int] | None]


class LLMEngine:
    """Owns the scheduler, the detokenizer and the model runner of rank 0. `broadcast`, when
    given, sends each step's plan to the other tensor-parallel ranks before it runs."""

    def __init__(
        self, config: EngineConfig, broadcast: Callable[[StepPlan], None] | None = None
    ) -> None:
        self.config = config
        spec = ModelSpec.resolve(config)
        self.spec = spec
        self.device = spec.device
        self.dtype = spec.dtype
        self.hf_config = spec.hf_config
        self.quant_config = spec.quant_config
        self.max_model_len = spec.max_model_len
        self.tokenizer = load_tokenizer(str(spec.model_dir), config.tokenizer)
        self.eos_token_ids = spec.eos_token_ids(self.tokenizer)
        self.runner = spec.build_runner()
        self.broadcast = broadcast
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.batched_tokens_limit,
            config.enable_chunked_prefill,
        )  # fmt: skip
        self.limits = RequestLimits(
            vocab_size=self.hf_config.vocab_size, max_model_len=self.max_model_len,
            num_cache_tokens=self.runner.num_blocks * config.block_size,
            block_size=config.block_size, max_num_batched_tokens=config.batched_tokens_limit,
            enable_chunked_prefill=config.enable_chunked_prefill,
        )  # fmt: skip
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._seq_ids = itertools.count()
        # Per-step figures for a metrics exporter (take_stats); off unless one asks for them.
        self.collect_stats = False
        self._stats = StepStats()
        # A decode step queued on the GPU ahead of the host (async_scheduling): the next call
        # reads it back.
        self._launched: SamplerOutput | None = None

    # Requests.

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never run."""
        validate_request(prompt_token_ids, params, self.limits)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        params: SamplingParams,
        prompt_token_ids: list[int] | None = None,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("either prompt or prompt_token_ids is required")
            prompt_token_ids = self.tokenizer.encode(prompt)
        self.validate_prompt(prompt_token_ids, params)
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        seqs = [
            self._new_sequence(request_id, i, prompt_token_ids, params, arrival_time)
            for i in range(params.n)
        ]
        self.requests[request_id] = Request(
            request_id, prompt, list(prompt_token_ids), params, seqs, arrival_time
        )
        for seq in seqs:
            self.scheduler.add(seq)

    def add_requests(self, requests: Iterable[NewRequest]) -> None:
        """add_request for each (request_id, prompt, params, prompt_token_ids), in order (a
        worker group's engine sends such a batch to rank 0 as one message)."""
        for request_id, prompt, params, prompt_token_ids in requests:
            self.add_request(request_id, prompt, params, prompt_token_ids=prompt_token_ids)

    def _new_sequence(self, request_id, index, prompt_token_ids, params, arrival_time) -> Sequence:
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
        seq = Sequence(
            seq_id=next(self._seq_ids), request_id=request_id, index=index,
            token_ids=list(prompt_token_ids), num_prompt_tokens=len(prompt_token_ids),
            params=params, eos_token_ids=self.eos_token_ids, arrival_time=arrival_time,
            generator=generator,
        )  # fmt: skip
        if params.prompt_logprobs is not None and index == 0:
            seq.prompt_logprobs = [None]
        self.detokenizer.start(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        now = time.monotonic()
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                if self.collect_stats:
                    self._stats.finished.append(FinishedStats.of(seq, now))
        self._drop_launched_if_done()
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # The step.

    def take_stats(self) -> StepStats:
        """What happened since the last call (steps' figures are those of the latest step)."""
        stats, self._stats = self._stats, StepStats()
        return stats

    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        launched, self._launched = self._launched, None
        if launched is None:
            schedule = self.scheduler.schedule()
            if not schedule.scheduled:
                return []
            for s in schedule.scheduled:
                if s.seq.first_scheduled_time is None:
                    s.seq.first_scheduled_time = start
            if not self._can_launch(schedule):
                result = self.runner.execute(schedule, self.generator, self.broadcast)
                for s in schedule.scheduled:
                    s.seq.num_computed_tokens += s.num_new_tokens
                outputs = self._postprocess(result)
                self._record_step(start, len(schedule.scheduled), schedule.num_tokens,
                                  schedule.num_preempted)  # fmt: skip
                return outputs
            launched = self.runner.launch(schedule, self.generator)
            for s in schedule.scheduled:
                s.seq.num_computed_tokens += 1
            num_preempted = schedule.num_preempted
        else:
            num_preempted = 0
        # `launched` is queued on the device: queue the step after it first, then read it back
        # and work on its tokens while the device runs that one.
        self._launched = self._launch_followup(launched)
        outputs = self._postprocess(self.runner.read_back(launched))
        self._drop_launched_if_done()
        num_seqs = len(launched.seqs)
        self._record_step(start, num_seqs, num_seqs, num_preempted)
        return outputs

    def _drop_launched_if_done(self) -> None:
        """A queued step whose sequences have all ended (finished, aborted) is waited for and
        dropped now: no later step() may come to read it back."""
        if self._launched is not None and all(s.is_finished for s in self._launched.seqs):
            self.runner.read_back(self._launched)
            self._launched = None

    def _can_launch(self, schedule: SchedulerOutput) -> bool:
        """Whether a step may run launched ahead: async scheduling on, one rank (other ranks
        follow plans, not device tokens), and a decode step where every sequence samples."""
        return (
            self.config.async_scheduling
            and self.broadcast is None
            and all(s.num_new_tokens == 1 and s.samples for s in schedule.scheduled)
        )

    def _launch_followup(self, launched: SamplerOutput) -> SamplerOutput | None:
        """Queue the decode step after `launched` for its sequences, before knowing which of
        them its tokens end (their extra token is then dropped); None where the scheduler must
        decide the next step: requests are waiting that could be admitted, running sequences
        are not in this step, or every sequence surely ends with this token. (Penalties and
        min_tokens count the token in flight on the device: Sampler.sample's in_flight.)"""
        scheduler = self.scheduler
        if scheduler.waiting and len(scheduler.running) < self.config.max_num_seqs:
            return None
        seqs = launched.seqs
        if not set(scheduler.running) <= set(seqs):  # finished ones have left `running`
            return None
        # A sequence whose token in flight reaches a length limit ends with it.
        follow = [
            s for s in seqs
            if not s.is_finished and not reaches_length_limit(s, self.max_model_len, pending=1)
        ]  # fmt: skip
        if not follow:
            return None
        manager = self.block_manager
        if sum(manager.num_new_blocks(s, 1) for s in follow) > manager.num_free_blocks:
            return None
        for seq in follow:
            manager.allocate(seq, 1)
        followup = self.runner.launch_followup(launched, follow, self.generator)
        for seq in follow:
            seq.num_computed_tokens += 1
        if self.collect_stats:
            self._stats.num_launched_ahead += 1
        return followup

    def _record_step(self, start: float, num_seqs: int, num_tokens: int, preempted: int) -> None:
        if not self.collect_stats:
            return
        stats = self._stats
        stats.step_seconds = time.monotonic() - start
        stats.num_seqs = num_seqs
        stats.num_tokens = num_tokens
        stats.num_preempted += preempted
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.block_manager.usage

    def _postprocess(self, result: ModelRunnerOutput) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        for seq, entries in result.prompt_logprobs:
            seq.prompt_logprobs.extend(self._logprob_dict(e) for e in entries)
        now = time.monotonic()
        for seq, token in result.sampled:
            if seq.is_finished:  # a token launched ahead for a sequence that ended since
                continue
            seq.token_ids.append(token.token_id)
            seq.cumulative_logprob += token.logprob
            if self.collect_stats:
                self._record_token(seq, now)
            if seq.first_token_time is None:
                seq.first_token_time = now
            seq.last_token_time = now
            if token.top_logprobs is not None:
                seq.output_logprobs.append(self._logprob_dict(token.top_logprobs))
            delta = self.detokenizer.step(seq)
            check_stop(seq, len(delta), self.max_model_len)
            if seq.finish_reason is not None:
                if not isinstance(seq.stop_reason, str):
                    self.detokenizer.flush(seq)
                self.scheduler.finish(seq)
                if self.collect_stats:
                    self._stats.finished.append(FinishedStats.of(seq, now))
            request = self.requests[seq.request_id]
            if seq.params.output_kind is RequestOutputKind.CUMULATIVE or request.finished:
                touched[seq.request_id] = request
        outputs = [self._output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        return outputs

    def _record_token(self, seq: Sequence, now: float) -> None:
        stats = self._stats
        stats.num_generated_tokens += 1
        if seq.first_token_time is None:
            stats.time_to_first_token.append(now - seq.arrival_time)
            if seq.index == 0:
                stats.num_prompt_tokens += seq.num_prompt_tokens
        else:
            stats.inter_token_latency.append(now - seq.last_token_time)

    def _logprob_dict(self, entries: dict[int, tuple[float, int]]) -> dict[int, Logprob]:
        return {
            t: Logprob(lp, rank, self.detokenizer.decode_token(t))
            for t, (lp, rank) in entries.items()
        }

    def _output(self, request: Request) -> RequestOutput:
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=s.output_token_ids,
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.output_logprobs) if s.params.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )  # fmt: skip
            for s in request.seqs
        ]
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            prompt_logprobs=None if first.prompt_logprobs is None else list(first.prompt_logprobs),
            outputs=outputs, finished=request.finished,
        )  # fmt: skip
