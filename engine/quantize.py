"""Writes a pre-quantized copy of a 16/32-bit checkpoint in transformers' bitsandbytes 4-bit
format (what `save_pretrained` writes), so transformers and nibble both load it with no flag.

    python -m engine.quantize SOURCE_DIR TARGET_DIR [--quant-type nf4|fp4] [--no-double-quant]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

import bitsandbytes.functional as bnbF
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from engine.config import DTYPES
from engine.layers.quant.bitsandbytes import skipped_by
from engine.model_files import safetensors_files

logger = logging.getLogger(__name__)
# The decoder's linear layers; embeddings, norms and lm_head stay as they are.
QUANTIZED = re.compile(r"\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
_COPIED_SUFFIXES = (".json", ".model", ".txt", ".jinja")


def quantize_checkpoint(
    source: Path,
    target: Path,
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    blocksize: int = 64,
    skip_modules: list[str] | None = None,
    device: str | None = None,
) -> Path:
    if (target / "config.json").exists() and target.resolve() == source.resolve():
        raise ValueError("target must differ from source")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = json.loads((source / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(
            f"{source} is already quantized ({config['quantization_config'].get('quant_method')})"
        )
    if compute_dtype not in DTYPES:
        raise ValueError(f"compute_dtype {compute_dtype!r} is not one of {sorted(DTYPES)}")
    skip = skip_modules or []
    target.mkdir(parents=True, exist_ok=True)
    files = safetensors_files(source)
    weight_map: dict[str, str] = {}
    for path in tqdm(files, desc="Quantizing", unit="file"):
        out: dict[str, torch.Tensor] = {}
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                module = name.removesuffix(".weight")
                if QUANTIZED.search(name) and not skipped_by(module, skip):
                    packed, state = bnbF.quantize_4bit(
                        tensor.to(device), blocksize=blocksize, compress_statistics=double_quant,
                        quant_type=quant_type,
                    )  # fmt: skip
                    out[name] = packed.cpu()
                    for key, value in state.as_dict(packed=True).items():
                        out[f"{name}.{key}"] = value.cpu()
                else:
                    out[name] = tensor
        save_file(out, target / path.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, path.name))
    if len(files) > 1:
        total = sum((target / p.name).stat().st_size for p in files)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in source.iterdir():
        if f.suffix in _COPIED_SUFFIXES and f.name not in (
            "config.json",
            "model.safetensors.index.json",
        ):
            shutil.copy(f, target / f.name)
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
        # lm_head stays 16-bit here; transformers quantizes what the list does not name.
        "llm_int8_skip_modules": _with_lm_head(skip_modules), "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
        "_load_in_4bit": True, "_load_in_8bit": False,
    }  # fmt: skip
    (target / "config.json").write_text(json.dumps(config, indent=2))
    logger.info("wrote %s (%s%s)", target, quant_type, " + double quant" if double_quant else "")
    return target


def _with_lm_head(skip_modules: list[str] | None) -> list[str] | None:
    """The skip list as written to config.json: lm_head (never quantized here) named in it, or
    None (transformers' default, which keeps lm_head) where no list was given."""
    if not skip_modules:
        return None
    return skip_modules if "lm_head" in skip_modules else [*skip_modules, "lm_head"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--quant-type", choices=["nf4", "fp4"], default="nf4")
    parser.add_argument("--no-double-quant", action="store_true")
    parser.add_argument("--compute-dtype", default="bfloat16")
    parser.add_argument("--blocksize", type=int, default=64, help="values per absmax block")
    parser.add_argument(
        "--skip-modules", nargs="*", default=None,
        help="linear layers kept in 16 bits, by transformers' rule (a name prefix or regex, or "
        "a name suffix)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    quantize_checkpoint(
        args.source, args.target, args.quant_type, not args.no_double_quant, args.compute_dtype,
        skip_modules=args.skip_modules, blocksize=args.blocksize,
    )  # fmt: skip


if __name__ == "__main__":
    main()
