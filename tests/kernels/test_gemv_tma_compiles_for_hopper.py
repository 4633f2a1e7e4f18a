"""The TMA-fed GEMV compiled for sm_90 on this machine (Triton cross-compiles with its own
ptxas; no GPU needed), as CI runs it, for every launch the tuned table ships and a few more: it
builds with the launcher's register cap, fits its programs per SM in shared memory, spills
nothing, copies by TMA, and writes the byte table at the start of shared memory, where the
lookups read it (gemv_tma_4bit: the table shares the stages' buffer, the kernel's largest)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("triton.experimental.gluon")

from engine.kernels.matmul_4bit import (  # noqa: E402
    GEMV_TMA_LOADER_REGS,
    SHARED_BYTES_PER_SM,
    KernelConfig,
    _gemv_step_words,
    _gemv_tma_tiles,
)

TUNED = Path(__file__).parents[2] / "engine" / "kernels" / "configs" / "NVIDIA_H200.json"


def _launches() -> list[KernelConfig]:
    shipped = {
        KernelConfig(**config)
        for config in json.loads(TUNED.read_text())["configs"].values()
        if config["kernel"] == "gemv" and config.get("tma")
    }
    packed = dict(half_table=True, packed_fma=True, tma=True)
    others = {
        KernelConfig(
            "gemv", 1, 32, 0, 1, 4, 2, threads_n=2, warps_n=2, programs_per_sm=2, **packed
        ),
        KernelConfig(
            "gemv", 1, 16, 0, 1, 8, 6, threads_n=1, warps_n=4, programs_per_sm=1, **packed
        ),
        # The fp32 table.
        KernelConfig("gemv", 2, 8, 0, 1, 4, 4, threads_n=2, tma=True, programs_per_sm=2),
    }
    return sorted(shipped | others, key=str)


def _compile(config: KernelConfig):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from engine.kernels.gemv_tma_4bit import gemv_tma_4bit_kernel, stage_layout

    step = _gemv_step_words(config)
    words = torch.empty(config.block_n * 4, 512, dtype=torch.int32)
    w_desc = TensorDescriptor.from_tensor(words, [config.block_n, step], stage_layout())
    signature = {
        "w_desc": mangle_type(w_desc), "x_ptr": "*i32", "absmax_ptr": "*fp32",
        "table_ptr": "*i32", "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_om": "i32", "stride_a": "i32",
    }  # fmt: skip
    constants = dict(
        BLOCKSIZE=64, X_FP16=False, BLOCK_M=config.block_m,
        ROWS=config.block_n // (config.threads_n * config.warps_n),
        THREADS_N=config.threads_n, WARPS_N=config.warps_n, NUM_STAGES=config.num_stages,
        PDL=True, HALF_TABLE=config.half_table, HALF2=config.packed_fma,
        LOADER_REGS=GEMV_TMA_LOADER_REGS,
    )  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    attrs = {(i,): [["tt.divisibility", 16]] for i in (1, 2, 3, 4, 8, 9, 10)}
    source = GluonASTSource(gemv_tma_4bit_kernel, signature, constants, attrs)
    threads = 32 * (config.num_warps + 4)
    maxnreg = min(255, 65536 // (config.programs_per_sm * threads)) // 8 * 8  # as the launcher
    options = {"num_warps": config.num_warps, "maxnreg": maxnreg}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize("config", _launches(), ids=str)
def test_tma_gemv_launch_compiles_for_hopper(config, tmp_path):
    import triton

    assert _gemv_tma_tiles(config)
    kernel = _compile(config)
    assert config.programs_per_sm * kernel.metadata.shared <= SHARED_BYTES_PER_SM
    ptx = kernel.asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "mbarrier.try_wait" in ptx
    # Every other buffer (barriers, the reduction's scratch) sits past the table-and-stages
    # buffer's size, so that buffer (which Triton allocates from 0) starts at shared offset 0.
    slot = config.block_n * _gemv_step_words(config) * 4
    ring_bytes = (-(-32768 // slot) + config.num_stages) * slot
    offsets = [int(o) for o in re.findall(r"@global_smem, i(?:32|64) (\d+)\)", kernel.asm["llir"])]
    assert offsets and min(offsets) >= ring_bytes, (min(offsets), ring_bytes)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not os.access(cuobjdump, os.X_OK):
        pytest.skip("Triton ships no cuobjdump here: spills unchecked")
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run(
        [str(cuobjdump), "--dump-resource-usage", str(cubin)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert re.search(r"STACK:0\b", usage) and re.search(r"LOCAL:0\b", usage), usage
