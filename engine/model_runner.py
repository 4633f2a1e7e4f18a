"""Builds one step's tensors from the scheduler's decision, runs the model, samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig

from engine.config import EngineConfig
from engine.forward_context import AttentionBatch, AttentionMetadata, set_forward_context
from engine.kv_cache import allocate_kv_cache, determine_num_blocks, free_kv_cache
from engine.layers.quant import QuantizationConfig
from engine.loader import load_model
from engine.sampler import SampledToken, Sampler, top_logprobs
from engine.scheduler import ScheduledSequence, SchedulerOutput
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    metadata: AttentionMetadata
    sample_seqs: list[Sequence]
    sample_rows: list[int]  # token row whose logits sample each of sample_seqs
    prompt_rows: list[tuple[Sequence, int, int]]  # (seq, row, next prompt token id)


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: list[tuple[Sequence, SampledToken]]
    # (seq, [(logprob of the actual next prompt token, its top-k dict)]) in prompt order.
    prompt_logprobs: list[tuple[Sequence, list[dict[int, tuple[float, int]]]]] = field(
        default_factory=list
    )


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        hf_config: PretrainedConfig,
        model_dir: Path,
        quant_config: QuantizationConfig | None,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.block_size = config.block_size
        self.model, self.load_report = load_model(model_dir, hf_config, quant_config, dtype, device)
        self.sampler = Sampler()
        self.max_model_len = max_model_len
        self.num_blocks = determine_num_blocks(
            config, self.model, dtype, device, max_model_len, self._profile_run
        )
        allocate_kv_cache(self.model, self.num_blocks, self.block_size, dtype, device)
        logger.info("KV cache: %d blocks of %d tokens", self.num_blocks, self.block_size)

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One prefill step as large as the scheduler allows, on a throwaway cache."""
        num_tokens = self.config.batched_tokens_limit
        num_blocks = -(-num_tokens // self.block_size) + 1
        allocate_kv_cache(self.model, num_blocks, self.block_size, self.dtype, self.device)
        seq_len = min(num_tokens, self.max_model_len)
        lengths = [seq_len] * (num_tokens // seq_len) + (
            [num_tokens % seq_len] if num_tokens % seq_len else []
        )
        query_positions = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
        flat = []
        for i, n in enumerate(lengths):
            query_positions[i, :n] = torch.arange(n)
            flat += range(i * max(lengths), i * max(lengths) + n)
        blocks_per_seq = -(-max(lengths) // self.block_size)
        batch = AttentionBatch(
            0, num_tokens, torch.tensor(flat, device=self.device), query_positions.to(self.device),
            torch.zeros(len(lengths), blocks_per_seq, dtype=torch.long, device=self.device),
            torch.tensor(lengths, device=self.device),
        )  # fmt: skip
        metadata = AttentionMetadata(
            torch.zeros(num_tokens, dtype=torch.long, device=self.device), [batch]
        )
        with set_forward_context(metadata):
            hidden = self.model(
                torch.zeros(num_tokens, dtype=torch.long, device=self.device),
                torch.cat([torch.arange(n) for n in lengths]).to(self.device),
            )
            self.model.compute_logits(hidden[-self.config.max_num_seqs :])
        free_kv_cache(self.model)

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_seqs, sample_rows, prompt_rows = [], [], []
        batches = []
        for group in (decodes, prefills):
            if not group:
                continue
            start = len(input_ids)
            max_q = max(s.num_new_tokens for s in group)
            max_blocks = max(len(s.seq.block_table) for s in group)
            flat_index, query_positions, block_tables, context_lens = [], [], [], []
            for j, s in enumerate(group):
                seq, begin = s.seq, s.seq.num_computed_tokens
                end = begin + s.num_new_tokens
                row0 = len(input_ids)
                input_ids += seq.token_ids[begin:end]
                positions += range(begin, end)
                table = seq.block_table
                slots += [
                    table[p // self.block_size] * self.block_size + p % self.block_size
                    for p in range(begin, end)
                ]
                flat_index += range(j * max_q, j * max_q + s.num_new_tokens)
                query_positions.append(list(range(begin, end)) + [0] * (max_q - s.num_new_tokens))
                block_tables.append(table + [0] * (max_blocks - len(table)))
                context_lens.append(end)
                if s.samples:
                    sample_seqs.append(seq)
                    sample_rows.append(row0 + s.num_new_tokens - 1)
                if seq.wants_prompt_logprobs:
                    first = max(begin, len(seq.prompt_logprobs) - 1)
                    for p in range(first, min(end, seq.num_prompt_tokens - 1)):
                        prompt_rows.append((seq, row0 + p - begin, seq.token_ids[p + 1]))
            batches.append(
                AttentionBatch(
                    start,
                    len(input_ids),
                    self._tensor(flat_index),
                    self._tensor(query_positions),
                    self._tensor(block_tables),
                    self._tensor(context_lens),
                )  # fmt: skip
            )
        metadata = AttentionMetadata(self._tensor(slots), batches)
        return StepInputs(
            self._tensor(input_ids), self._tensor(positions), metadata,
            sample_seqs, sample_rows, prompt_rows,
        )  # fmt: skip

    def _tensor(self, values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput, generator: torch.Generator) -> ModelRunnerOutput:
        inputs = self.prepare(output.scheduled)
        with set_forward_context(inputs.metadata):
            hidden = self.model(inputs.input_ids, inputs.positions)
        result = ModelRunnerOutput(sampled=[])
        if inputs.sample_seqs:
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            tokens = self.sampler(logits, inputs.sample_seqs, generator)
            result.sampled = list(zip(inputs.sample_seqs, tokens, strict=True))
        if inputs.prompt_rows:
            result.prompt_logprobs = self._prompt_logprobs(hidden, inputs.prompt_rows)
        return result

    def _prompt_logprobs(self, hidden, prompt_rows):
        rows = [row for _, row, _ in prompt_rows]
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[rows]).float(), dim=-1)
        by_seq: dict[int, tuple[Sequence, list]] = {}
        for i, (seq, _, target) in enumerate(prompt_rows):
            entry = top_logprobs(logprobs[i], target, seq.params.prompt_logprobs)
            by_seq.setdefault(id(seq), (seq, []))[1].append(entry)
        return list(by_seq.values())
