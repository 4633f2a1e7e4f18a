"""Where an offline run's time goes, step by step: every engine step's wall time with its token
count and sequence count, for one batch of prompts run twice (the first run also compiles
whatever the warm-up did not), on a GPU.

    python benchmarks/step_trace.py --model /tmp/llama2-7b --batch 64 --out trace.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from offline_throughput import prompts, sync

from engine import LLM, SamplingParams


def traced_run(llm: LLM, requests: list[dict], params: SamplingParams) -> list[dict]:
    engine = llm.llm_engine
    records: list[dict] = []
    schedule = engine.scheduler.schedule
    step = engine.step

    def traced_schedule():
        out = schedule()
        records.append({"tokens": out.num_tokens, "seqs": len(out.scheduled)})
        return out

    def traced_step():
        sync()
        start = time.perf_counter()
        result = step()
        sync()
        if records:
            records[-1]["ms"] = round((time.perf_counter() - start) * 1e3, 3)
        return result

    engine.scheduler.schedule, engine.step = traced_schedule, traced_step
    try:
        llm.generate(requests, params, use_tqdm=False)
    finally:
        engine.scheduler.schedule, engine.step = schedule, step
    return [r for r in records if "ms" in r]


def summary(records: list[dict]) -> dict:
    decode = [r["ms"] for r in records if r["tokens"] == r["seqs"]]
    other = [r for r in records if r["tokens"] != r["seqs"]]
    return {
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
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--quantization", default="bitsandbytes")
    parser.add_argument("--kv-cache-gib", type=float, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    llm = LLM(
        model=str(args.model), quantization=args.quantization or None,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
    )  # fmt: skip
    vocab = llm.llm_engine.hf_config.vocab_size
    requests = [{"prompt_token_ids": p} for p in prompts(args.batch, args.prompt_len, vocab, 0)]
    llm.generate(requests, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    result = {"batch": args.batch, "runs": []}
    for run in range(2):
        result["runs"].append(summary(traced_run(llm, requests, params)))
        print(json.dumps({"run": run, **result["runs"][-1]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
