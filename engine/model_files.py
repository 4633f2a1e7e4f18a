"""Finds a checkpoint's files: a local directory, or a hub id fetched with huggingface_hub."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    """A local directory holding config.json, downloading a hub id when needed."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; is it a Hugging Face model directory?")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"model {model!r} is neither a model directory nor a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as e:
        raise ValueError(
            f"model {model!r} is not a local directory and the Hugging Face hub cannot be reached "
            "(no network, or HF_HUB_OFFLINE is set); download it first or pass a local path"
        ) from e
    except HfHubHTTPError as e:
        raise ValueError(f"could not fetch {model!r} from the Hugging Face hub: {e}") from e


def load_tokenizer(model: str, tokenizer: str | None = None, revision: str | None = None):
    """The tokenizer of a checkpoint (or the separately named one), local or from the hub."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer or resolve_model_dir(model, revision))


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's *.safetensors files, following an index file when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{model_dir}: index names missing shard files {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {found}; convert them to safetensors)" if found else ""
        raise ValueError(f"{model_dir} holds no *.safetensors weights{hint}")
    return files
