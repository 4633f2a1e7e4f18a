"""The GEMV compiled for sm_90 on this machine (Triton cross-compiles with its own ptxas; no GPU
needed), as CI runs it: the kernel builds, and its shared memory is the byte table alone. The
table's lookups are inline asm that read it at shared offset 0 (decode_4bit.fill_byte_table),
which holds only while no other buffer is live beside it."""

from __future__ import annotations

import pytest

pytest.importorskip("triton.experimental.gluon")


def _compile(block_m: int, rows: int, threads_n: int, warps_n: int, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from engine.kernels.gemv_4bit import gemv_4bit_kernel

    signature = {
        "x_ptr": "*i32", "w_ptr": "*i32", "absmax_ptr": "*fp32", "table_ptr": "*i32",
        "out_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
        "stride_om": "i32", "stride_ok": "i32", "stride_w": "i32", "stride_a": "i32",
    }  # fmt: skip
    constants = dict(
        BLOCKSIZE=64, X_FP16=False, BLOCK_M=block_m, ROWS=rows, THREADS_N=threads_n,
        WARPS_N=warps_n, SPLIT_K=1, PDL=True,
    )  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 7, 8, 9, 11, 12)}
    source = GluonASTSource(gemv_4bit_kernel, signature, constants, aligned)
    hopper = GPUTarget("cuda", 90, 32)
    return triton.compile(source, target=hopper, options={"num_warps": num_warps})


# Launch shapes the tuned table ships (engine/kernels/configs/NVIDIA_H200.json, buckets 1, 2).
SHIPPED = [(1, 4, 2, 2, 4), (1, 8, 2, 1, 4), (2, 4, 2, 2, 4)]


@pytest.mark.parametrize("block_m,rows,threads_n,warps_n,num_warps", SHIPPED)
def test_gemv_builds_for_hopper_with_only_the_byte_table_in_shared_memory(
    block_m, rows, threads_n, warps_n, num_warps
):
    from engine.kernels.decode_4bit import BYTE_TABLE_COPIES

    kernel = _compile(block_m, rows, threads_n, warps_n, num_warps)
    table_bytes = 256 * BYTE_TABLE_COPIES * 2 * 4  # [256 entries, copies, 2 fp32]
    assert kernel.metadata.shared == table_bytes
    ptx = kernel.asm["ptx"]
    assert ptx.count("ld.shared.v2.b32") % 4 == 0 and "griddepcontrol.wait" in ptx
