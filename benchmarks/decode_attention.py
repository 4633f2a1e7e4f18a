"""Decode attention over the paged KV cache, side by side: the Triton kernel as the engine runs
it in a decode step (`paged_decode_attention`; where the context is split, few sequences, with
the step's rotary embedding and cache write fused in) over a bf16 cache and over fp8 ones
(kv_cache_dtype), against PyTorch's SDPA over the cache gathered token by token and widened to
bf16 (a timing reference only: no rotary, no cache write).

For each batch (Llama-2-7B's 32 heads, no GQA: each sequence reads its whole context's keys and
values; contexts of 129-256 tokens, as the end-to-end benchmark's 128 + 128) it prints the time
per call of one layer and the cache bytes read per second. An fp8 cache is also timed with each
kind of dots, fp16 and bf16 (`FP16_DOTS`; the launcher takes fp16 for e4m3, bf16 for e5m2), so
the run shows what the fp16 dots buy; `--launch-variants` also times other tiles,
warp counts and register caps (LAUNCH_VARIANTS).

    python benchmarks/decode_attention.py --launch-variants \
        --out benchmarks/results/decode_attention_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import triton

import engine.kernels.paged_attention as paged_attention
from engine.kernels.paged_attention import NewTokens, default_num_splits, paged_decode_attention

BLOCK_SIZE = 16
HEADS, HEAD_DIM = 32, 128
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn,
                "fp8_e5m2": torch.float8_e5m2}  # fmt: skip


# Launches other than the shipped one, timed with --launch-variants: (tokens per tile, warps,
# register cap). In an sm_90 compile the one-split launch (batch 16 and up) takes 168 registers
# over an fp8 cache, three programs an SM (128 over a bf16 one, four); capped at 128 it does not
# spill.
LAUNCH_VARIANTS = {
    "tile32": (32, 4, None), "maxnreg128": (64, 4, 128), "tile128_warps8": (128, 8, None),
    "tile128_warps8_maxnreg128": (128, 8, 128),
}  # fmt: skip


class _Overridden:
    """`_paged_decode` with some launch arguments replaced."""

    def __init__(self, kernel, overrides: dict):
        self.kernel, self.overrides = kernel, overrides

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{**kwargs, **self.overrides})


@contextlib.contextmanager
def launched_with(tile: int | None = None, **overrides):
    """paged_decode_attention's kernel launched with `overrides` (FP16_DOTS, num_warps, maxnreg)
    and `tile` tokens per tile."""
    kernel, decode_tile = paged_attention._paged_decode, paged_attention.decode_tile
    paged_attention._paged_decode = _Overridden(kernel, overrides)
    if tile is not None:
        paged_attention.decode_tile = lambda block_size: tile
    try:
        yield
    finally:
        paged_attention._paged_decode, paged_attention.decode_tile = kernel, decode_tile


def decode_step(batch: int, cache_dtype: torch.dtype, device: torch.device):
    """A decode step's attention inputs over shuffled cache blocks: the kernel's call, SDPA's
    call, the bytes of cache the kernel reads and its split count."""
    contexts = torch.randint(129, 257, (batch,)).tolist()
    per_seq = -(-max(contexts) // BLOCK_SIZE)
    num_blocks = batch * per_seq + 1
    shape = (num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, device=device, dtype=torch.bfloat16).to(cache_dtype)
    value_cache = torch.randn(shape, device=device, dtype=torch.bfloat16).to(cache_dtype)
    tables = torch.randperm(num_blocks - 1, device=device)[: batch * per_seq].view(batch, -1)
    lens = torch.tensor(contexts, device=device)  # int64, as the engine passes them
    positions = lens - 1
    slots = tables.gather(1, (positions // BLOCK_SIZE)[:, None])[:, 0] * BLOCK_SIZE
    slots += positions % BLOCK_SIZE
    angles = torch.arange(512, device=device)[:, None] * torch.rand(HEAD_DIM // 2, device=device)
    q, k, v = torch.randn(3, batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
    new = NewTokens(positions, angles.cos(), angles.sin(), k.flatten(1), v.flatten(1), slots)
    splits = default_num_splits(batch, HEADS, device, max(contexts), BLOCK_SIZE)
    scale = HEAD_DIM**-0.5

    def ours():
        return paged_decode_attention(
            q, key_cache, value_cache, tables, lens, scale, None, splits,
            rotary=new if splits > 1 else None,
        )  # fmt: skip

    def sdpa():  # the cached context gathered, one sequence padded to the longest
        index = torch.arange(per_seq * BLOCK_SIZE, device=device)
        rows = tables[:, index // BLOCK_SIZE] * BLOCK_SIZE + index % BLOCK_SIZE
        keys = key_cache.flatten(0, 1)[rows].to(torch.bfloat16).transpose(1, 2)
        values = value_cache.flatten(0, 1)[rows].to(torch.bfloat16).transpose(1, 2)
        mask = (index[None, :] < lens[:, None])[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], keys, values, attn_mask=mask, scale=scale
        )

    cache_bytes = 2 * sum(contexts) * HEADS * HEAD_DIM * key_cache.element_size()
    return ours, sdpa, cache_bytes, splits


def microseconds(call) -> float:
    """Median time per call; do_bench clears the L2 cache between calls, as a step's other
    kernels would."""
    return round(triton.testing.do_bench(call, warmup=25, rep=200, return_mode="median") * 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--launch-variants", action="store_true", help="also LAUNCH_VARIANTS")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for batch in args.batch_sizes:
        for name, dtype in CACHE_DTYPES.items():
            torch.manual_seed(batch)  # the same contexts for every cache type
            ours, sdpa, cache_bytes, splits = decode_step(batch, dtype, device)
            row = {"batch": batch, "cache": name, "splits": splits, "cache_MB": cache_bytes / 1e6}
            row["ours_us"] = microseconds(ours)
            row["ours_TB_s"] = round(cache_bytes / row["ours_us"] / 1e6, 2)
            if dtype != torch.bfloat16:  # both dots, whichever the launcher picks
                for dots, fp16 in (("fp16_dots", True), ("bf16_dots", False)):
                    with launched_with(FP16_DOTS=fp16):
                        row[f"{dots}_us"] = microseconds(ours)
                ratio = row["bf16_dots_us"] / row["fp16_dots_us"]
                row["bf16_dots_over_fp16_dots"] = round(ratio, 2)
            if args.launch_variants:
                expected = ours().float()
                for variant, (tile, warps, maxnreg) in LAUNCH_VARIANTS.items():
                    cap = {"maxnreg": maxnreg} if maxnreg else {}
                    with launched_with(tile, num_warps=warps, **cap):
                        row[f"{variant}_us"] = microseconds(ours)
                        diff = (ours().float() - expected).abs().max().item()
                    row[f"{variant}_max_abs_diff"] = round(diff, 4)
            row["sdpa_gathered_us"] = microseconds(sdpa)
            row["sdpa_over_ours"] = round(row["sdpa_gathered_us"] / row["ours_us"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    for batch in args.batch_sizes:
        bf16 = next(r for r in rows if r["batch"] == batch and r["cache"] == "bf16")
        for row in rows:
            if row["batch"] == batch and row["cache"] != "bf16":
                row["bf16_cache_over_ours"] = round(bf16["ours_us"] / row["ours_us"], 2)
    if args.out:
        result = {
            "benchmark": "decode_attention", "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "block_size": BLOCK_SIZE,
            "heads": HEADS, "head_dim": HEAD_DIM, "contexts": "129-256 tokens", "rows": rows,
        }  # fmt: skip
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
