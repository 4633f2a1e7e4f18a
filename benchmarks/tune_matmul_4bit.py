"""Measures the fused 4-bit matmul's launch configs on this GPU and writes the fastest per batch
bucket (and per layer shape) to engine/kernels/configs/<gpu>.json, which the kernel reads.

    python benchmarks/tune_matmul_4bit.py --out-dir engine/kernels/configs

Candidates compile in parallel processes first (Triton's disk cache), then each is timed with
`triton.testing.do_bench` (L2 flushed between runs, median) on random NF4 weights of every
Llama-2-7B linear layer."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch
import triton

from engine.kernels.matmul_4bit import (
    M_BUCKETS,
    KernelConfig,
    config_to_json,
    matmul_4bit,
    pair_table,
)

# Llama-2-7B linears as nibble runs them (q/k/v and gate/up merged): (N, K).
LLAMA2_7B = {
    "qkv": (12288, 4096),
    "o": (4096, 4096),
    "gate_up": (22016, 4096),
    "down": (4096, 11008),
}


def candidates(m: int) -> list[KernelConfig]:
    out = []
    if m <= 8:
        bm = triton.next_power_of_2(m)
        for bn in (4, 8, 16, 32):
            for groups in (1, 2, 4):
                for warps in (2, 4, 8):
                    if bm * bn * groups * 32 <= 32 * 32 * warps:  # accumulator: <= 32 per thread
                        out.append(KernelConfig("gemv", bm, bn, groups, 1, warps, 2))
    if m >= 2:
        bms = [min(max(triton.next_power_of_2(m), 16), 128)] + ([64] if m >= 256 else [])
        for bm in bms:
            bns = (32, 64, 128) if m <= 64 else (64, 128, 256)
            splits = (1, 2, 4) if m <= 64 else (1,)
            for bn in bns:
                for groups in (1, 2, 4):
                    for split in splits:
                        for stages in (3, 4) if m >= 16 else (3,):
                            warps = 4 if bm * bn <= 64 * 128 else 8
                            out.append(KernelConfig("gemm", bm, bn, groups, split, warps, stages))
    return out


def random_weight(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed bytes and absmax: timing does not depend on the values."""
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=device)
    absmax = torch.rand(n * k // 64, device=device) + 0.5
    code = torch.linspace(-1, 1, 16)
    return packed, absmax, pair_table(code, device)


def bnb_weight(n: int, k: int, device):
    import bitsandbytes.functional as bnbF

    w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    return bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


def bnb_time(m: int, weights: dict, x: dict) -> float:
    """bitsandbytes' matmul_4bit over the same layers (ms): the bar a fused config must beat."""
    import bitsandbytes as bnb

    total = 0.0
    for name, (_, k) in LLAMA2_7B.items():
        packed, state = weights[name]
        total += bench(lambda: bnb.matmul_4bit(x[k], packed, state))
    return total


def _compile_worker(jobs: list[tuple[int, tuple[int, int], dict]]) -> int:
    device = torch.device("cuda")
    failures = 0
    for m, (n, k), cfg in jobs:
        packed, absmax, table = random_weight(n, k, device)
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        try:
            matmul_4bit(x, packed, absmax, table, (n, k), 64, KernelConfig(**cfg))
        except Exception:  # noqa: BLE001 - reported by the timing pass
            failures += 1
    torch.cuda.synchronize()
    return failures


def precompile(jobs: list[tuple[int, tuple[int, int], dict]], workers: int) -> None:
    """Fill Triton's disk cache from several processes (compiling is CPU-bound and serial)."""
    # One job per distinct specialization: M in {1, multiple of 16, other}, same N/K classes.
    ctx = mp.get_context("spawn")
    chunks = [jobs[i::workers] for i in range(workers)]
    with ctx.Pool(workers) as pool:
        failures = sum(pool.map(_compile_worker, chunks))
    print(f"precompiled {len(jobs)} launches ({failures} failed)", flush=True)


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("engine/kernels/configs"))
    parser.add_argument("--buckets", type=int, nargs="+", default=list(M_BUCKETS))
    parser.add_argument("--workers", type=int, default=12)
    args = parser.parse_args()
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    start = time.time()

    jobs = []
    for m in args.buckets:
        for cfg in candidates(m):
            # One representative shape per K: Triton specializes on divisibility, not size.
            for n, k in {(4096, 4096), (4096, 11008)}:
                jobs.append((m, (n, k), config_to_json(cfg)))
    precompile(jobs, args.workers)
    print(f"compile pass: {time.time() - start:.0f} s", flush=True)

    weights = {name: random_weight(n, k, device) for name, (n, k) in LLAMA2_7B.items()}
    weights_bnb = {name: bnb_weight(n, k, device) for name, (n, k) in LLAMA2_7B.items()}
    table_out: dict[str, dict] = {}
    measurements = []
    for m in args.buckets:
        x = {
            k: torch.randn(m, k, dtype=torch.bfloat16, device=device) for _, k in LLAMA2_7B.values()
        }
        totals: dict[KernelConfig, float] = {}
        best: dict[str, tuple[float, KernelConfig]] = {}
        for cfg in candidates(m):
            total = 0.0
            try:
                for name, (n, k) in LLAMA2_7B.items():
                    packed, absmax, table = weights[name]
                    ms = bench(lambda: matmul_4bit(x[k], packed, absmax, table, (n, k), 64, cfg))
                    total += ms
                    if name not in best or ms < best[name][0]:
                        best[name] = (ms, cfg)
                    measurements.append({"m": m, "layer": name, **config_to_json(cfg), "ms": ms})
            except Exception as exc:  # noqa: BLE001
                print(f"m={m} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            totals[cfg] = total
        overall = min(totals, key=totals.get)
        bnb_total = bnb_time(m, weights_bnb, x)
        if bnb_total < totals[overall]:  # the engine keeps bitsandbytes' kernel for this bucket
            table_out[str(m)] = {"kernel": "bitsandbytes"}
            print(
                f"m={m}: bitsandbytes {bnb_total * 1e3:.1f} us beats the fused kernel", flush=True
            )
            continue
        table_out[str(m)] = config_to_json(overall)
        for name, (n, k) in LLAMA2_7B.items():
            ms, cfg = best[name]
            if cfg != overall:
                table_out[f"{m}:{n}x{k}"] = config_to_json(cfg)
        summary = {name: round(best[name][0] * 1e3, 1) for name in LLAMA2_7B}
        print(
            f"m={m}: best total {totals[overall] * 1e3:.1f} us {overall}; per layer us {summary}",
            flush=True,
        )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / (gpu.replace(" ", "_") + ".json")
    path.write_text(json.dumps({
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "command": "python benchmarks/tune_matmul_4bit.py", "configs": table_out,
    }, indent=1) + "\n")  # fmt: skip
    (args.out_dir / "measurements.json").write_text(json.dumps(measurements))
    print(f"wrote {path} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
