"""Prefill attention over the paged KV cache, side by side: the Triton kernel the engine runs
(`engine/kernels/paged_prefill.py`) against PyTorch's SDPA over the gathered blocks (the
portable path) with its default backend (cuDNN on an H200) and with the memory-efficient one.

For each group shape (sequences x new tokens after cached ones, Llama-2-7B's and Llama-3-8B's
heads) it prints the first call of the shape (what a server pays for a prompt length it has not
seen: SDPA's cuDNN backend builds a plan then) and the warm time per call, and their ratios.

    python benchmarks/prefill_attention.py --out benchmarks/results/prefill_attention_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.forward_context import AttentionBatch
from engine.kernels.paged_prefill import paged_prefill_attention
from engine.layers.attention import Attention

BLOCK_SIZE = 16
# (sequences, tokens already cached per sequence, new tokens per sequence)
SHAPES = [(1, 0, 93), (1, 0, 2048), (16, 0, 128), (4, 0, 500), (2, 1000, 1000), (8, 300, 77)]
HEADS = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}


def group(seqs: int, cached: int, new: int, kv_heads: int, device) -> tuple:
    """A prefill group over shuffled cache blocks: (cache, batch)."""
    per_seq = -(-(cached + new) // BLOCK_SIZE)
    blocks = torch.randperm(seqs * per_seq + 8, device=device)
    cache = torch.randn(2, seqs * per_seq + 8, BLOCK_SIZE, kv_heads, 128, device=device,
                        dtype=torch.bfloat16)  # fmt: skip
    tables = blocks[: seqs * per_seq].view(seqs, per_seq)
    flat = torch.cat([torch.arange(j * new, (j + 1) * new) for j in range(seqs)]).to(device)
    positions = (cached + torch.arange(new, device=device)).repeat(seqs, 1)
    lens = torch.full((seqs,), cached + new, device=device)
    return cache, AttentionBatch(0, seqs * new, flat, positions, tables, lens)


def calls(attn: Attention, q: torch.Tensor, cache: torch.Tensor, batch: AttentionBatch):
    """The group's attention three ways: our kernel, SDPA's default backend, SDPA's
    memory-efficient one (both over the gathered blocks and a boolean mask, as the portable
    path runs them)."""

    def ours():
        return paged_prefill_attention(
            q, cache[0], cache[1], batch.flat_index, batch.query_positions, batch.block_tables,
            batch.context_lens, attn.scale,
        )  # fmt: skip

    def sdpa():
        return attn._attend(q, cache[0], cache[1], batch)

    def efficient():
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return attn._attend(q, cache[0], cache[1], batch)

    return ours, sdpa, efficient


def timed(call, repeats: int = 10) -> tuple[float, float]:
    """(first call ms, median warm call ms)."""
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return round(times[0], 3), round(sorted(times[1:])[repeats // 2], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    rows = []
    for model, (heads, kv_heads) in HEADS.items():
        attn = Attention(heads, 128, kv_heads, 128**-0.5)
        for seqs, cached, new in SHAPES:
            cache, batch = group(seqs, cached, new, kv_heads, device)
            q = torch.randn(seqs * new, heads, 128, device=device, dtype=torch.bfloat16)

            ours, sdpa, efficient = calls(attn, q, cache, batch)
            row = {"model": model, "seqs": seqs, "cached": cached, "new": new}
            row["ours_first_ms"], row["ours_ms"] = timed(ours)
            row["sdpa_first_ms"], row["sdpa_ms"] = timed(sdpa)
            try:
                row["efficient_first_ms"], row["efficient_ms"] = timed(efficient)
            except RuntimeError:  # no memory-efficient kernel for this GQA shape
                row["efficient_first_ms"] = row["efficient_ms"] = None
            err = (ours().float() - sdpa().float()).abs().max().item()
            row["max_abs_diff_vs_sdpa"] = round(err, 4)
            row["sdpa_over_ours"] = round(row["sdpa_ms"] / row["ours_ms"], 2)
            first_ratio = row["sdpa_first_ms"] / row["ours_first_ms"]
            row["sdpa_first_over_ours_first"] = round(first_ratio, 1)
            rows.append(row)
            print(
                f"{model} {seqs:>2} x ({cached:>4} + {new:>4}): ours {row['ours_ms']:7.3f} ms "
                f"(first {row['ours_first_ms']:7.2f})  sdpa {row['sdpa_ms']:7.3f} "
                f"(first {row['sdpa_first_ms']:7.2f})  efficient {row['efficient_ms']}  "
                f"| sdpa/ours x{row['sdpa_over_ours']}  diff {row['max_abs_diff_vs_sdpa']}",
                flush=True,
            )
    if args.out:
        result = {
            "benchmark": "prefill_attention", "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "block_size": BLOCK_SIZE, "head_dim": 128, "rows": rows,
        }  # fmt: skip
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
