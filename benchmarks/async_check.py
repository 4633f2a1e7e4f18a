"""Whether decode steps really run ahead of the host (async scheduling), and if not, why: for
one batch, the host's time per engine step split into launching the next step, waiting for the
previous one's tokens, and processing them; the steps queued ahead; and every call that made
the host wait for the GPU during decode (PyTorch's sync debug mode), by call site.

    python benchmarks/async_check.py --model /tmp/llama2-7b --batch-sizes 1 64 --out async.json
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import traceback
import warnings
from pathlib import Path

import torch
from offline_throughput import prompts, sync

from engine import LLM, SamplingParams


def timed(owner, name: str, totals: dict) -> None:
    """Wrap owner.name to add its host time to totals[name] (a spy; the real method runs)."""
    method = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
            totals[name + "_calls"] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    llm = LLM(model=args.model, quantization="bitsandbytes", kv_cache_memory_bytes=16 << 30)
    results = [check(llm, batch, args.prompt_len, args.output_len) for batch in args.batch_sizes]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


def check(llm: LLM, batch: int, prompt_len: int, output_len: int) -> dict:
    engine = llm.llm_engine
    requests = [{"prompt_token_ids": p} for p in prompts(batch, prompt_len, 32000, seed=0)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(requests, params, use_tqdm=False)  # warm-up
    sync()

    totals: dict[str, float] = collections.defaultdict(float)
    runner, methods = engine.runner, {}
    for name in ("launch", "launch_followup", "read_back", "execute"):
        methods[name] = getattr(runner, name)
        timed(runner, name, totals)
    postprocess = engine._postprocess
    timed(engine, "_postprocess", totals)
    syncs: collections.Counter[str] = collections.Counter()

    def on_warning(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack() if "/engine/" in f.filename]
        syncs[" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(stack[-4:]))] += 1

    showwarning = warnings.showwarning
    warnings.showwarning = on_warning
    warnings.simplefilter("always")
    debug = torch.cuda.set_sync_debug_mode if torch.cuda.is_available() else lambda mode: None
    step_ms = []
    for i, r in enumerate(requests):
        engine.add_request(f"check-{batch}-{i}", None, params, r["prompt_token_ids"])
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        decoding = not engine.scheduler.waiting
        if decoding:
            debug("warn")
        t = time.perf_counter()
        engine.step()
        debug("default")
        if decoding:
            step_ms.append((time.perf_counter() - t) * 1e3)
    sync()
    total = time.perf_counter() - start
    warnings.showwarning = showwarning
    for name, method in methods.items():
        setattr(runner, name, method)
    engine._postprocess = postprocess
    result = {
        "batch": batch,
        "wall_s": round(total, 3),
        "decode_steps": len(step_ms),
        "decode_step_ms_median": round(sorted(step_ms)[len(step_ms) // 2], 3),
        "host_ms_per_call": {
            k: round(v * 1e3 / max(1, totals[k + "_calls"]), 3)
            for k, v in totals.items()
            if not k.endswith("_calls")
        },
        "calls": {k: int(v) for k, v in totals.items() if k.endswith("_calls")},
        "syncs_during_decode": dict(syncs.most_common(12)),
    }
    if torch.cuda.is_available() and engine.runner.graphs is not None:
        result["gpu_ms_per_decode_step"] = gpu_segments(llm, requests, params)
    print(json.dumps(result, indent=1), flush=True)
    return result


def gpu_segments(llm: LLM, requests: list[dict], params: SamplingParams) -> dict[str, float]:
    """Median GPU time per decode step in: the graph replay (with its input copies), the LM
    head, sampling, and from one step's sampling to the next step's inputs (the GPU idle, or
    running work outside the three), from CUDA events recorded around each."""
    runner = llm.llm_engine.runner
    graphs_run, sample, compute_logits = runner.graphs.run, runner.sampler.sample, None
    compute_logits = runner.model.compute_logits
    marks: list[tuple[str, torch.cuda.Event]] = []

    def mark(name: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((name, event))

    def run(*args, **kwargs):
        mark("inputs")
        out = graphs_run(*args, **kwargs)
        mark("graph")
        return out

    def logits(*args, **kwargs):
        out = compute_logits(*args, **kwargs)
        mark("lm_head")
        return out

    def sampled(*args, **kwargs):
        out = sample(*args, **kwargs)
        mark("sample")
        return out

    runner.graphs.run, runner.model.compute_logits, runner.sampler.sample = run, logits, sampled
    try:
        llm.generate(requests, params, use_tqdm=False)
        sync()
    finally:
        runner.graphs.run, runner.model.compute_logits = graphs_run, compute_logits
        runner.sampler.sample = sample
    segments: dict[str, list[float]] = collections.defaultdict(list)
    names = [name for name, _ in marks]
    for i in range(1, len(marks)):
        if names[i - 1 : i + 1] in (
            ["inputs", "graph"],
            ["graph", "lm_head"],
            ["lm_head", "sample"],
            ["sample", "inputs"],
        ):
            segments[names[i - 1] + "->" + names[i]].append(
                marks[i - 1][1].elapsed_time(marks[i][1])
            )
    return {k: round(sorted(v)[len(v) // 2], 3) for k, v in segments.items()}


if __name__ == "__main__":
    main()
