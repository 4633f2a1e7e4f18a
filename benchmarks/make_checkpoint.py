"""Writes a random-initialised Llama-shaped checkpoint in the Hugging Face layout (config.json,
sharded safetensors with an index, a small byte-level BPE tokenizer), seeded, for benchmarks.

    python benchmarks/make_checkpoint.py --shape llama2-7b --out /tmp/llama2-7b
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def _load_test_helpers():
    """The tests' seeded tokenizer builder (loaded by path: tests/ must not shadow `engine`)."""
    path = Path(__file__).resolve().parents[1] / "tests" / "checkpoints.py"
    spec = importlib.util.spec_from_file_location("nibble_test_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_tokenizer = _load_test_helpers().build_tokenizer

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, vocab)
    "small": (512, 1408, 4, 8, 2, 32000),
    "llama2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
}
SHARD_BYTES = 2 << 30


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    hidden, inter, layers, heads, kv_heads, vocab = SHAPES[shape]
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def write_checkpoint(shape: str, out: Path, seed: int = 0, dtype=torch.bfloat16) -> Path:
    hidden, inter, layers, heads, kv_heads, vocab = SHAPES[shape]
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(seed)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, dims in tensor_shapes(shape).items():
        if name.endswith("norm.weight"):
            t = torch.ones(dims, dtype=dtype)
        else:
            t = (torch.randn(dims, generator=generator, device=device) * 0.02).to(dtype).cpu()
        shard[name] = t
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum((out / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_checkpoint(args.shape, args.out, args.seed))


if __name__ == "__main__":
    main()
