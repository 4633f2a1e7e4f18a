"""Asking L2 for a kernel's weight bytes ahead of use (Hopper's bulk prefetch,
`cp.async.bulk.prefetch.L2`): one instruction per contiguous range, no registers or shared memory
held while the bytes arrive.

A 4-bit GEMV keeps only a step or two of weight words in flight per thread (registers bound
it), so its reads wait on DRAM latency. A program that asks L2 for its whole block of rows when
it starts (before it waits on the kernel before it, PDL) has all of its bytes in flight at once,
and its loads then find them in L2, or on their way there. The weights are never written while
a forward pass runs, so the prefetch may run before that wait."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# $1: the range's start (a 64-bit address), $2: its length in bytes (none if 0). The range is
# widened to 16-byte boundaries (the instruction's alignment); $0 is a dummy output.
_PREFETCH = gl.constexpr(
    "{ .reg .b64 a, e, n; .reg .b32 s; .reg .pred p; "
    "cvt.u64.u32 n, $2; add.u64 e, $1, n; add.u64 e, e, 15; and.b64 e, e, -16; "
    "and.b64 a, $1, -16; sub.u64 n, e, a; cvt.u32.u64 s, n; setp.ne.u32 p, $2, 0; "
    "@p cp.async.bulk.prefetch.L2.global [a], s; mov.u32 $0, 0; }"
)


@gluon.jit
def prefetch_rows_l2(base_ptr, first_row, NUM_ROWS: gl.constexpr, end_row, row_bytes):
    """Ask L2 for rows first_row.. first_row + NUM_ROWS (those before end_row) of a row-major
    array of `row_bytes`-byte rows at base_ptr: one bulk prefetch per warp, each warp a
    contiguous share. (The instruction takes a warp-uniform address: one that differs across a
    warp's lanes is issued once per distinct value, in a loop.)"""
    W: gl.constexpr = gl.num_warps()
    per_warp: gl.constexpr = (NUM_ROWS + W - 1) // W
    # Element w in every lane of warp w.
    layout: gl.constexpr = gl.SliceLayout(1, gl.BlockedLayout([1, 1], [1, 32], [W, 1], [1, 0]))
    w = gl.arange(0, W, layout=layout)
    start = gl.minimum(first_row + w * per_warp, end_row)
    stop = gl.minimum(start + per_warp, gl.minimum(first_row + NUM_ROWS, end_row))
    addresses = base_ptr.to(gl.int64, bitcast=True) + start.to(gl.int64) * row_bytes
    sizes = (stop - start) * row_bytes
    gl.inline_asm_elementwise(
        _PREFETCH, "=r,l,r", [addresses, sizes], dtype=gl.int32, is_pure=False, pack=1
    )
