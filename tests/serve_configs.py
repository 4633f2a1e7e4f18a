"""Reads the Serve configs shipped in configs/."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def config_args(name: str) -> dict:
    """The `args` of the first application in configs/<name>."""
    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    return config["applications"][0]["args"]
