"""Offline decode throughput, side by side in one run: nibble's LLM.generate (in-flight NF4)
vs transformers' generate with bitsandbytes 4-bit, optionally vs nibble's own bf16 path and the
memory roofline, on the same checkpoint and the same prompts; with load times.

    python benchmarks/offline_throughput.py --shape small --batch-sizes 1 8 \
        --out benchmarks/results/offline_throughput_cpu.json
    python benchmarks/offline_throughput.py --model /tmp/llama2-7b --batch-sizes 1 16 64 \
        --prompt-len 128 --output-len 128 --compare-bf16 --prequantized-load  # on a GPU
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
    # Warm-up: the same batch, two tokens (kernels a cold machine compiles on first use).
    llm.generate(requests, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    sync()
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    sync()
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


def decode_tok_s(llm: LLM, batch_prompts, output_len: int, elapsed: float) -> float:
    """Decode alone (what the roofline bounds): a run of `elapsed` seconds less a prefill-only
    run (one token) of the same batch."""
    prefill = time_ours(llm, batch_prompts, 1)
    return len(batch_prompts) * (output_len - 1) / (elapsed - prefill)


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


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write): the roofline's ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 10 * 4 * src.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: a random one)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--compare-bf16", action="store_true", help="also nibble unquantized")
    parser.add_argument(
        "--prequantized-load", action="store_true",
        help="also write a pre-quantized copy (python -m engine.quantize) and time its load",
    )  # fmt: skip
    parser.add_argument("--kv-cache-gib", type=float, default=None)
    parser.add_argument(
        "--kv-cache-dtype", default="auto", help="ours only (EngineConfig.kv_cache_dtype)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or write_checkpoint(args.shape, Path(tmp) / args.shape)
        kv = {"kv_cache_memory_bytes": int(args.kv_cache_gib * 2**30)} if args.kv_cache_gib else {}
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        llm = LLM(
            model=str(model_dir), quantization="bitsandbytes", dtype=dtype,
            kv_cache_dtype=args.kv_cache_dtype, **kv,
        )  # fmt: skip
        report = llm.llm_engine.runner.load_report
        graphs = llm.llm_engine.runner.graphs
        prefill_graphs = llm.llm_engine.runner.prefill_graphs
        load = {
            "inflight_load_s": round(report.load_seconds, 2),
            "inflight_quantize_s": round(report.quantization_seconds, 2),
            "weight_GiB": round(report.weight_bytes / 2**30, 3),
            "weight_ratio_to_16bit": round(report.ratio_to_16bit, 3),
            "graph_capture_s": round(graphs.capture_seconds, 2) if graphs else None,
            "prefill_graph_capture_s": (
                round(prefill_graphs.capture_seconds, 2) if prefill_graphs else None
            ),
        }
        if cuda:
            load["peak_gpu_GiB_at_init"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(json.dumps(load), flush=True)
        hf = llm.llm_engine.hf_config
        embed_bytes = hf.vocab_size * hf.hidden_size * dtype.itemsize
        # Bytes a decode step must read: every weight once (the embedding only by row).
        step_bytes = report.weight_bytes - (0 if hf.tie_word_embeddings else embed_bytes)
        bandwidth = copy_bandwidth() if cuda else None
        vocab = hf.vocab_size
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
            elapsed = time_ours(llm, batch_prompts, args.output_len)
            row = {"batch_size": batch, "ours_tok_s": tokens / elapsed}
            row["ours_decode_tok_s"] = decode_tok_s(llm, batch_prompts, args.output_len, elapsed)
            if bandwidth:
                row["roofline_tok_s"] = batch * bandwidth / step_bytes
                row["ours_fraction_of_roofline"] = row["ours_tok_s"] / row["roofline_tok_s"]
                row["decode_fraction_of_roofline"] = (
                    row["ours_decode_tok_s"] / row["roofline_tok_s"]
                )
            if reference is not None:
                row["transformers_tok_s"] = tokens / time_transformers(
                    reference, batch_prompts, args.output_len
                )
                row["ratio"] = row["ours_tok_s"] / row["transformers_tok_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        del llm
        if args.compare_bf16:
            bf16 = LLM(model=str(model_dir), dtype=dtype, kv_cache_dtype=args.kv_cache_dtype, **kv)
            for row in rows:
                batch_prompts = prompts(
                    row["batch_size"], args.prompt_len, vocab, seed=row["batch_size"]
                )
                elapsed = time_ours(bf16, batch_prompts, args.output_len)
                row["ours_bf16_tok_s"] = row["batch_size"] * args.output_len / elapsed
                row["nf4_over_bf16"] = row["ours_tok_s"] / row["ours_bf16_tok_s"]
                row["ours_bf16_decode_tok_s"] = decode_tok_s(
                    bf16, batch_prompts, args.output_len, elapsed
                )
                print(json.dumps(row), flush=True)
            del bf16
        if args.prequantized_load:
            from engine.quantize import quantize_checkpoint

            copy = Path(tmp) / "prequantized"
            quantize_checkpoint(model_dir, copy)
            if cuda:
                torch.cuda.empty_cache()
            start = time.perf_counter()
            pre = LLM(model=str(copy), dtype=dtype, **kv)
            load["prequantized_engine_init_s"] = round(time.perf_counter() - start, 2)
            load["prequantized_load_s"] = round(pre.llm_engine.runner.load_report.load_seconds, 2)
            print(json.dumps(load), flush=True)
            del pre

    device = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    )
    result = {
        "benchmark": "offline_throughput", "shape": args.shape, "model": str(args.model or ""),
        "quantization": "bitsandbytes nf4 + double quant (in-flight)", "dtype": args.dtype,
        "prompt_len": args.prompt_len, "output_len": args.output_len, "device": device,
        "copy_bandwidth_TB_s": bandwidth / 1e12 if bandwidth else None,
        "bytes_per_decode_step": step_bytes, "load": load, "rows": rows,
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
