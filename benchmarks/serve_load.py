"""Load test of the served API on loopback, side by side with the offline engine in one run.

Starts the app from a Serve config on a local Ray, sends streamed completions at each
concurrency (an async httpx client, bounded in requests and time), and reports requests/s,
output tokens/s, time to first token and inter-token latency (p50/p95/p99). Then runs the same
prompts through the offline `LLM.generate` and reports served / offline output tokens/s.

    python benchmarks/serve_load.py --config configs/llama.yaml --concurrency 1 8 32 \
        --out benchmarks/results/serve_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx
import yaml

PROMPTS = [
    "The Python interpreter", "A dictionary is", "To open a file,", "The logging module",
    "Exceptions are raised when", "A module is a file", "The following example shows",
    "In this tutorial", "Classes provide a means", "The standard library",
]  # fmt: skip


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49] * 1e3, "p95": q[94] * 1e3, "p99": q[98] * 1e3}


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    start = time.perf_counter()
    times, tokens = [], 0
    async with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
    return {"start": start, "times": times, "tokens": tokens, "end": time.perf_counter()}


async def run_level(
    url: str, model: str, concurrency: int, num_requests: int, max_tokens: int, time_limit: float
) -> dict:
    results: list[dict] = []
    deadline = time.perf_counter() + time_limit
    queue = list(range(num_requests))

    async def client_loop(http: httpx.AsyncClient) -> None:
        while queue and time.perf_counter() < deadline:
            i = queue.pop()
            results.append(await one_request(http, model, PROMPTS[i % len(PROMPTS)], max_tokens))

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*[client_loop(http) for _ in range(concurrency)])
    elapsed = time.perf_counter() - start
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in results)
    return {
        "concurrency": concurrency, "requests": len(results), "seconds": elapsed,
        "requests_per_s": len(results) / elapsed, "output_tok_s": tokens / elapsed,
        "ttft_ms": percentiles(ttft), "itl_ms": percentiles(itl),
    }  # fmt: skip


def offline_rate(model_args: dict, num_requests: int, max_tokens: int) -> float:
    from engine import LLM, SamplingParams

    keys = (
        "model",
        "quantization",
        "dtype",
        "max_model_len",
        "max_num_seqs",
        "tensor_parallel_size",
    )
    llm = LLM(**{k: model_args[k] for k in keys if k in model_args})
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2), use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/llama.yaml"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per level")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from deployments.app import build_app
    from workers.dist import free_port

    app_args = yaml.safe_load(args.config.read_text())["applications"][0]["args"]
    model_args = app_args["models"][0]
    model = model_args.get("served_model_name", model_args["model"])
    ray.init(include_dashboard=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="nibble", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    levels = []
    for c in args.concurrency:
        level = asyncio.run(
            run_level(url, model, c, args.requests, args.max_tokens, args.time_limit)
        )
        levels.append(level)
        print(json.dumps(level), flush=True)
    serve.shutdown()
    ray.shutdown()
    offline = offline_rate(model_args, args.requests, args.max_tokens)
    for level in levels:
        level["served_over_offline"] = level["output_tok_s"] / offline
    print(f"\noffline LLM.generate: {offline:.1f} output tok/s ({args.requests} prompts at once)")
    header = ("conc", "req/s", "tok/s", "vs offline", "TTFT p50/p95/p99 ms", "ITL p50/p95/p99 ms")
    print("{:>5} {:>7} {:>8} {:>10} {:>24} {:>22}".format(*header))
    for lv in levels:
        t, i = lv["ttft_ms"], lv["itl_ms"]
        print(
            f"{lv['concurrency']:>5} {lv['requests_per_s']:>7.2f} {lv['output_tok_s']:>8.1f} "
            f"{lv['served_over_offline']:>10.2f} {t['p50']:>8.0f}/{t['p95']:.0f}/{t['p99']:.0f} "
            f"{i['p50']:>10.1f}/{i['p95']:.1f}/{i['p99']:.1f}"
        )
    if args.out:
        result = {
            "benchmark": "serve_load", "config": str(args.config), "max_tokens": args.max_tokens,
            "offline_output_tok_s": offline, "levels": levels,
        }  # fmt: skip
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
