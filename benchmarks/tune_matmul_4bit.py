"""Measures the fused 4-bit matmul's launch configs on this GPU and writes the fastest per batch
bucket (and per layer shape) to engine/kernels/configs/<gpu>.json, which the kernel reads.

    python benchmarks/tune_matmul_4bit.py --out-dir engine/kernels/configs

Candidates compile in parallel processes first (Triton's disk cache), then each is checked
against bitsandbytes' dequantization (a wrong one is dropped) and timed with
`graph_timing.time_in_graph` (CUDA graph replay, weights streamed from HBM as in a decode
step) on NF4 weights of every Llama-2-7B linear layer. bitsandbytes' own matmul_4bit is a
candidate too: where it wins, the engine uses it. So are the launches the current table names
for a bucket, so a re-tune limited to some kernel kinds (`--kernels`) keeps a faster launch of
another kind. `--twins` is a focused A/B: the table's launches against the same plain
warpgroup launches with their MMAs kept in flight (`mma_in_flight`)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch
import triton

from benchmarks.graph_timing import time_in_graph
from benchmarks.llama2_7b_layers import LLAMA2_7B, quantized_layer, weight_copies
from engine.kernels.matmul_4bit import (
    DECODE_WARPS,
    M_BUCKETS,
    KernelConfig,
    config_to_json,
    fits,
    launch_table_path,
    matmul_4bit,
    own_table_path,
)

# gemv thread shapes: (num_warps, threads_n, warps_n); K per step = 32 * (32 / threads_n) *
# (num_warps / warps_n) values.
GEMV_SHAPES = [(1, 1, 1), (2, 1, 1), (4, 1, 1), (2, 2, 1), (4, 2, 1), (4, 4, 1), (8, 2, 1),
               (8, 4, 1), (4, 1, 2), (8, 1, 2), (8, 1, 4), (4, 2, 2), (4, 4, 4), (8, 2, 4),
               (4, 8, 4), (8, 4, 8)]  # fmt: skip


def candidates(m: int, kinds: list[str] | None = None) -> list[KernelConfig]:
    """The launches to measure for M rows (of the kernel kinds in `kinds`, default all)."""
    out = _all_candidates(m)
    return [c for c in out if kinds is None or c.kernel in kinds]


def _all_candidates(m: int) -> list[KernelConfig]:
    out = []
    if m <= 8:
        bm = triton.next_power_of_2(m)
        for warps, threads_n, warps_n in GEMV_SHAPES:
            # Through the fp32 or the fp16 byte table, or (one row of x) packed fp16 FMAs.
            tables = ((False, False), (True, False)) + (((True, True),) if bm == 1 else ())
            for rows, (half, packed) in itertools.product((1, 2, 4, 8), tables):
                if rows * bm <= 8:
                    block_n = rows * threads_n * warps_n
                    # Persistent programs (a few per SM) for the packed launches, through the
                    # fp16 table or its wide layout, one or two words per fp16 chain.
                    packed_options = (False, True) if packed else (False,)
                    # Several rows of x: their pairs requested an iteration ahead, or not.
                    ahead_options = (False, True) if bm > 1 else (False,)
                    for per_sm, wide, pair, ahead in itertools.product(
                        (0, 1, 2, 4) if packed else (0,), packed_options, packed_options,
                        ahead_options,
                    ):  # fmt: skip
                        out.append(
                            KernelConfig("gemv", bm, block_n, num_warps=warps,
                                         threads_n=threads_n, warps_n=warps_n, half_table=half,
                                         packed_fma=packed, programs_per_sm=per_sm,
                                         wide_table=wide, pair_words=pair, x_ahead=ahead)
                        )  # fmt: skip
    if m <= 64:
        # Tensor cores from registers, 16 weight rows per warp, the whole batch in one tile;
        # num_stages 4: the next iteration's weight bytes requested before this one's decode.
        bm = max(8, triton.next_power_of_2(m))
        splits = (1, 2, 4, 8, 16) if m <= 16 else (1, 2, 4, 8)
        for warps, split, stages in itertools.product((1, 2, 4, 8), splits, (2, 4)):
            out.append(KernelConfig("mma", bm, 16 * warps, 0, split, warps, stages))
    # Hopper: the Gluon kernel staging decoded weights for warpgroup MMAs; the weights as the
    # MMA's 64-row side at any batch, x as it from 32 rows up. `fits` drops tiles it cannot run.
    splits = (1, 2, 4) if m <= 64 else (1, 2)
    w_left_bm = min(max(8, triton.next_power_of_2(m)), 128)  # the batch as the MMA's N
    for bn, bk, split, warps, stages in itertools.product(
        (64, 128, 256), (64, 128), splits, (4, 8), (3, 4, 6)
    ):
        out.append(KernelConfig("wgmma", w_left_bm, bn, bk, split, warps, stages, w_left=True))
        if m >= 32:
            bm = 16 * warps
            out.append(KernelConfig("wgmma", bm, bn, bk, split, warps, stages, w_left=False))
    # Each with its MMAs left in flight across the next step's decode, too.
    out += [dataclasses.replace(c, mma_in_flight=True) for c in out if c.kernel == "wgmma"]
    # Warp-specialized: decoder warps beside one MMA warpgroup, up to decode_tiles steps ahead
    # of it, copies num_stages - decode_tiles steps ahead.
    if m >= 16:
        for bn, bk, split, (stages, tiles), decoders in itertools.product(
            (64, 128, 256), (64, 128), splits, ((4, 2), (6, 2)), DECODE_WARPS[-1:]
        ):  # 8 decoder warps and 2 tiles: faster than 4 warps, or 3 tiles, wherever measured
            ws = dict(decode_warps=decoders, decode_tiles=tiles)
            out.append(
                KernelConfig("wgmma", w_left_bm, bn, bk, split, 4, stages, w_left=True, **ws)
            )
            if m >= 64:
                out.append(KernelConfig("wgmma", 64, bn, bk, split, 4, stages, w_left=False, **ws))
        # Fed by TMA: one loader warp instead of the decoders' per-thread copies (128-value
        # steps won every bucket where 64 were measured too).
        for bn, split, stages, decoders in itertools.product(
            (64, 128), splits, (4, 6), DECODE_WARPS
        ):
            bk = 128
            tma = dict(decode_warps=decoders, tma=True)
            out.append(
                KernelConfig("wgmma", w_left_bm, bn, bk, split, 4, stages, w_left=True, **tma)
            )
            if m >= 64:
                out.append(KernelConfig("wgmma", 64, bn, bk, split, 4, stages, w_left=False, **tma))
    # Hopper: warpgroup MMAs with the decoded weights in registers (16 rows a warp), the batch
    # as the MMAs' N (at 128 and 256 rows a first version was far slower than the staged
    # kernels: benchmarks/results/trials/wgmma_rs_first_run_h100.json).
    if 16 <= m <= 64:
        rs_bm = triton.next_power_of_2(m)
        for warps, split, stages in itertools.product((4, 8), splits, (2, 3, 4, 5)):
            out.append(KernelConfig("wgmma_rs", rs_bm, 16 * warps, 128, split, warps, stages))
    # At most 128 fp32 accumulators per thread: more spill.
    out = [c for c in out if c.kernel != "wgmma" or c.block_m * c.block_n <= 4096 * c.num_warps]
    if m >= 8:
        # The portable Triton kernel, W as the left operand (registers) or the right one.
        for w_left in (True, False):
            bm = min(max(triton.next_power_of_2(m), 16), 128) if w_left else 64
            for bn in (64, 128):
                for bk in (64, 128):
                    split = 4 if m <= 64 else 1
                    out.append(KernelConfig("gemm", bm, bn, bk, split, 4, 3, w_left=w_left))
    device = torch.device("cuda")
    hopper = ("wgmma", "wgmma_rs", "mma")
    return [c for c in out if c.kernel not in hopper or fits(c, m, 4096, device)]


def incumbents(table_path: Path | None, m: int) -> list[KernelConfig]:
    """The fused launches a launch table names for bucket m (its bucket entry and per-layer
    entries), measured beside the new candidates: a re-tune limited to some kernel kinds
    (`--kernels`) then keeps a faster launch of another kind, and a hand edit (the table's
    `edits`) stays where it still wins."""
    if table_path is None:
        return []
    entries = json.loads(table_path.read_text())["configs"]
    out = []
    for key, entry in entries.items():
        config = KernelConfig(**entry)
        if key.split(":")[0] == str(m) and config.kernel != "bitsandbytes" and config not in out:
            out.append(config)
    return out


def twins(table_path: Path | None, m: int) -> list[KernelConfig]:
    """`--twins`: the table's launches for bucket m and, for each plain warpgroup launch among
    them, the same launch at its own stage count and at 3, 4 and 6, each with its MMAs waited
    for after the decode and left in flight across it (a focused A/B: a few launches, where the
    full candidate list has hundreds)."""
    table = incumbents(table_path, m)
    out = list(table)
    for config in table:
        if config.kernel == "wgmma" and not config.decode_warps:
            for stages, in_flight in itertools.product((config.num_stages, 3, 4, 6), (False, True)):
                twin = dataclasses.replace(config, num_stages=stages, mma_in_flight=in_flight)
                if twin not in out:
                    out.append(twin)
    return out


def bnb_times(weights: dict, copies: dict, x: dict) -> dict[str, float]:
    """bitsandbytes' matmul_4bit per layer (ms), called as the engine's fallback calls it (a
    plain state over the de-nested fp32 absmax, engine/layers/quant/bitsandbytes.py): the bar a
    fused config must beat."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    times = {}
    for name, (n, k) in LLAMA2_7B.items():
        code = weights[name].state.code
        calls = []
        for packed, absmax in copies[name]:
            state = bnbF.QuantState(
                absmax=absmax, shape=torch.Size((n, k)), code=code, blocksize=64,
                quant_type="nf4", dtype=torch.bfloat16,
            )  # fmt: skip
            calls.append(functools.partial(bnb.matmul_4bit, x[k], packed.view(-1, 1), state))
        times[name] = time_in_graph(calls)
    return times


def _compile_worker(jobs: list[tuple[int, tuple[int, int], dict]]) -> int:
    device = torch.device("cuda")
    failures = 0
    weights = {}
    for m, (n, k), cfg in jobs:
        if (n, k) not in weights:
            weights[n, k] = quantized_layer(n, k, device)
        packed, absmax, table, _, _ = weights[n, k]
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        try:
            matmul_4bit(x, packed, absmax, table, (n, k), 64, KernelConfig(**cfg))
        except Exception:  # noqa: BLE001 - reported by the timing pass
            failures += 1
    torch.cuda.synchronize()
    return failures


def precompile(jobs: list[tuple[int, tuple[int, int], dict]], workers: int) -> None:
    """Fill Triton's disk cache from several processes (compiling is CPU-bound and serial)."""
    # Jobs are bucket x candidate x two K shapes; the cache keys on specializations, so
    # duplicates compile once and then hit the cache.
    ctx = mp.get_context("spawn")
    chunks = [jobs[i::workers] for i in range(workers)]
    with ctx.Pool(workers) as pool:
        failures = sum(pool.map(_compile_worker, chunks))
    print(f"precompiled {len(jobs)} launches ({failures} failed)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("engine/kernels/configs"))
    parser.add_argument("--buckets", type=int, nargs="+", default=list(M_BUCKETS))
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--kernels", nargs="+", help="only these kernel kinds (default: all)")
    parser.add_argument(
        "--twins", action="store_true",
        help="measure the table's launches and their in-flight twins (mma_in_flight), and "
        "of the full candidate list only the --kernels kinds, if named",
    )  # fmt: skip
    args = parser.parse_args()
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    path = own_table_path(gpu, args.out_dir)
    # This GPU's table, or the one it borrows from a GPU of its architecture until now.
    previous = path if path.exists() else launch_table_path(gpu, capability)
    start = time.time()

    bucket_candidates = {}
    for m in args.buckets:
        if args.twins:  # with --kernels, those kinds' candidates as well
            if previous is None:
                parser.error("--twins pairs the launches of a table, and this GPU has none")
            pairs = [c for c in twins(previous, m) if fits(c, m, 4096, device)]
            more = candidates(m, args.kernels) if args.kernels else []
            bucket_candidates[m] = pairs + [c for c in more if c not in pairs]
            continue
        new = candidates(m, args.kernels)
        bucket_candidates[m] = new + [c for c in incumbents(previous, m) if c not in new]

    jobs = []
    for m in args.buckets:
        for cfg in bucket_candidates[m]:
            # One representative shape per K: Triton specializes on divisibility, not size.
            for n, k in {(4096, 4096), (4096, 11008)}:
                jobs.append((m, (n, k), config_to_json(cfg)))
    precompile(jobs, args.workers)
    print(f"compile pass: {time.time() - start:.0f} s", flush=True)

    weights = {name: quantized_layer(n, k, device) for name, (n, k) in LLAMA2_7B.items()}
    copies = {name: weight_copies(layer) for name, layer in weights.items()}
    table_out: dict[str, dict] = {}
    measurements = []
    for m in args.buckets:
        x = {
            k: torch.randn(m, k, dtype=torch.bfloat16, device=device) for _, k in LLAMA2_7B.values()
        }
        expected = {
            name: x[k].float() @ weights[name].reference.float().T
            for name, (_, k) in LLAMA2_7B.items()
        }
        totals: dict[KernelConfig, float] = {}
        best: dict[str, tuple[float, KernelConfig]] = {}
        for cfg in bucket_candidates[m]:
            total = 0.0
            try:
                for name, (n, k) in LLAMA2_7B.items():
                    packed, absmax, table, _, _ = weights[name]
                    out = matmul_4bit(x[k], packed, absmax, table, (n, k), 64, cfg).float()
                    err = (out - expected[name]).norm() / expected[name].norm()
                    if not err < 1e-2:
                        raise ValueError(f"wrong result on {name}: relative error {err:.2e}")
                    calls = [
                        functools.partial(matmul_4bit, x[k], p, a, table, (n, k), 64, cfg)
                        for p, a in copies[name]
                    ]
                    ms = time_in_graph(calls)
                    total += ms
                    if name not in best or ms < best[name][0]:
                        best[name] = (ms, cfg)
                    measurements.append({"m": m, "layer": name, **config_to_json(cfg), "ms": ms})
            except Exception as exc:  # noqa: BLE001 - a config that fails is left out
                print(f"m={m} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            totals[cfg] = total
        bnb_ms = bnb_times(weights, copies, x)
        bnb_cfg = KernelConfig("bitsandbytes")
        for name, ms in bnb_ms.items():
            measurements.append({"m": m, "layer": name, "kernel": "bitsandbytes", "ms": ms})
            if name not in best or ms < best[name][0]:
                best[name] = (ms, bnb_cfg)
        overall = min(totals, key=totals.get) if totals else bnb_cfg
        if not totals or sum(bnb_ms.values()) < totals[overall]:
            overall = bnb_cfg
        table_out[str(m)] = config_to_json(overall)
        for name, (n, k) in LLAMA2_7B.items():
            if best[name][1] != overall:
                table_out[f"{m}:{n}x{k}"] = config_to_json(best[name][1])
        ours = {name: round(best[name][0] * 1e3, 1) for name in LLAMA2_7B}
        theirs = {name: round(ms * 1e3, 1) for name, ms in bnb_ms.items()}
        print(
            f"m={m}: bucket config {overall}; best us per layer {ours} (bitsandbytes {theirs})",
            flush=True,
        )
        # How each kernel kind fared: its best whole-layer time (us) in this bucket.
        by_kind: dict[str, float] = {}
        for cfg, total in totals.items():
            kind = cfg.kernel + ("-half" if cfg.half_table else "")
            kind += "-packed" if cfg.packed_fma else ""
            kind += "-persistent" if cfg.programs_per_sm else ""
            kind += "-wide" if cfg.wide_table else ""
            kind += "-pairs" if cfg.pair_words else ""
            kind += f"-ws{cfg.decode_warps}x{cfg.decode_tiles}" if cfg.decode_warps else ""
            kind += "-tma" if cfg.tma else ""
            kind += "-in-flight" if cfg.mma_in_flight else ""
            by_kind[kind] = min(by_kind.get(kind, float("inf")), total * 1e3)
        by_kind["bitsandbytes"] = sum(bnb_ms.values()) * 1e3
        print(f"m={m}: best per kernel {json.dumps({k: round(v, 1) for k, v in by_kind.items()})}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    # Re-tuning some buckets keeps the others' entries: this GPU's, or those it borrowed (which
    # the new file replaces).
    if previous is not None and set(args.buckets) != set(M_BUCKETS):
        kept = json.loads(previous.read_text())["configs"]
        retuned = {str(m) for m in args.buckets}
        kept = {key: cfg for key, cfg in kept.items() if key.split(":")[0] not in retuned}
        table_out = {**kept, **table_out}
    path.write_text(json.dumps({
        "gpu": gpu, "capability": list(capability),
        "torch": torch.__version__, "triton": triton.__version__,
        "command": "python benchmarks/tune_matmul_4bit.py", "configs": table_out,
    }, indent=1) + "\n")  # fmt: skip
    (args.out_dir / "measurements.json").write_text(json.dumps(measurements))
    print(f"wrote {path} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
