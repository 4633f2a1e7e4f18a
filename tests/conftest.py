"""Shared fixtures: tiny seeded checkpoints built with transformers, and their oracles."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from checkpoints import bnb_config, build_model, prequantize  # noqa: E402

# A Llama with GQA, tied embeddings and Llama 3 rope scaling, saved as a sharded checkpoint.
LLAMA = dict(
    family="llama",
    tie_word_embeddings=True,
    max_shard_size="300KB",
    rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    },
)  # fmt: skip
FAMILIES = {
    "llama": LLAMA,
    "qwen2": dict(family="qwen2"),
    "qwen3": dict(family="qwen3"),
    "mistral": dict(family="llama", architectures=["MistralForCausalLM"]),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(name) -> directory, built once per session. Names: a family ('llama', ...),
    or 'family-nf4-dq' / 'family-fp4' ... for pre-quantized copies written by transformers."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            family, _, quant = name.partition("-")
            if not quant:
                spec = dict(FAMILIES[family])
                built[name] = build_model(root / name, **spec)
            else:
                quant_type, _, dq = quant.partition("-")
                config = bnb_config(quant_type, double_quant=dq == "dq")
                built[name] = prequantize(get(family), root / name, config)
        return built[name]

    return get
