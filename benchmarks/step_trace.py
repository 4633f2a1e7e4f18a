"""Where an offline run's time goes, step by step: every engine step's wall time with its token
count and sequence count, for one batch of prompts run twice (the first run also compiles
whatever the warm-up did not), on a GPU. With tensor parallelism the steps are timed inside the
rank-0 worker, where the engine runs.

    python benchmarks/step_trace.py --model /tmp/llama2-7b --batch 64 --out trace.json
    python benchmarks/step_trace.py --model /tmp/llama2-7b-nf4 --quantization "" \
        --tensor-parallel-size 2 --batch 16 64 --out trace_tp2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray
from offline_throughput import prompts

from engine import LLM, SamplingParams


def _start_trace(engine) -> None:
    """Wrap the engine's schedule and step so that each step records its rows, sequences and
    synchronized wall time in `engine.trace_records`."""
    import torch

    records: list[dict] = []
    schedule, step = engine.scheduler.schedule, engine.step

    def traced_schedule():
        out = schedule()
        records.append({"tokens": out.num_tokens, "seqs": len(out.scheduled)})
        return out

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def traced_step():
        sync()
        start = time.perf_counter()
        result = step()
        sync()
        ms = round((time.perf_counter() - start) * 1e3, 3)
        if records and "ms" not in records[-1]:
            records[-1]["ms"] = ms
        elif records:  # launched ahead (async scheduling): a decode step of the same rows
            records.append({**records[-1], "ms": ms})
        return result

    engine.trace_records = records
    engine.scheduler.schedule, engine.step = traced_schedule, traced_step


def _stop_trace(engine) -> list[dict]:
    del engine.scheduler.schedule, engine.step  # back to the class's methods
    return [r for r in engine.trace_records if "ms" in r]


def _on_rank0(llm: LLM, fn):
    """fn(engine) where the engine runs: here, or in the rank-0 worker actor."""
    group = getattr(llm.llm_engine, "group", None)
    if group is None:
        return fn(llm.llm_engine)
    return ray.get(group.workers[0].__ray_call__.remote(lambda worker: fn(worker.engine)))


def traced_run(llm: LLM, requests: list[dict], params: SamplingParams) -> tuple[list[dict], float]:
    """(the engine's steps, the run's wall time in ms)."""
    _on_rank0(llm, _start_trace)
    try:
        start = time.perf_counter()
        llm.generate(requests, params, use_tqdm=False)
        wall_ms = (time.perf_counter() - start) * 1e3
    finally:
        records = _on_rank0(llm, _stop_trace)
    return records, wall_ms


def summary(records: list[dict], wall_ms: float) -> dict:
    """The steps' times, and the run's wall time (outside any step: the driver, request
    transfer, idle waits)."""
    decode = [r["ms"] for r in records if r["tokens"] == r["seqs"]]
    other = [r for r in records if r["tokens"] != r["seqs"]]
    return {
        "wall_ms": round(wall_ms, 1),
        "steps": len(records),
        "total_ms": round(sum(r["ms"] for r in records), 1),
        "decode_steps": len(decode),
        "decode_ms": round(sum(decode), 1),
        "decode_median_ms": round(sorted(decode)[len(decode) // 2], 3) if decode else None,
        "prefill_or_mixed_steps": other,
        "slowest": sorted(records, key=lambda r: -r["ms"])[:8],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch", type=int, nargs="+", default=[64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--quantization", default="bitsandbytes", help='"" for none/pre-quantized')
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--kv-cache-gib", type=float, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    llm = LLM(
        model=str(args.model), quantization=args.quantization or None,
        tensor_parallel_size=args.tensor_parallel_size,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
    )  # fmt: skip
    vocab = llm.llm_engine.limits.vocab_size
    result = {"tensor_parallel_size": args.tensor_parallel_size, "batches": {}}
    for batch in args.batch:
        requests = [{"prompt_token_ids": p} for p in prompts(batch, args.prompt_len, vocab, 0)]
        llm.generate(requests, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        runs = result["batches"][str(batch)] = []
        for run in range(2):
            runs.append(summary(*traced_run(llm, requests, params)))
            print(json.dumps({"batch": batch, "run": run, **runs[-1]}), flush=True)
    llm.shutdown()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
