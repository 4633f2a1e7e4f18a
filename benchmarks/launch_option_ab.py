"""One switch of the fused 4-bit launches (a boolean `KernelConfig` field, say `pair_words`, or
several joined by "+"), off and on, on the launches the shipped table names for each Llama-2-7B
layer at each batch size: time per layer (in a CUDA graph, weights streamed from HBM) and
relative error against bitsandbytes' dequantization. Launches the switch does not apply to are
left out.

    python benchmarks/launch_option_ab.py pair_words --out benchmarks/results/ab_pair_words_b1.json
    python benchmarks/launch_option_ab.py pair_words --batch-sizes 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path

import torch

from benchmarks.graph_timing import time_in_graph
from benchmarks.llama2_7b_layers import LLAMA2_7B, quantized_layer, weight_copies
from engine.kernels.matmul_4bit import fits, kernel_for, matmul_4bit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("option", help="a boolean KernelConfig field, or several joined by +")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    layers = {name: quantized_layer(n, k, device) for name, (n, k) in LLAMA2_7B.items()}
    results = []
    for m in args.batch_sizes:
        rows = {}
        for name, (n, k) in LLAMA2_7B.items():
            layer = layers[name]
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            expected = x.float() @ layer.reference.float().T
            shipped = kernel_for(m, n, k, device)
            if shipped is None:
                continue
            for on in (False, True):
                config = dataclasses.replace(shipped, **dict.fromkeys(args.option.split("+"), on))
                if not fits(config, m, k, device):
                    break
                out = matmul_4bit(x, layer.packed, layer.absmax, layer.table, (n, k), 64, config)
                err = ((out.float() - expected).norm() / expected.norm()).item()
                calls = [
                    functools.partial(matmul_4bit, x, p, a, layer.table, (n, k), 64, config)
                    for p, a in weight_copies(layer)
                ]
                rows[f"{name} {args.option}={on}"] = {
                    "us": round(time_in_graph(calls) * 1e3, 2), "relative_error": err,
                    "kernel": config.kernel,
                }  # fmt: skip
        totals = {
            on: round(sum(v["us"] for key, v in rows.items() if key.endswith(f"={on}")), 2)
            for on in (False, True)
        }
        results.append({"batch_size": m, "layers": rows, "layer_sum_us": totals})
        print(m, json.dumps(totals), flush=True)
    result = {"option": args.option, "rows": results}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
