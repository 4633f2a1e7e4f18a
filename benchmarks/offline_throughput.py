"""Offline decode throughput, side by side in one run: nibble's LLM.generate vs transformers'
generate with bitsandbytes 4-bit, on the same checkpoint and the same prompts.

    python benchmarks/offline_throughput.py --shape small --batch-sizes 1 8 \
        --out benchmarks/results/offline_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from make_checkpoint import SHAPES, write_checkpoint
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from engine import LLM, SamplingParams


def prompts(batch: int, prompt_len: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(vocab, 300), (batch, prompt_len), generator=g).tolist()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ours(llm: LLM, batch_prompts, output_len: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in batch_prompts]
    llm.generate(requests[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    sync()
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


@torch.no_grad()
def time_transformers(model, batch_prompts, output_len: int) -> float:
    ids = torch.tensor(batch_prompts, device=model.device)
    mask = torch.ones_like(ids)
    model.generate(ids[:1], attention_mask=mask[:1], max_new_tokens=2, do_sample=False)
    sync()
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    sync()
    assert out.shape[1] == ids.shape[1] + output_len
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a random one)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_checkpoint(args.shape, Path(tmp) / args.shape)
        llm = LLM(model=str(model_dir), quantization="bitsandbytes", dtype=dtype)
        vocab = llm.llm_engine.hf_config.vocab_size
        reference = None
        if not args.skip_transformers:
            quant = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )  # fmt: skip
            reference = AutoModelForCausalLM.from_pretrained(
                model_dir, quantization_config=quant, dtype=dtype
            ).eval()
        rows = []
        for batch in args.batch_sizes:
            batch_prompts = prompts(batch, args.prompt_len, vocab, seed=batch)
            tokens = batch * args.output_len
            row = {
                "batch_size": batch,
                "ours_tok_s": tokens / time_ours(llm, batch_prompts, args.output_len),
            }
            if reference is not None:
                row["transformers_tok_s"] = tokens / time_transformers(
                    reference, batch_prompts, args.output_len
                )
                row["ratio"] = row["ours_tok_s"] / row["transformers_tok_s"]
            rows.append(row)
            print(json.dumps(row))

    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    result = {
        "benchmark": "offline_throughput", "shape": args.shape, "model": str(args.model or ""),
        "quantization": "bitsandbytes nf4 + double quant (in-flight)", "dtype": args.dtype,
        "prompt_len": args.prompt_len, "output_len": args.output_len, "device": device,
        "rows": rows,
    }  # fmt: skip
    print(f"{'batch':>6} {'ours tok/s':>12} {'transformers tok/s':>19} {'ratio':>7}")
    for r in rows:
        hf, ratio = r.get("transformers_tok_s", float("nan")), r.get("ratio", float("nan"))
        print(f"{r['batch_size']:>6} {r['ours_tok_s']:>12.1f} {hf:>19.1f} {ratio:>7.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
