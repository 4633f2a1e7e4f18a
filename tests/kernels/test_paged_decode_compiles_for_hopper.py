"""The decode attention kernel over an fp8 cache, compiled for sm_90 on any machine (no GPU):
the cache widens to fp16 in one conversion per value pair, with no second conversion per
value to bf16 (`FP16_DOTS`). That second conversion was what bounded the kernel over an fp8
cache: it runs on the SM's conversion unit, at a fraction of the arithmetic rate."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

CACHES = {"fp8_e4m3": ("fp8e4nv", "e4m3x2"), "fp8_e5m2": ("fp8e5", "e5m2x2")}
INT_ARGS = (
    "sliding_window", "stride_q_tok", "stride_q_head", "stride_bt", "stride_o_tok",
    "stride_o_head", "stride_c_block", "stride_c_tok", "stride_c_head", "stride_cos",
    "stride_k_tok", "stride_v_tok",
)  # fmt: skip


def _ptx(cache: str, rotary: bool, fp16_dots: bool) -> str:
    """The PTX of Llama-2-7B's launch (32 query heads over 32 KV heads, 128 dims, one split) with
    a bf16 query, as the launcher's arguments specialize it (pointers and strides: multiples of
    16)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.kernels.paged_attention import _paged_decode

    signature = {
        "q_ptr": "*bf16", "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}",
        "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "out_ptr": "*bf16",
        "partial_ptr": "*fp32", "stats_ptr": "*fp32", "counts_ptr": "*i32", "scale": "fp32",
        "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "k_new_ptr": "*bf16",
        "v_new_ptr": "*bf16", "slot_mapping_ptr": "*i64",
    }  # fmt: skip
    signature.update(dict.fromkeys(INT_ARGS, "i32"))
    names = [n for n in _paged_decode.arg_names if n in signature]
    signature = {n: signature[n] for n in names}
    constants = dict(
        QUERY_GROUP=1, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, TILE=64, PRECISION="tf32",
        NUM_SPLITS=1, PDL=True, ROTARY=rotary, FP16_DOTS=fp16_dots,
    )  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(_paged_decode, signature, constants, attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return kernel.asm["ptx"]


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("cache", CACHES)
def test_an_fp8_cache_widens_once_per_value_pair(cache, rotary):
    cache_type, pair = CACHES[cache]
    ptx = _ptx(cache_type, rotary, fp16_dots=True)
    assert f"cvt.rn.f16x2.{pair}" in ptx
    assert "cvt.bf16.f16" not in ptx


def test_the_check_sees_the_bf16_widening():
    """With FP16_DOTS off (the kernel before it: bf16 dots for a bf16 query) the fp8 cache
    widens to bf16 through fp16, the conversion that the test above rules out."""
    assert "cvt.bf16.f16" in _ptx("fp8e4nv", rotary=True, fp16_dots=False)
