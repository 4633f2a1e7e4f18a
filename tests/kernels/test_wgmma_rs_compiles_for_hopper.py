"""The register-A warpgroup kernel (`wgmma_rs_4bit.py`) compiled for sm_90 on this machine
(Triton cross-compiles with its own ptxas; no GPU needed), for every launch the tuned table
ships and a sample of the tuner's: each builds, fits shared memory, spills nothing, moves no
decoded weight through shared memory, and leaves the registers its MMAs read alone until it has
waited for them. ptxas does not: given the chance it hands an in-flight MMA's A registers to
the next step's decode (seen as wrong results on an H100 once several programs shared an SM),
so the kernel waits for each step's MMAs before decoding the next."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("triton.experimental.gluon")

from engine.kernels.matmul_4bit import HOPPER_SHARED_BYTES, KernelConfig  # noqa: E402
from tests.kernels.hopper_sass import (  # noqa: E402
    a_register_hazards,
    shipped_entries,
    spill_free_sass,
    warpgroup_signature,
)


def _launches() -> list[KernelConfig]:
    shipped = {KernelConfig(**entry) for entry in shipped_entries("wgmma_rs")}
    others = {
        KernelConfig("wgmma_rs", 16, 64, 128, 4, 4, 2),
        KernelConfig("wgmma_rs", 32, 128, 128, 2, 8, 4),
        KernelConfig("wgmma_rs", 64, 64, 128, 1, 4, 3),
        KernelConfig("wgmma_rs", 128, 128, 128, 1, 8, 3),
    }
    return sorted(shipped | others, key=str)


def _compile(config: KernelConfig, k: int = 4096):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from engine.kernels.wgmma_rs_4bit import wgmma_rs_4bit_kernel

    signature, attrs = warpgroup_signature(config.split_k)
    constants = dict(
        BLOCKSIZE=64, X_FP16=False, BLOCK_M=config.block_m, SPLIT_K=config.split_k,
        NUM_STAGES=config.num_stages, X_STRIDE=k,
    )  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    source = GluonASTSource(wgmma_rs_4bit_kernel, signature, constants, attrs)
    return triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps}
    )


def test_the_hazard_check_sees_an_overwritten_a_register():
    after = """
        /*0100*/                   HGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR8], R24, gsb0 ;
        /*0110*/                   HMUL2.BF16_V2 R58, R60, R61 ;
        /*0120*/                   LDS.128 R52, [R89+UR8+0x10000] ;
        /*0125*/                   LDS.128 R54, [R89+UR8+0x10010] ;
        /*0130*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0140*/                   LEA R56, P6, R9, R134, 0x2 ;
    """
    assert [h.split()[1] for h in a_register_hazards(after)] == ["HMUL2.BF16_V2", "LDS.128"]
    # Left in flight at the loop's end, the MMA meets the writes at its top.
    around = """
.L_x_1:
        /*0200*/                   LEA R57, P6, R9, R134, 0x2 ;
        /*0210*/                   HGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR8], R24, gsb0 ;
        /*0220*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0230*/               @P6 BRA `(.L_x_1) ;
        /*0240*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
    """
    assert [h.split()[1] for h in a_register_hazards(around)] == ["LEA"]
    assert not a_register_hazards(around.replace("gsb0, 0x1", "gsb0, 0x0"))


@pytest.mark.parametrize("config", _launches(), ids=str)
def test_register_a_launch_compiles_for_hopper(config, tmp_path):
    kernel = _compile(config)
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx
    # The weights reach the MMAs from registers: the only shared stores are the copies'.
    assert not re.search(r"\bst\.shared", ptx)
    sass = spill_free_sass(kernel, tmp_path)
    mmas = [line for line in sass.splitlines() if "HGMMA" in line]
    assert mmas and all(re.search(r"HGMMA\S* R\d+, R\d+,", line) for line in mmas)
    assert not a_register_hazards(sass)
