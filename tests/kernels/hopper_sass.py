"""What the sm_90 cross-compile tests read from a compiled kernel: its resource usage and its
SASS, through the tools Triton ships (skipped where it ships none)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest


def tool(name: str) -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not os.access(path, os.X_OK):
        pytest.skip(f"Triton ships no {name} here")
    return path


def spill_free_sass(kernel, tmp_path: Path) -> str:
    """The kernel's SASS, after asserting that it uses no stack or local memory (nothing
    spills)."""
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run(
        [str(tool("cuobjdump")), "--dump-resource-usage", str(cubin)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert re.search(r"STACK:0\b", usage) and re.search(r"LOCAL:0\b", usage), usage
    return subprocess.run(
        [str(tool("nvdisasm")), "-c", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
