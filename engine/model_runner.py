"""Builds one step's inputs from the scheduler's decision, runs the model, samples.

A step is first described as a `StepPlan` of plain lists (rank 0 builds it; with tensor
parallelism it is broadcast to the other ranks), then every rank runs the same forward pass and
LM head on it, and rank 0 samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig

from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphRunner, capture_sizes
from engine.distributed import get_tp_group
from engine.forward_context import AttentionBatch, AttentionMetadata, set_forward_context
from engine.kernels import enable_kernels, kernels_available
from engine.kv_cache import (
    allocate_kv_cache,
    determine_num_blocks,
    free_kv_cache,
    kv_cache_dtype,
)
from engine.layers.quant import QuantizationConfig
from engine.loader import load_model
from engine.prefill_graphs import PREFILL_SIZES, PrefillGraphRunner
from engine.sampler import SampledToken, Sampler, SamplerOutput, logprob_entry, logprob_tensors
from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence
from engine.transfer import to_device

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchPlan:
    """One padded attention group (see AttentionBatch), as lists."""

    token_start: int
    token_end: int
    flat_index: list[int]
    query_positions: list[list[int]]
    block_tables: list[list[int]]
    context_lens: list[int]


@dataclass(slots=True)
class StepPlan:
    """Everything a rank needs to run one step, in plain Python data (cheap to broadcast)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    batches: list[BatchPlan] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # rows whose logits are sampled
    prompt_rows: list[int] = field(default_factory=list)  # rows for prompt logprobs


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: list[tuple[Sequence, SampledToken]] = field(default_factory=list)
    # (seq, [top-k dict of each next prompt token]) in prompt order.
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
        self.max_model_len = max_model_len
        self.model, self.load_report = load_model(model_dir, hf_config, quant_config, dtype, device)
        self.use_kernels = self._use_kernels(config.kernels, device)
        enable_kernels(self.model, self.use_kernels)
        self.sampler = Sampler(self.use_kernels)
        self.graphs: DecodeGraphRunner | None = None  # captured once the cache exists
        self.prefill_graphs: PrefillGraphRunner | None = None  # the same, for one-sequence prefill
        self.cache_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype)
        if self.cache_dtype.itemsize == 1 and self.use_kernels:
            if torch.cuda.get_device_capability(device) < (8, 9):
                raise ValueError(
                    "kv_cache_dtype='fp8' with the Triton kernels needs a GPU of compute "
                    "capability 8.9 or newer; use kernels='native' on this one"
                )
        num_blocks = determine_num_blocks(
            config, self.model, self.cache_dtype, device, max_model_len, self._profile_run
        )
        # Every rank must hold the same blocks: the smallest count any rank can afford.
        self.num_blocks = self._min_across_ranks(num_blocks)
        allocate_kv_cache(self.model, self.num_blocks, self.block_size, self.cache_dtype, device)
        logger.info("KV cache: %d blocks of %d tokens", self.num_blocks, self.block_size)
        if self.use_kernels and not config.enforce_eager:
            # With tensor parallelism each rank captures its shard's step, all-reduces included
            # (NCCL in the graph); ranks replay in lockstep, so either all use graphs or none.
            self.graphs = DecodeGraphRunner(
                self.model,
                capture_sizes(config.max_num_seqs),
                -(-max_model_len // self.block_size),
                device,
            )
            if not self._min_across_ranks(int(self.graphs.capture())):
                self.graphs = None
            limit = min(config.batched_tokens_limit, max_model_len)
            sizes = tuple(s for s in PREFILL_SIZES if s <= limit)
            if self.graphs is not None and sizes:
                self.prefill_graphs = PrefillGraphRunner(self.model, sizes, self.block_size, device)
                if not self._min_across_ranks(int(self.prefill_graphs.capture(self.graphs.pool))):
                    self.prefill_graphs = None
        if self.use_kernels:  # compile the sampler's kernel now, not inside the first request
            with torch.inference_mode():
                hidden = torch.zeros(1, hf_config.hidden_size, dtype=dtype, device=device)
                self.sampler.warm_up(self.model.compute_logits(hidden))

    @staticmethod
    def _use_kernels(choice: str, device: torch.device) -> bool:
        available = kernels_available(device) and device.type == "cuda"
        if choice == "triton" and not available:
            raise ValueError("kernels='triton' needs a CUDA device and Triton installed")
        return choice != "native" and available

    def _min_across_ranks(self, value: int) -> int:
        """The smallest of every rank's value (the value itself with one rank)."""
        tp = get_tp_group()
        if tp.size == 1:
            return value
        tensor = torch.tensor([value], device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN, group=tp.group)
        return int(tensor.item())

    # Planning (rank 0).

    def plan(self, output: SchedulerOutput) -> tuple[StepPlan, list[Sequence], list]:
        """The step's plan, the sequences that sample (in sample_rows order), and for prompt
        logprobs the (seq, next prompt token) of each prompt row."""
        decodes = [s for s in output.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in output.scheduled if s.num_new_tokens > 1]
        plan = StepPlan()
        sample_seqs: list[Sequence] = []
        prompt_targets: list[tuple[Sequence, int]] = []
        bs = self.block_size
        for group in (decodes, prefills):
            if not group:
                continue
            start = len(plan.input_ids)
            max_q = max(s.num_new_tokens for s in group)
            max_blocks = max(len(s.seq.block_table) for s in group)
            batch = BatchPlan(start, 0, [], [], [], [])
            for j, s in enumerate(group):
                seq, begin = s.seq, s.seq.num_computed_tokens
                end = begin + s.num_new_tokens
                row0 = len(plan.input_ids)
                table = seq.block_table
                plan.input_ids += seq.token_ids[begin:end]
                plan.positions += range(begin, end)
                plan.slot_mapping += [table[p // bs] * bs + p % bs for p in range(begin, end)]
                batch.flat_index += range(j * max_q, j * max_q + s.num_new_tokens)
                batch.query_positions.append(list(range(begin, end)) + [0] * (max_q - end + begin))
                batch.block_tables.append(table + [0] * (max_blocks - len(table)))
                batch.context_lens.append(end)
                if s.samples:
                    sample_seqs.append(seq)
                    plan.sample_rows.append(row0 + s.num_new_tokens - 1)
                if seq.wants_prompt_logprobs:
                    first = max(begin, len(seq.prompt_logprobs) - 1)
                    for p in range(first, min(end, seq.num_prompt_tokens - 1)):
                        plan.prompt_rows.append(row0 + p - begin)
                        prompt_targets.append((seq, seq.token_ids[p + 1]))
            batch.token_end = len(plan.input_ids)
            plan.batches.append(batch)
        return plan, sample_seqs, prompt_targets

    # Running (every rank).

    def _tensor(self, values: list) -> torch.Tensor:
        return to_device(values, torch.long, self.device)

    def _metadata(self, plan: StepPlan) -> AttentionMetadata:
        batches = [
            AttentionBatch(
                b.token_start,
                b.token_end,
                self._tensor(b.flat_index),
                self._tensor(b.query_positions),
                self._tensor(b.block_tables),
                self._tensor(b.context_lens),
                max_context_len=max(b.context_lens),
            )  # fmt: skip
            for b in plan.batches
        ]
        return AttentionMetadata(self._tensor(plan.slot_mapping), batches)

    @torch.inference_mode()
    def run(
        self, plan: StepPlan, device_input_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Forward pass and LM head: logits of the sample rows and of the prompt-logprob rows.
        `device_input_ids`, when given, replaces plan.input_ids (a followup decode step)."""
        hidden = self._replay_graph(plan, device_input_ids)
        if hidden is None:
            input_ids = device_input_ids
            if input_ids is None:
                input_ids = self._tensor(plan.input_ids)
            with set_forward_context(self._metadata(plan)):
                hidden = self.model(input_ids, self._tensor(plan.positions))
        sample_logits = prompt_logits = None
        if plan.sample_rows:
            # Decode steps sample every row: no gather needed.
            rows = hidden if len(plan.sample_rows) == hidden.shape[0] else hidden[plan.sample_rows]
            sample_logits = self.model.compute_logits(rows)
        if plan.prompt_rows:
            prompt_logits = self.model.compute_logits(hidden[plan.prompt_rows])
        return sample_logits, prompt_logits

    def _replay_graph(
        self, plan: StepPlan, device_input_ids: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Hidden states from a captured CUDA graph, for a decode-only step that fits one or the
        prefill step of one sequence that fits one."""
        if self.graphs is None or len(plan.batches) != 1:
            return None
        batch = plan.batches[0]
        if len(batch.query_positions[0]) > 1:  # a prefill group
            return self._replay_prefill_graph(plan)
        if plan.prompt_rows:
            return None
        num_blocks = len(batch.block_tables[0])
        if not self.graphs.can_run(len(plan.input_ids), len(batch.query_positions[0]), num_blocks):
            return None
        return self.graphs.run(
            plan.input_ids, plan.positions, plan.slot_mapping, batch.context_lens,
            batch.block_tables, device_input_ids,
        )  # fmt: skip

    def _replay_prefill_graph(self, plan: StepPlan) -> torch.Tensor | None:
        batch = plan.batches[0]
        if self.prefill_graphs is None or len(batch.block_tables) != 1:
            return None
        table = batch.block_tables[0]
        if self.prefill_graphs.bucket(len(plan.input_ids), len(table)) is None:
            return None
        return self.prefill_graphs.run(
            plan.input_ids, plan.positions, plan.slot_mapping, table, batch.context_lens[0]
        )

    # One whole step on rank 0.

    @torch.inference_mode()
    def execute(
        self, output: SchedulerOutput, generator: torch.Generator, broadcast=None
    ) -> ModelRunnerOutput:
        """Plan, (broadcast the plan to the other ranks,) run, and sample."""
        plan, sample_seqs, prompt_targets = self.plan(output)
        if broadcast is not None:
            broadcast(plan)
        sample_logits, prompt_logits = self.run(plan)
        result = ModelRunnerOutput()
        if sample_logits is not None:
            tokens = self.sampler(sample_logits, sample_seqs, generator)
            result.sampled = list(zip(sample_seqs, tokens, strict=True))
        if prompt_logits is not None:
            result.prompt_logprobs = self._prompt_logprobs(prompt_logits, prompt_targets)
        return result

    # Decode steps launched ahead (rank 0, one GPU): the host works on step N's tokens while the
    # GPU runs step N + 1.

    @torch.inference_mode()
    def launch(self, output: SchedulerOutput, generator: torch.Generator) -> SamplerOutput:
        """Queue a decode-only step (every sequence samples) without waiting for it: its
        choices, not yet read back (`read_back`); the next step can be launched behind it."""
        plan, sample_seqs, _ = self.plan(output)
        sample_logits, _ = self.run(plan)
        return self.sampler.sample(sample_logits, sample_seqs, generator)

    @torch.inference_mode()
    def launch_followup(
        self, previous: SamplerOutput, seqs: list[Sequence], generator: torch.Generator
    ) -> SamplerOutput:
        """Queue the decode step after `previous` for `seqs` (some or all of its sequences, in
        its order), their input tokens the ones `previous` sampled, still on the device. Each
        sequence's next slot must be allocated (BlockManager.allocate(seq, 1))."""
        bs = self.block_size
        plan = StepPlan(input_ids=[0] * len(seqs), sample_rows=list(range(len(seqs))))
        batch = BatchPlan(0, len(seqs), [], [], [], [])
        max_blocks = max(len(s.block_table) for s in seqs)
        for j, seq in enumerate(seqs):
            pos = seq.num_computed_tokens  # the position of the token `previous` sampled
            table = seq.block_table
            plan.positions.append(pos)
            plan.slot_mapping.append(table[pos // bs] * bs + pos % bs)
            batch.flat_index.append(j)
            batch.query_positions.append([pos])
            batch.block_tables.append(table + [0] * (max_blocks - len(table)))
            batch.context_lens.append(pos + 1)
        plan.batches.append(batch)
        token_ids = previous.token_ids
        if len(seqs) != len(previous.seqs):
            rows = {id(s): i for i, s in enumerate(previous.seqs)}
            token_ids = token_ids[self._tensor([rows[id(s)] for s in seqs])]
        sample_logits, _ = self.run(plan, token_ids)
        # Those tokens are not in the sequences' token_ids yet: penalties count them from here.
        return self.sampler.sample(sample_logits, seqs, generator, token_ids)

    @staticmethod
    def read_back(step: SamplerOutput) -> ModelRunnerOutput:
        """Wait for a launched step and return its tokens."""
        return ModelRunnerOutput(sampled=list(zip(step.seqs, step.tokens(), strict=True)))

    def _prompt_logprobs(self, logits: torch.Tensor, targets: list[tuple[Sequence, int]]):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        k = max(seq.params.prompt_logprobs for seq, _ in targets)
        tensors = logprob_tensors(logprobs, self._tensor([t for _, t in targets]), k)
        chosen, ranks, values, ids = (t.tolist() for t in tensors)
        by_seq: dict[int, tuple[Sequence, list]] = {}
        for i, (seq, target) in enumerate(targets):
            entry = logprob_entry(
                target, chosen[i], ranks[i], values[i], ids[i], seq.params.prompt_logprobs
            )
            by_seq.setdefault(id(seq), (seq, []))[1].append(entry)
        return list(by_seq.values())

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """One prefill step as large as the scheduler allows, on a throwaway cache."""
        num_tokens = self.config.batched_tokens_limit
        seq_len = min(num_tokens, self.max_model_len)
        lengths = [seq_len] * (num_tokens // seq_len)
        if num_tokens % seq_len:
            lengths.append(num_tokens % seq_len)
        max_q = max(lengths)
        blocks_per_seq = -(-max_q // self.block_size)
        allocate_kv_cache(
            self.model, blocks_per_seq, self.block_size, self.cache_dtype, self.device
        )
        plan = StepPlan(
            input_ids=[0] * num_tokens,
            positions=[p for n in lengths for p in range(n)],
            slot_mapping=[
                p % (blocks_per_seq * self.block_size) for n in lengths for p in range(n)
            ],
        )
        batch = BatchPlan(0, num_tokens, [], [], [], [])
        for i, n in enumerate(lengths):
            batch.flat_index += range(i * max_q, i * max_q + n)
            batch.query_positions.append(list(range(n)) + [0] * (max_q - n))
            batch.block_tables.append(list(range(blocks_per_seq)))
            batch.context_lens.append(n)
        plan.batches.append(batch)
        plan.sample_rows = list(range(min(num_tokens, self.config.max_num_seqs)))
        self.run(plan)
        free_kv_cache(self.model)
