"""What the sm_90 cross-compile tests read from a compiled kernel: its resource usage and its
SASS, through the tools Triton ships (skipped where it ships none)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

# The launch table whose launches these tests compile.
TUNED_TABLE = Path(__file__).parents[2] / "engine" / "kernels" / "configs" / "NVIDIA_H200.json"


def shipped_entries(kernel: str) -> list[dict]:
    """The entries of one kernel kind in the shipped H200 launch table, as stored."""
    entries = json.loads(TUNED_TABLE.read_text())["configs"].values()
    return [entry for entry in entries if entry["kernel"] == kernel]


def warpgroup_signature(split_k: int) -> tuple[dict[str, str], dict]:
    """The warpgroup kernels' shared runtime arguments as `triton.compile` takes them (bf16 x;
    fp32 partials when K is split), and the divisibility the launcher's arguments have (the
    pointers, K and the strides: multiples of 16)."""
    signature = {
        "x_ptr": "*bf16", "w_ptr": "*u8", "absmax_ptr": "*fp32", "table_ptr": "*i32",
        "out_ptr": "*bf16" if split_k == 1 else "*fp32", "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_om": "i32", "stride_ok": "i32", "stride_w": "i32",
        "stride_a": "i32",
    }  # fmt: skip
    aligned = (0, 1, 2, 3, 4, 7, 8, 9, 11, 12)
    return signature, {(i,): [["tt.divisibility", 16]] for i in aligned}


def tool(name: str) -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not os.access(path, os.X_OK):
        pytest.skip(f"Triton ships no {name} here")
    return path


def resource_usage(kernel, tmp_path: Path) -> str:
    """cuobjdump's resource line of the compiled kernel (REG:n STACK:n SHARED:n LOCAL:n ..), and
    the kernel's cubin written to tmp_path/kernel.cubin."""
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    return subprocess.run(
        [str(tool("cuobjdump")), "--dump-resource-usage", str(cubin)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def spill_free_sass(kernel, tmp_path: Path) -> str:
    """The kernel's SASS, after asserting that it uses no stack or local memory (nothing
    spills)."""
    usage = resource_usage(kernel, tmp_path)
    assert re.search(r"STACK:0\b", usage) and re.search(r"LOCAL:0\b", usage), usage
    cubin = tmp_path / "kernel.cubin"
    return subprocess.run(
        [str(tool("nvdisasm")), "-c", str(cubin)], capture_output=True, text=True, check=True
    ).stdout


_DEST = re.compile(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9._]*)\s+R(\d+)\b")
_LOOP_START = re.compile(r"^(\.L_x_\d+):")


def written_registers(line: str) -> list[int]:
    """The registers a SASS instruction writes: its first operand when that is a register
    (stores name an address there), two for 64-bit and wide results, four for 128-bit ones,
    and one per matrix for `LDSM`."""
    match = _DEST.search(line)
    if not match or match.group(1).startswith(("ST", "RED", "ATOM")):
        return []
    op, first = match.group(1), int(match.group(2))
    width = 1
    if ".128" in op:
        width = 4
    elif ".64" in op or "WIDE" in op:
        width = 2
    elif op.startswith("LDSM") and op.rsplit(".", 1)[-1] in ("2", "4"):
        width = int(op.rsplit(".", 1)[-1])
    return list(range(first, first + width))


def _scan(lines: list[str]) -> list[str]:
    in_flight: set[int] = set()
    hazards = []
    for line in lines:
        mma = re.search(r"HGMMA\S* R\d+, R(\d+),", line)
        if mma:  # the A fragment: four consecutive registers from the one named
            in_flight |= set(range(int(mma.group(1)), int(mma.group(1)) + 4))
        elif "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            in_flight.clear()
        elif in_flight.intersection(written_registers(line)):
            hazards.append(line.strip())
    return hazards


def a_register_hazards(sass: str) -> list[str]:
    """Instructions that write a register a warpgroup MMA reads as its A operand before a wait
    for every MMA in flight (`WARPGROUP.DEPBAR.LE gsb0, 0x0`), in program order and around
    each loop (a loop's body read twice: an MMA left in flight at its end meets the writes at
    its top)."""
    lines = sass.splitlines()
    hazards = _scan(lines)
    for start, line in enumerate(lines):
        label = _LOOP_START.match(line)
        if not label:
            continue
        back = f"BRA `({label.group(1)})"
        ends = [i for i in range(start + 1, len(lines)) if back in lines[i]]
        if ends:
            body = lines[start : ends[-1] + 1]
            hazards += [h for h in _scan(body + body) if h not in hazards]
    return hazards
