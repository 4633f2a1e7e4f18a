"""Greedy sampling in one kernel: each row's argmax and its log-probability.

The sampler's general path spends four kernels on a greedy step (the logits widened to fp32,
log-softmax over the vocabulary, argmax, a gather of the chosen log-probability), about 25 us a
step at batch 1 on an H200, beside a 2 ms step. Here one program per row reads the logits once:
a running max, its first index (ties go to the lower index, as `torch.argmax`), and the sum of
exponentials rescaled as the max grows. The chosen token's log-probability is then
x[argmax] - logsumexp(x) = -log(sum(exp(x - max)))."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # vocabulary entries per loop step


@triton.jit
def _greedy_sample(
    logits_ptr, token_ptr, logprob_ptr, stride_row, vocab, BLOCK: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    best = -float("inf")
    index = 0
    total = 0.0
    for start in range(0, vocab, BLOCK):
        x = tl.load(row_ptr + start + offs, mask=start + offs < vocab, other=-float("inf"))
        x = x.to(tl.float32)
        block_max = tl.max(x, axis=0)
        block_index = tl.argmax(x, axis=0) + start
        new_best = tl.maximum(best, block_max)
        total = total * tl.exp(best - new_best) + tl.sum(tl.exp(x - new_best), axis=0)
        index = tl.where(block_max > best, block_index, index)  # strictly: the first max wins
        best = new_best
    tl.store(token_ptr + row, index.to(tl.int64))
    tl.store(logprob_ptr + row, -tl.log(total))


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, vocab] (fp32/fp16/bf16, rows may be strided) -> (token ids [rows] int64,
    their log-probabilities under log_softmax(logits) [rows] fp32)."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"expected [rows, vocab] logits with contiguous rows, got {logits.shape}")
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _greedy_sample[(rows,)](
            logits, tokens, logprobs, logits.stride(0), vocab, BLOCK=BLOCK, num_warps=8
        )
    return tokens, logprobs
