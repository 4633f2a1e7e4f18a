"""Per-layer linear time on Llama-2-7B shapes, side by side in one run: nibble's fused 4-bit
kernel vs bitsandbytes' `matmul_4bit` vs bf16 `torch.matmul`, with the copy bandwidth measured
in the same run as the ceiling. Each is timed as a decode step runs it: replayed in a CUDA graph,
over enough copies of the weights that they stream from HBM (`graph_timing.py`).

    python benchmarks/linear_4bit.py --out benchmarks/results/linear_4bit_h200.json
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import bitsandbytes as bnb
import torch
import triton

from benchmarks.graph_timing import copies_for, time_in_graph
from benchmarks.llama2_7b_layers import LLAMA2_7B, quantized_layer, weight_copies
from engine.kernels.matmul_4bit import choose_config, config_to_json, kernel_for, matmul_4bit


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of 2 GiB (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint16, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50, return_mode="median")
    return 2 * src.numel() * 2 / (ms / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s")

    layers = {}
    for name, (n, k) in LLAMA2_7B.items():
        layer = quantized_layer(n, k, device)
        layers[name] = {
            "copies": weight_copies(layer),
            "state": layer.state,
            "table": layer.table,
            # bnb's dequantized weight: a bf16 matrix of the same shape (timing ignores values)
            "bf16": [layer.reference.clone() for _ in range(copies_for(2 * n * k))],
        }

    rows = []
    for m in args.batch_sizes:
        total = {"ours": 0.0, "bnb": 0.0, "bf16": 0.0, "engine": 0.0}
        per_layer = {}
        for name, (n, k) in LLAMA2_7B.items():
            layer = layers[name]
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            state, table = layer["state"], layer["table"]
            copies = layer["copies"]
            times = {
                "ours": time_in_graph([
                    partial(matmul_4bit, x, p, a, table, (n, k), 64) for p, a in copies
                ]),
                "bnb": time_in_graph([
                    partial(bnb.matmul_4bit, x, p.view(-1, 1), state) for p, _ in copies
                ]),
                "bf16": time_in_graph([partial(torch.matmul, x, w.t()) for w in layer["bf16"]]),
            }  # fmt: skip
            # The engine runs the fused kernel where the tuned table names one, else bnb's.
            times["engine"] = times["ours"] if kernel_for(m, n, k, device) else times["bnb"]
            per_layer[name] = {
                **{f"{key}_us": round(v * 1e3, 2) for key, v in times.items()},
                "config": config_to_json(choose_config(m, n, k, device)),
            }
            for key, v in times.items():
                total[key] += v
        bytes_4bit = sum(n * k // 2 + n * k // 64 * 4 for n, k in LLAMA2_7B.values())
        ours_bw = bytes_4bit / (total["ours"] / 1e3)
        row = {
            "batch_size": m,
            "ours_us": round(total["ours"] * 1e3, 1),
            "bnb_us": round(total["bnb"] * 1e3, 1),
            "bf16_us": round(total["bf16"] * 1e3, 1),
            "engine_us": round(total["engine"] * 1e3, 1),
            "engine_over_bf16_time": round(total["engine"] / total["bf16"], 3),
            "ours_vs_bnb_speedup": round(total["bnb"] / total["ours"], 2),
            "ours_over_bf16_time": round(total["ours"] / total["bf16"], 3),
            "ours_4bit_bytes_GB_s": round(ours_bw / 1e9, 1),
            "ours_fraction_of_copy_bw": round(ours_bw / bandwidth, 3),
            "layers": per_layer,
        }
        rows.append(row)
        print(
            f"batch {m:>3}: ours {row['ours_us']:>8.1f} us  bnb {row['bnb_us']:>8.1f} us  "
            f"bf16 {row['bf16_us']:>8.1f} us  engine {row['engine_us']:>8.1f} us  "
            f"| vs bnb x{row['ours_vs_bnb_speedup']:.2f}  "
            f"ours/bf16 {row['ours_over_bf16_time']:.2f}  "
            f"{row['ours_4bit_bytes_GB_s']:.0f} GB/s = "
            f"{100 * row['ours_fraction_of_copy_bw']:.0f}% of copy",
            flush=True,
        )
    result = {
        "benchmark": "linear_4bit", "gpu": torch.cuda.get_device_name(device),
        "torch": torch.__version__, "triton": triton.__version__, "bitsandbytes": bnb.__version__,
        "copy_bandwidth_TB_s": round(bandwidth / 1e12, 3),
        "layer": "one Llama-2-7B decoder layer's linears (qkv, o, gate_up, down), NF4 + DQ",
        "command": "python benchmarks/linear_4bit.py", "rows": rows,
    }  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
