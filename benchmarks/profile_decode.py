"""Where a decode step's time goes, on a GPU: the CUDA-graph replay alone (the forward pass's GPU
time) against the whole engine step, and a per-kernel breakdown from torch.profiler (eager mode,
same kernels).

    python benchmarks/profile_decode.py --model /tmp/llama2-7b --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from engine import LLM, SamplingParams


def generate(llm: LLM, batch: int, output_len: int, prompt_len: int = 128) -> float:
    """Seconds to generate output_len tokens for each of `batch` prompts of prompt_len."""
    prompts = [{"prompt_token_ids": [5 + i % 200] * prompt_len} for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def replay_ms(llm: LLM, batch: int, reps: int = 50) -> float:
    """The graph of the last decode step `generate` ran, replayed alone."""
    runner = llm.llm_engine.runner.graphs
    graph, _ = runner.graph_for(batch, int(runner.inputs[3, :batch].max()))
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    kv = dict(kv_cache_memory_bytes=8 << 30, dtype="bfloat16", quantization="bitsandbytes")
    result: dict[str, object] = {"model": args.model, "rows": []}

    llm = LLM(model=args.model, **kv)
    for batch in args.batch_sizes:
        generate(llm, batch, 4)  # warm
        steps = 64
        elapsed = generate(llm, batch, steps + 1) - generate(llm, batch, 1)
        result["rows"].append({
            "batch_size": batch,
            "engine_step_ms": round(elapsed / steps * 1e3, 3),
            "graph_replay_ms": round(replay_ms(llm, batch), 3),
        })  # fmt: skip
        print(json.dumps(result["rows"][-1]), flush=True)
    del llm

    eager = LLM(model=args.model, enforce_eager=True, **kv)
    for row in result["rows"]:
        batch = row["batch_size"]
        generate(eager, batch, 4)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generate(eager, batch, 17)  # 1 prefill step + 16 decode steps
        by_name: dict[str, float] = defaultdict(float)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                by_name[event.name[:80]] += event.device_time_total / 1e3  # ms
        top = sorted(by_name.items(), key=lambda kv: -kv[1])[:14]
        row["kernels_ms_per_17_steps"] = {name: round(ms, 3) for name, ms in top}
        row["gpu_ms_total_17_steps"] = round(sum(by_name.values()), 3)
        print(json.dumps({"batch": batch, "top": row["kernels_ms_per_17_steps"]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
