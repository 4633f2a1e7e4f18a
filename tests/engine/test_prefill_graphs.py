"""The padded one-sequence prefill that prefill CUDA graphs hold (engine/prefill_graphs.py), run
eagerly on CPU: the same logits and cache contents as the step it stands in for, and padding
tokens write nothing. (Capture and replay need a GPU: tests/engine/test_gpu_kernels.py.)"""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.layers.attention import Attention
from engine.model_runner import BatchPlan, StepPlan
from engine.prefill_graphs import PrefillGraphRunner

BLOCKS = [3, 5]  # any free blocks: no request is running


@pytest.fixture(scope="module")
def runner(checkpoints):
    llm = LLM(model=str(checkpoints("llama")), dtype="float32", quantization="bitsandbytes")
    return llm.llm_engine.runner


def _caches(runner) -> list[torch.Tensor]:
    return [m.kv_cache for m in runner.model.modules() if isinstance(m, Attention)]


def _plan(runner, num_tokens: int) -> StepPlan:
    bs = runner.block_size
    ids = torch.randint(0, 100, (num_tokens,), generator=torch.Generator().manual_seed(0))
    positions = list(range(num_tokens))
    slots = [BLOCKS[p // bs] * bs + p % bs for p in positions]
    batch = BatchPlan(0, num_tokens, positions, [positions], [BLOCKS], [num_tokens])
    return StepPlan(ids.tolist(), positions, slots, [batch], sample_rows=[num_tokens - 1])


def test_buckets_hold_the_tokens_and_the_block_table(runner):
    graphs = PrefillGraphRunner(runner.model, (16, 32), 16, torch.device("cpu"))
    assert graphs.bucket(16, 1) == 16
    assert graphs.bucket(17, 2) == 32
    assert graphs.bucket(9, 2) == 32  # a block table wider than 16 tokens' blocks
    assert graphs.bucket(33, 3) is None
    assert graphs.bucket(20, 3) is None


def test_padded_prefill_equals_the_eager_step(runner):
    num_tokens = 2 * runner.block_size - 5  # padded to the next bucket, in the last block
    plan = _plan(runner, num_tokens)
    eager_logits, _ = runner.run(plan)
    eager_cache = [c.clone() for c in _caches(runner)]

    # The same step through the padded buffers, on a cache filled with a sentinel: the real
    # tokens' slots are written as the eager step wrote them, and nothing else.
    for cache in _caches(runner):
        cache.fill_(7.0)
    graphs = PrefillGraphRunner(runner.model, (16, 32, 64), runner.block_size, runner.device)
    table = plan.batches[0].block_tables[0]
    hidden = graphs.run(
        plan.input_ids, plan.positions, plan.slot_mapping, table, num_tokens, replay=False
    )
    assert hidden.shape[0] == num_tokens
    padded_logits = runner.model.compute_logits(hidden[plan.sample_rows])
    torch.testing.assert_close(padded_logits, eager_logits, rtol=1e-4, atol=1e-4)
    # The next step stages its inputs in the other buffer: the same step again, the same result.
    again = graphs.run(
        plan.input_ids, plan.positions, plan.slot_mapping, table, num_tokens, replay=False
    )
    torch.testing.assert_close(runner.model.compute_logits(again[plan.sample_rows]), padded_logits)

    written = torch.zeros(runner.num_blocks * runner.block_size, dtype=torch.bool)
    written[plan.slot_mapping] = True
    for cache, expected in zip(_caches(runner), eager_cache, strict=True):
        flat = cache.flatten(1, 2)  # [2, slots, kv_heads, head_dim]
        torch.testing.assert_close(flat[:, written], expected.flatten(1, 2)[:, written])
        assert torch.all(flat[:, ~written] == 7.0), "a padding token wrote the cache"
