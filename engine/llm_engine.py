"""The engine loop: requests in, one scheduled step at a time, RequestOutputs out."""

from __future__ import annotations

import itertools
import logging
import time

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from engine.block_manager import BlockManager
from engine.config import DTYPES, EngineConfig
from engine.detokenizer import Detokenizer, check_stop
from engine.layers.quant import resolve_quant_config
from engine.model_files import resolve_model_dir
from engine.model_runner import ModelRunner, ModelRunnerOutput
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request, Sequence

logger = logging.getLogger(__name__)


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    checkpoint = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(checkpoint, str):
        checkpoint = DTYPES.get(checkpoint)
    if checkpoint in (torch.bfloat16, torch.float16):
        return checkpoint
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        model_dir = resolve_model_dir(config.model, config.revision)
        self.hf_config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        quantization = config.quantization
        if config.load_format == "bitsandbytes":
            quantization = "bitsandbytes"
        checkpoint_quant = getattr(self.hf_config, "quantization_config", None)
        if checkpoint_quant is not None and not isinstance(checkpoint_quant, dict):
            checkpoint_quant = checkpoint_quant.to_dict()
        self.quant_config = resolve_quant_config(
            checkpoint_quant, quantization, config.quantization_config
        )
        self.dtype = pick_dtype(config.dtype, self.hf_config, self.device)
        self.max_model_len = self._max_model_len()
        self.eos_token_ids = self._eos_token_ids(model_dir)
        self.runner = ModelRunner(
            config, self.hf_config, model_dir, self.quant_config, self.dtype, self.device,
            self.max_model_len,
        )  # fmt: skip
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.batched_tokens_limit,
            config.enable_chunked_prefill,
        )  # fmt: skip
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, Request] = {}
        self.generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._seq_ids = itertools.count()

    def _max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(
                f"max_model_len {self.config.max_model_len} exceeds the model's "
                f"max_position_embeddings ({limit})"
            )
        return self.config.max_model_len

    def _eos_token_ids(self, model_dir) -> frozenset[int]:
        ids: set[int] = set()
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # Requests.

    def validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request can never run."""
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        vocab = self.hf_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids must be in [0, {vocab})")
        num = len(prompt_token_ids)
        if num >= self.max_model_len:
            raise ValueError(
                f"prompt is {num} tokens, which leaves no room to generate within "
                f"max_model_len ({self.max_model_len})"
            )
        if not self.config.enable_chunked_prefill and num > self.config.batched_tokens_limit:
            raise ValueError(
                f"prompt is {num} tokens, more than max_num_batched_tokens "
                f"({self.config.batched_tokens_limit}) with chunked prefill off"
            )
        total = min(num + (params.max_tokens or self.max_model_len), self.max_model_len)
        if self.block_manager.blocks_for(total) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt + max_tokens ({total} tokens) needs more KV cache than exists "
                f"({self.block_manager.num_blocks * self.config.block_size} tokens)"
            )

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
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
        return self._output(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # The step.

    def step(self) -> list[RequestOutput]:
        schedule = self.scheduler.schedule()
        if not schedule.scheduled:
            return []
        now = time.monotonic()
        for s in schedule.scheduled:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        result = self.runner.execute(schedule, self.generator)
        for s in schedule.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
        return self._postprocess(result)

    def _postprocess(self, result: ModelRunnerOutput) -> list[RequestOutput]:
        touched: dict[str, Request] = {}
        for seq, entries in result.prompt_logprobs:
            seq.prompt_logprobs.extend(self._logprob_dict(e) for e in entries)
        now = time.monotonic()
        for seq, token in result.sampled:
            seq.token_ids.append(token.token_id)
            seq.cumulative_logprob += token.logprob
            if seq.first_token_time is None:
                seq.first_token_time = now
            if token.top_logprobs is not None:
                seq.output_logprobs.append(self._logprob_dict(token.top_logprobs))
            delta = self.detokenizer.step(seq)
            check_stop(seq, len(delta), self.max_model_len)
            if seq.finish_reason is not None:
                if not isinstance(seq.stop_reason, str):
                    self.detokenizer.flush(seq)
                self.scheduler.finish(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        outputs = [self._output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self.requests[r.request_id]
        return outputs

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
