"""What 4-bit quantization costs in quality: held-out perplexity of the demo model in bf16,
in-flight NF4, NF4 + double quant, FP4, and a pre-quantized copy (written by
`python -m engine.quantize`), each computed by nibble's engine and by transformers (+ bitsandbytes)
on the same tokens.

    python benchmarks/quality.py --corpus .corpus --out benchmarks/results/quality_demo_model.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from engine import LLM, SamplingParams
from engine.quantize import quantize_checkpoint

DEMO_MODEL = Path(__file__).parent / "demo_model" / "model"
FORMATS = {
    # name: (in-flight bnb options or None, pre-quantized copy?)
    "bf16": (None, False),
    "nf4": ({"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}, False),
    "nf4-dq": ({"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}, False),
    "fp4": ({"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}, False),
    "nf4-dq-prequantized": (None, True),
}


def windows(tokenizer, text: str, length: int, count: int) -> list[list[int]]:
    ids = tokenizer.encode(text)
    return [ids[i : i + length] for i in range(0, len(ids) - length, length)][:count]


def perplexity_ours(llm: LLM, chunks: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outputs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    logprobs = [
        out.prompt_logprobs[j][c[j]].logprob
        for out, c in zip(outputs, chunks, strict=True)
        for j in range(1, len(c))
    ]
    return math.exp(-sum(logprobs) / len(logprobs))


@torch.no_grad()
def perplexity_transformers(model, chunks: list[list[int]]) -> float:
    total, count = 0.0, 0
    for c in chunks:
        ids = torch.tensor([c], device=model.device)
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
        total += logprobs.gather(1, ids[0, 1:, None]).sum().item()
        count += len(c) - 1
    return math.exp(-total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--corpus", type=Path, required=True, help="corpus.py's output folder")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    chunks = windows(tokenizer, (args.corpus / "valid.txt").read_text(), args.window, args.windows)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        prequantized = quantize_checkpoint(
            args.model, Path(tmp) / "nf4-dq", compute_dtype="bfloat16"
        )
        for name, (options, is_prequantized) in FORMATS.items():
            path = prequantized if is_prequantized else args.model
            engine_args = {}
            if options:
                engine_args = {"quantization": "bitsandbytes", "quantization_config": options}
            llm = LLM(model=str(path), dtype="bfloat16", **engine_args)
            ours = perplexity_ours(llm, chunks)
            kwargs = {}
            if options:
                kwargs["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, **options
                )
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs)
            theirs = perplexity_transformers(reference.eval(), chunks)
            report = llm.llm_engine.runner.load_report
            rows[name] = {
                "ours": ours, "transformers": theirs, "weight_bytes": report.weight_bytes,
                "ratio_to_16bit": report.ratio_to_16bit,
            }  # fmt: skip
            print(json.dumps({name: rows[name]}), flush=True)
    print(f"\nheld-out perplexity, {len(chunks)} windows of {args.window} tokens")
    print(f"{'format':<22} {'nibble':>8} {'transformers':>13} {'weights vs bf16':>16}")
    for name, r in rows.items():
        print(
            f"{name:<22} {r['ours']:>8.3f} {r['transformers']:>13.3f} {r['ratio_to_16bit']:>16.2f}"
        )
    if args.out:
        result = {"benchmark": "quality", "model": str(args.model), "windows": len(chunks),
                  "window_tokens": args.window, "rows": rows}  # fmt: skip
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
