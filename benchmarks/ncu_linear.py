"""A driver for Nsight Compute: runs the engine's tuned 4-bit matmul on each Llama-2-7B layer at
the given batch sizes, over weight copies that stream from HBM, so `ncu` can profile the very
launches a decode step makes (issue-slot use, stall reasons, DRAM throughput).

    ncu --kernel-name regex:4bit --launch-skip 8 --launch-count 4 --section SpeedOfLight \
        --section WarpStateStats python benchmarks/ncu_linear.py --batch-sizes 1
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.llama2_7b_layers import LLAMA2_7B, quantized_layer, weight_copies
from engine.kernels.matmul_4bit import choose_config, matmul_4bit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    layers = {name: quantized_layer(n, k, device) for name, (n, k) in LLAMA2_7B.items()}
    copies = {name: weight_copies(layer) for name, layer in layers.items()}
    for m in args.batch_sizes:
        for name, (n, k) in LLAMA2_7B.items():
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            config = choose_config(m, n, k, device)
            print(f"batch {m} {name} {n}x{k}: {config}", flush=True)
            for _ in range(args.rounds):
                for packed, absmax in copies[name]:
                    matmul_4bit(x, packed, absmax, layers[name].table, (n, k), 64, config)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
