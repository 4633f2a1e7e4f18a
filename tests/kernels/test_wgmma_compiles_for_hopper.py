"""The warpgroup kernels (plain, warp-specialized cp.async-fed and TMA-fed) compiled for sm_90
on this machine (Triton cross-compiles with its own ptxas; no GPU needed), as CI runs it, for
every launch the tuned table ships and a few more: each builds, fits an SM's shared memory,
hands its decoder warps the registers the launcher asks for, spills nothing, and issues each
step's MMAs as one chain (ptxas serializes them, silently, when it cannot prove a pipeline
safe: then every HGMMA waits for its own end)."""

from __future__ import annotations

import dataclasses
import re

import pytest

pytest.importorskip("triton.experimental.gluon")

from engine.kernels.matmul_4bit import (  # noqa: E402
    DECODE_REGS,
    HOPPER_SHARED_BYTES,
    TMA_REGS,
    KernelConfig,
)
from tests.kernels.hopper_sass import (  # noqa: E402
    shipped_entries,
    spill_free_sass,
    warpgroup_signature,
)


def _launches() -> list[KernelConfig]:
    shipped = {KernelConfig(**entry) for entry in shipped_entries("wgmma")}
    others = {
        *_in_flight_launches(),
        KernelConfig("wgmma", 64, 64, 64, 1, 4, 3, w_left=False),
        KernelConfig("wgmma", 128, 128, 64, 1, 8, 4, w_left=True),  # two warpgroups
        KernelConfig("wgmma", 64, 128, 128, 1, 4, 6, w_left=False, decode_warps=8),
        KernelConfig("wgmma", 16, 64, 128, 4, 4, 5, decode_warps=4, decode_tiles=3),
        KernelConfig("wgmma", 64, 128, 128, 2, 4, 4, w_left=False, decode_warps=8, tma=True),
        KernelConfig("wgmma", 16, 64, 64, 4, 4, 6, decode_warps=4, tma=True),
    }
    return sorted(shipped | others, key=str)


def _in_flight_launches() -> list[KernelConfig]:
    """The shipped plain launches with their MMAs kept in flight, and two warpgroups so."""
    shipped = [KernelConfig(**entry) for entry in shipped_entries("wgmma")]
    twins = {
        dataclasses.replace(config, mma_in_flight=True)
        for config in shipped
        if not config.decode_warps
    }
    twins.add(KernelConfig("wgmma", 128, 128, 64, 1, 8, 4, w_left=True, mma_in_flight=True))
    return sorted(twins, key=str)


def _decode_regs(config: KernelConfig) -> tuple[int, int | None]:
    """The decoders' registers and the kernel's cap, as the launcher passes them (none for the
    plain kernel)."""
    if not config.decode_warps:
        return 0, None
    if config.tma:
        decode_regs, _, maxnreg = TMA_REGS[config.decode_warps]
        return decode_regs, maxnreg
    return DECODE_REGS[config.decode_warps]


def _compile(config: KernelConfig):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from engine.kernels.wgmma_4bit import tile_layouts, wgmma_4bit_kernel
    from engine.kernels.wgmma_tma_4bit import packed_tile_layout, wgmma_tma_4bit_kernel
    from engine.kernels.wgmma_ws_4bit import wgmma_ws_4bit_kernel

    bm, bn, bk = config.block_m, config.block_n, config.block_k
    signature, attrs = warpgroup_signature(config.split_k)
    decode_regs, maxnreg = _decode_regs(config)
    constants = dict(
        BLOCKSIZE=64, X_FP16=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=config.split_k,
        W_LEFT=config.w_left, NUM_STAGES=config.num_stages, DECODE_WARPS=config.decode_warps,
        DECODE_REGS=decode_regs, DECODE_TILES=config.decode_tiles,
    )  # fmt: skip
    kernel = wgmma_ws_4bit_kernel
    if not config.decode_warps:
        kernel = wgmma_4bit_kernel
        for name in ("DECODE_WARPS", "DECODE_REGS", "DECODE_TILES"):
            del constants[name]
        constants["MMA_IN_FLIGHT"] = config.mma_in_flight
    if config.tma:  # the descriptors come first; their types name the blocks and layouts
        x = TensorDescriptor.from_tensor(
            torch.empty(bm, 4096, dtype=torch.bfloat16), [bm, bk], tile_layouts(bk)[0]
        )
        w = TensorDescriptor.from_tensor(
            torch.empty(bn, 2048, dtype=torch.uint8), [bn, bk // 2], packed_tile_layout(bk)
        )
        signature = {"x_desc": mangle_type(x), "w_desc": mangle_type(w), **signature}
        attrs = {(i + 2,): value for (i,), value in attrs.items()}
        constants["LOADER_REGS"] = TMA_REGS[config.decode_warps][1]
        kernel = wgmma_tma_4bit_kernel
    signature.update(dict.fromkeys(constants, "constexpr"))
    source = GluonASTSource(kernel, signature, constants, attrs)
    options = {"num_warps": config.num_warps}
    if maxnreg:
        options["maxnreg"] = maxnreg
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


@pytest.mark.parametrize("config", _launches(), ids=str)
def test_warpgroup_launch_compiles_for_hopper(config, tmp_path):
    kernel = _compile(config)
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    if config.decode_warps:
        decode_regs = _decode_regs(config)[0]
        # The decoder partition's register budget, set as it starts.
        assert re.search(rf"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32 \t{decode_regs};", ptx)
        assert "mbarrier.try_wait" in ptx
    if config.tma:
        assert "cp.async.bulk.tensor" in ptx  # the loader's copies
    sass = spill_free_sass(kernel, tmp_path)
    mmas = [line for line in sass.splitlines() if "HGMMA" in line]
    # A step's BLOCK_K / 16 MMAs chain, the last one alone marked to be waited on.
    waited = sum("gsb0" in line for line in mmas)
    assert mmas and waited * (config.block_k // 16) <= len(mmas), f"{waited} of {len(mmas)}"


@pytest.mark.parametrize("config", _in_flight_launches(), ids=str)
def test_in_flight_launches_decode_under_their_own_mmas(config, tmp_path):
    """With mma_in_flight, every scaled pair of the next step (one packed multiply, HMUL2, per
    pair) is computed between a step's last MMA and the wait for it: the program decodes while
    its own MMAs run. (Waited for before the decode instead, ptxas moves the decode below the
    wait; wgmma_4bit.py.)"""
    body = _loop_body(spill_free_sass(_compile(config), tmp_path))
    last_mma = max(i for i, op in enumerate(body) if op == "HGMMA")
    pairs_per_thread = config.block_n * config.block_k // (2 * 32 * config.num_warps)
    assert "WARPGROUP.DEPBAR" not in body[last_mma:]
    assert body[last_mma:].count("HMUL2") == pairs_per_thread, body
    assert body[:last_mma].count("WARPGROUP.DEPBAR") == 1  # the wait, as the step begins


def _loop_body(sass: str) -> list[str]:
    """The opcodes of the K loop: from the label before the first MMA to the branch back."""
    label, body = None, []
    for line in sass.splitlines():
        if start := re.match(r"^(\.L_x_\d+):", line):
            label, body = start.group(1), []
        elif op := _OPCODE.search(line):
            body.append(op.group(1))
            if "HGMMA" in body and f"BRA `({label})" in line:
                return body
    raise AssertionError("no loop around the MMAs")


_OPCODE = re.compile(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.DEPBAR)?)")
