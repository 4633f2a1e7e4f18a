"""What each piece of a decode step costs, on a GPU: engines whose CUDA graphs were captured with
one piece left out (its output left unwritten: the tokens are wrong, the timing is what counts)
or re-configured, measured in turn, a few rounds. The difference from `base` is the piece's
marginal cost in the step, which a kernel profile cannot give with programmatic dependent
launches (kernels overlap their neighbours).

    python benchmarks/step_ablation.py --model /tmp/llama2-7b --batch-size 1 \
        --variants base no_norm no_attention no_4bit_matmul attention_splits_8 \
        --out benchmarks/results/decode_step_ablation_h200_b1.json
    python benchmarks/step_ablation.py --model /tmp/llama2-7b --batch-size 64 --kv-cache-gib 10 \
        --variants base no_norm no_attention no_4bit_matmul \
        --out benchmarks/results/decode_step_ablation_h200_b64.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
from profile_decode import generate, replay_ms

import engine.kernels.fused_ops as fused_ops
import engine.kernels.matmul_4bit as matmul_4bit
import engine.kernels.paged_attention as paged_attention
from engine import LLM

ORIGINAL = {
    (fused_ops, "rms_norm"): fused_ops.rms_norm,
    (paged_attention, "paged_decode_attention"): paged_attention.paged_decode_attention,
    (paged_attention, "default_num_splits"): paged_attention.default_num_splits,
    (matmul_4bit, "matmul_4bit"): matmul_4bit.matmul_4bit,
}


def no_norm(x, weight, eps, residual=None):
    return x


def no_attention(q, *args, **kwargs):
    return torch.empty_like(q)


def no_matmul(x, packed, absmax, table, shape, blocksize, config=None, silu_and_mul=False):
    n = shape[0] // 2 if silu_and_mul else shape[0]
    return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)


def fixed_splits(n: int) -> Callable:
    return lambda *args, **kwargs: n


VARIANTS: dict[str, dict[tuple, Callable]] = {
    "base": {},
    "no_norm": {(fused_ops, "rms_norm"): no_norm},
    "no_attention": {(paged_attention, "paged_decode_attention"): no_attention},
    "no_norm_no_attention": {
        (fused_ops, "rms_norm"): no_norm,
        (paged_attention, "paged_decode_attention"): no_attention,
    },
    "no_4bit_matmul": {(matmul_4bit, "matmul_4bit"): no_matmul},
    "attention_splits_2": {(paged_attention, "default_num_splits"): fixed_splits(2)},
    "attention_splits_4": {(paged_attention, "default_num_splits"): fixed_splits(4)},
    "attention_splits_8": {(paged_attention, "default_num_splits"): fixed_splits(8)},
}


def patch(variant: dict[tuple, Callable]) -> None:
    for (module, name), original in ORIGINAL.items():
        setattr(module, name, variant.get((module, name), original))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-cache-gib", type=float, default=4.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    batch = args.batch_size

    engines = {}
    for name in args.variants:
        patch(VARIANTS[name])  # the graphs capture the patched pieces
        engines[name] = LLM(
            model=args.model, quantization="bitsandbytes", dtype="bfloat16",
            max_num_seqs=batch, kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        )  # fmt: skip
        generate(engines[name], batch, 3, args.prompt_len)
    results = {name: {"step_ms": [], "replay_ms": []} for name in engines}
    for _ in range(args.rounds):
        for name, llm in engines.items():
            patch(VARIANTS[name])  # eager steps (prefill) too
            whole = generate(llm, batch, args.output_len + 1, args.prompt_len)
            prefill = generate(llm, batch, 1, args.prompt_len)
            results[name]["step_ms"].append(round((whole - prefill) / args.output_len * 1e3, 4))
            results[name]["replay_ms"].append(round(replay_ms(llm, batch), 4))
            print(name, results[name]["step_ms"][-1], results[name]["replay_ms"][-1], flush=True)
    patch({})
    base = min(results["base"]["step_ms"]) if "base" in results else None
    for row in results.values():
        row["step_ms_min"] = min(row["step_ms"])
        row["replay_ms_min"] = min(row["replay_ms"])
        if base is not None:
            row["step_ms_vs_base"] = round(row["step_ms_min"] - base, 4)
    print(json.dumps(results, indent=1))
    if args.out:
        meta = {"model": args.model, "batch_size": batch, "prompt_len": args.prompt_len,
                "output_len": args.output_len, "kv_cache_gib": args.kv_cache_gib}  # fmt: skip
        args.out.write_text(json.dumps({**meta, "variants": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
