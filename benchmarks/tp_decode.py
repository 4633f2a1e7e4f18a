"""Tensor parallelism on GPUs: TP=1 vs TP=2 on one checkpoint, pre-quantized and in flight.

For each (mode, tp): load time, greedy tokens (TP=2 must equal TP=1), and decode tokens/s at
several batch sizes. Per-step communication is measured by timing, in isolation, the collectives
a decode step makes (an all-reduce of [batch, hidden] twice per layer and once for the
embedding, an all-gather of the logits, and the gloo broadcast of the step plan); compute is the
rest of the step.

    python benchmarks/tp_decode.py --model /tmp/llama2-7b --prequantized /tmp/llama2-7b-nf4 \
        --out benchmarks/results/tp_decode_h200x2_llama2_7b.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine import LLM, SamplingParams
from engine.model_runner import BatchPlan, StepPlan

PROMPT_LEN = 128


def decode_rate(llm: LLM, batch: int, output_len: int, vocab: int) -> float:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(3, min(vocab, 300), (batch, PROMPT_LEN), generator=g).tolist()
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    # Warm-up on the same batch (as offline_throughput does): a batch's first prefill and mixed
    # steps may compile kernel variants, which must not land in the timed run.
    llm.generate(requests, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    llm.generate(requests, params, use_tqdm=False)
    return batch * output_len / (time.perf_counter() - start)


def run_engine(
    model: Path, tp: int, inflight: bool, batches: list[int], output_len: int, dtype: str
) -> dict:
    start = time.perf_counter()
    kwargs = {}
    if inflight:  # compute in the activation dtype (for float32: only summation order differs)
        kwargs = {
            "quantization": "bitsandbytes",
            "quantization_config": {"bnb_4bit_compute_dtype": dtype},
        }
    llm = LLM(
        model=str(model), tensor_parallel_size=tp, gpu_memory_utilization=0.4, dtype=dtype, **kwargs
    )
    load_s = time.perf_counter() - start
    vocab = llm.llm_engine.limits.vocab_size
    prompts = ["The quick brown fox", "Hello world", "def add(a, b):", "Paged attention keeps"]
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=20)
    outputs = llm.generate(prompts, greedy, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    first = [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outputs]
    rates = {str(b): decode_rate(llm, b, output_len, vocab) for b in batches}
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "load_s": load_s,
        "greedy_tokens": tokens,
        "first_logprobs": first,
        "decode_tok_s": rates,
    }


def _collectives(
    rank: int, port: int, batches: list[int], hidden: int, vocab: int, layers: int, out
):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    gloo = dist.new_group(backend="gloo")
    results = {}
    for b in batches:
        x = torch.randn(b, hidden, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(b, vocab // 2, device="cuda", dtype=torch.bfloat16)
        parts = [torch.empty_like(logits) for _ in range(2)]

        def timed(fn, iters=200):
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
            return (time.perf_counter() - t) / iters

        all_reduce = timed(lambda x=x: dist.all_reduce(x))
        all_gather = timed(lambda p=parts, t=logits: dist.all_gather(p, t))
        plan = StepPlan(
            input_ids=[1] * b, positions=[200] * b, slot_mapping=list(range(b)),
            batches=[
                BatchPlan(0, b, list(range(b)), [[200]] * b, [list(range(16))] * b, [201] * b)
            ],
            sample_rows=list(range(b)),
        )  # fmt: skip
        broadcast = timed(
            lambda s=plan: dist.broadcast_object_list([s if rank == 0 else None], 0, group=gloo), 50
        )
        per_step = (2 * layers + 1) * all_reduce + all_gather + broadcast
        results[str(b)] = {
            "all_reduce_us": all_reduce * 1e6, "all_gather_logits_us": all_gather * 1e6,
            "plan_broadcast_us": broadcast * 1e6, "communication_per_step_ms": per_step * 1e3,
        }  # fmt: skip
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def measure_collectives(batches, hidden=4096, vocab=32000, layers=32) -> dict:
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_collectives, args=(29517, batches, hidden, vocab, layers, out), nprocs=2)
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="16-bit checkpoint")
    parser.add_argument("--prequantized", type=Path, required=True, help="its bnb 4-bit copy")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--check-only", action="store_true", help="tokens and logprobs, no timing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.check_only:
        args.batch_sizes = []
    comm = {} if args.check_only else measure_collectives(args.batch_sizes)
    result = {
        "benchmark": "tp_decode", "model": "llama2-7b shape, random weights",
        "prompt_len": PROMPT_LEN, "output_len": args.output_len,
        "device": torch.cuda.get_device_name(), "communication": comm, "runs": {},
    }  # fmt: skip
    for mode, path, inflight in (
        ("prequantized", args.prequantized, False),
        ("inflight", args.model, True),
    ):
        for tp in (2, 1):
            run = run_engine(path, tp, inflight, args.batch_sizes, args.output_len, args.dtype)
            result["runs"][f"{mode}-tp{tp}"] = run
            print(
                mode,
                tp,
                json.dumps({k: v for k, v in run.items() if k != "greedy_tokens"}),
                flush=True,
            )
        one, two = result["runs"][f"{mode}-tp1"], result["runs"][f"{mode}-tp2"]
        same = one["greedy_tokens"] == two["greedy_tokens"]
        diff = max(
            abs(a[t] - b[t])
            for a, b in zip(one["first_logprobs"], two["first_logprobs"], strict=True)
            for t in a.keys() & b.keys()
        )
        result[f"{mode}_tp2_tokens_equal_tp1"] = same
        result[f"{mode}_tp2_max_first_logprob_diff"] = diff
        print(mode, "TP=2 tokens equal TP=1:", same, "max first-token logprob diff:", diff)
    for mode in ("prequantized", "inflight"):
        for b in map(str, args.batch_sizes if comm else []):
            rate = result["runs"][f"{mode}-tp2"]["decode_tok_s"][b]
            step_ms = 1e3 * int(b) / rate
            comm_ms = comm[b]["communication_per_step_ms"]
            result.setdefault("tp2_step_split", {})[f"{mode}-batch{b}"] = {
                "step_ms": step_ms, "communication_ms": comm_ms, "compute_ms": step_ms - comm_ms,
            }  # fmt: skip
    print(json.dumps(result.get("tp2_step_split"), indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
