"""A driver for Nsight Compute: runs the engine's tuned 4-bit matmul on each Llama-2-7B layer at
the given batch sizes, over weight copies that stream from HBM, so `ncu` can profile the very
launches a decode step makes (issue-slot use, stall reasons, DRAM throughput).

    ncu --kernel-name regex:4bit --launch-skip 8 --launch-count 4 --section SpeedOfLight \
        --section WarpStateStats python benchmarks/ncu_linear.py --batch-sizes 1
"""

from __future__ import annotations

import argparse
import json

import torch

from benchmarks.llama2_7b_layers import LLAMA2_7B, quantized_layer, weight_copies
from engine.kernels.matmul_4bit import KernelConfig, choose_config, matmul_4bit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--layers", nargs="+", default=list(LLAMA2_7B), help="of " + str(list(LLAMA2_7B))
    )
    parser.add_argument("--config", help="a KernelConfig as JSON, instead of the tuned table's")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    layers = {name: quantized_layer(*LLAMA2_7B[name], device) for name in args.layers}
    copies = {name: weight_copies(layer) for name, layer in layers.items()}
    forced = KernelConfig(**json.loads(args.config)) if args.config else None
    for m in args.batch_sizes:
        for name in args.layers:
            n, k = LLAMA2_7B[name]
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            config = forced or choose_config(m, n, k, device)
            print(f"batch {m} {name} {n}x{k}: {config}", flush=True)
            for _ in range(args.rounds):
                for packed, absmax in copies[name]:
                    matmul_4bit(x, packed, absmax, layers[name].table, (n, k), 64, config)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
