"""The GEMV compiled for sm_90 on this machine (Triton cross-compiles with its own ptxas; no GPU
needed), as CI runs it, for every launch shape the tuned table ships: the kernel builds, and
nothing but the byte table's lookups touches shared memory between the table's fill and the
final reduction. The lookups are inline asm that read the table at shared offset 0
(decode_4bit.fill_byte_table); Triton cannot see them, so to its allocator the table is dead
after the fill, and any other buffer used in the loop could be placed on top of it."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("triton.experimental.gluon")

from tests.kernels.hopper_sass import shipped_entries  # noqa: E402


def _shipped_gemv_shapes() -> list[tuple]:
    """(block_m, rows, threads_n, warps_n, num_warps, half_table, packed_fma, persistent,
    wide_table, pair_words, x_ahead) of every GEMV entry of the H200 table."""
    shapes = set()
    for config in shipped_entries("gemv"):
        rows = config["block_n"] // (config["threads_n"] * config["warps_n"])
        shapes.add(
            (config["block_m"], rows, config["threads_n"], config["warps_n"],
             config["num_warps"], config.get("half_table", False),
             config.get("packed_fma", False), config.get("programs_per_sm", 0) > 0,
             config.get("wide_table", False), config.get("pair_words", False),
             config.get("x_ahead", False))
        )  # fmt: skip
    return sorted(shapes)


def _compile(
    block_m: int, rows: int, threads_n: int, warps_n: int, num_warps: int, half_table: bool,
    packed_fma: bool = False, persistent: bool = False, wide_table: bool = False,
    pair_words: bool = False, x_ahead: bool = False, silu_and_mul: bool = False,
):  # fmt: skip
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
        WARPS_N=warps_n, SPLIT_K=1, PDL=True, HALF_TABLE=half_table,
        HALF2=packed_fma, PERSISTENT=persistent, WIDE_TABLE=wide_table, PAIR_WORDS=pair_words,
        X_AHEAD=x_ahead, SILU_AND_MUL=silu_and_mul,
    )  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 7, 8, 9, 11, 12)}
    source = GluonASTSource(gemv_4bit_kernel, signature, constants, aligned)
    hopper = GPUTarget("cuda", 90, 32)
    return triton.compile(source, target=hopper, options={"num_warps": num_warps})


def test_the_tuned_table_ships_gemv_launches():
    assert _shipped_gemv_shapes()


@pytest.mark.parametrize("shape", _shipped_gemv_shapes(), ids=str)
def test_only_the_table_lookups_touch_shared_memory_while_it_is_read(shape):
    from engine.kernels.decode_4bit import BYTE_TABLE_COPIES

    kernel = _compile(*shape)
    # [256, 16 copies, 2 fp32] or, the fp16 table, [256, 32 copies, 1 pair]: 32 KB either way;
    # the fp16 table's wide layout, [256, 64 slots, 1 pair]: 64 KB.
    table_bytes = 256 * BYTE_TABLE_COPIES * 2 * 4
    assert table_bytes == 256 * 32 * 4
    if len(shape) > 8 and shape[8]:
        table_bytes *= 2
    if shape[7]:  # persistent: the table stays allocated beside any reduction scratch
        warps_n, num_warps = shape[3:5]
        if num_warps > warps_n:  # K spans warps: the per-block sum goes through shared memory
            assert kernel.metadata.shared > table_bytes
        else:
            assert kernel.metadata.shared == table_bytes
        return
    assert kernel.metadata.shared == table_bytes
    lines = kernel.asm["ptx"].splitlines()
    barriers = [i for i, line in enumerate(lines) if "bar.sync" in line]
    lookup = "ld.shared.b32 q, [a]" if shape[5] else "ld.shared.v2.b32"
    lookups = [i for i, line in enumerate(lines) if lookup in line and "[a]" in line]
    waits = [i for i, line in enumerate(lines) if "griddepcontrol.wait" in line]
    assert lookups and len(waits) == 1
    fill_done = barriers[0]  # the barrier that ends the table's fill
    reduction = min(i for i in barriers if i > lookups[-1])  # the barrier after the loop
    assert fill_done < waits[0] < lookups[0]
    shared = re.compile(r"\b(ld|st|atom|red)\.shared|cp\.async")
    others = [
        line.strip()
        for line in lines[fill_done + 1 : reduction]
        if shared.search(line) and not (lookup in line and "[a]" in line)
    ]
    assert not others, f"shared memory used beside the byte table: {others[:3]}"


def test_persistent_gemv_keeps_its_table_beside_the_reduction_scratch():
    """Persistent programs sum each block inside the loop over blocks, so the reduction's
    scratch must not be placed on the table (decode_4bit.keep_table_live): K across warps
    needs scratch of its own, K within a warp needs none."""
    test_only_the_table_lookups_touch_shared_memory_while_it_is_read(
        (1, 4, 2, 4, 8, True, True, True)
    )
    test_only_the_table_lookups_touch_shared_memory_while_it_is_read(
        (1, 2, 2, 4, 4, True, True, True)
    )


def test_wide_table_gemv_reads_only_its_table_in_the_loop():
    """The wide fp16 table (64 KB, one prmt per lookup address), launched per block and
    persistent, as the tuned table may ship it."""
    test_only_the_table_lookups_touch_shared_memory_while_it_is_read(
        (1, 8, 2, 2, 4, True, True, False, True)
    )
    test_only_the_table_lookups_touch_shared_memory_while_it_is_read(
        (1, 4, 1, 4, 8, True, True, True, True)
    )


@pytest.mark.parametrize("shape", [s for s in _shipped_gemv_shapes() if s[1] % 2 == 0], ids=str)
def test_gemv_applying_silu_and_mul_reads_only_its_table_in_the_loop(shape):
    """The shipped launches with SiLU-and-mul applied as they write (gate/up row pairs, an even
    number of rows a thread): the same shared-memory rules, whatever the epilogue's layout
    change needs."""
    test_only_the_table_lookups_touch_shared_memory_while_it_is_read(
        (*shape, *[False] * (11 - len(shape)), True)
    )
