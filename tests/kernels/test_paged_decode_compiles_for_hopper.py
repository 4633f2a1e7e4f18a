"""The decode attention kernel over an fp8 (e4m3) cache, compiled for sm_90 on any machine (no
GPU), as the engine launches it for Llama-2-7B (32 query heads over 32 KV heads, 128 dims, a bf16
query, int64 block tables and context lengths): the cache widens to fp16 in one conversion per
value pair and the dots run in fp16 (`FP16_DOTS`), with no second conversion per value to bf16;
and the one-split launch, which batches of 16 and more run, fits three programs an SM."""

from __future__ import annotations

import re

import pytest

from tests.kernels.hopper_sass import resource_usage

triton = pytest.importorskip("triton")

INT_ARGS = (
    "sliding_window", "stride_q_tok", "stride_q_head", "stride_bt", "stride_o_tok",
    "stride_o_head", "stride_c_block", "stride_c_tok", "stride_c_head", "stride_cos",
    "stride_k_tok", "stride_v_tok",
)  # fmt: skip
# Any conversion whose result is bf16 and whose source is fp16 (cvt.bf16.f16, cvt.rn.bf16.f16..).
TO_BF16 = re.compile(r"\bcvt(\.\w+)*\.bf16(x2)?\.f16(x2)?\b")
FP16_MMA = re.compile(r"\bmma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.f16\.f16\.f32\b")


def _compile(rotary: bool, fp16_dots: bool = True):
    """The launch for an e4m3 cache: rotary-fused with 4 splits (few sequences) or one split
    (the engine fuses the rotary only where it splits), as the launcher's arguments specialize it
    (pointers and strides: multiples of 16)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.kernels.paged_attention import _paged_decode

    signature = {
        "q_ptr": "*bf16", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv",
        "block_tables_ptr": "*i64", "context_lens_ptr": "*i64", "out_ptr": "*bf16",
        "partial_ptr": "*fp32", "stats_ptr": "*fp32", "counts_ptr": "*i32", "scale": "fp32",
        "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "k_new_ptr": "*bf16",
        "v_new_ptr": "*bf16", "slot_mapping_ptr": "*i64",
    }  # fmt: skip
    signature.update(dict.fromkeys(INT_ARGS, "i32"))
    names = [n for n in _paged_decode.arg_names if n in signature]
    signature = {n: signature[n] for n in names}
    constants = dict(
        QUERY_GROUP=1, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, TILE=64, PRECISION="tf32",
        NUM_SPLITS=4 if rotary else 1, PDL=True, ROTARY=rotary, FP16_DOTS=fp16_dots,
    )  # fmt: skip
    signature.update(dict.fromkeys(constants, "constexpr"))
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n.startswith("stride")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(_paged_decode, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


@pytest.mark.parametrize("rotary", [True, False])
def test_an_e4m3_cache_widens_once_per_value_pair(rotary):
    ptx = _compile(rotary).asm["ptx"]
    assert "cvt.rn.f16x2.e4m3x2" in ptx
    assert not TO_BF16.search(ptx)
    assert FP16_MMA.search(ptx)


def test_the_one_split_launch_fits_three_programs_an_sm(tmp_path):
    """An sm_90 SM has 64K registers: 128 threads at 168 registers, no spill (with the context
    length taken as int64 the launch took 205: two programs)."""
    usage = resource_usage(_compile(rotary=False), tmp_path)
    assert re.search(r"STACK:0\b", usage), usage
    assert 3 * 128 * int(re.search(r"REG:(\d+)", usage).group(1)) <= 65536, usage


def test_the_check_sees_the_bf16_widening():
    """With FP16_DOTS off (the kernel before it: bf16 dots for a bf16 query) the e4m3 cache
    widens to bf16 through fp16, the conversion that the tests above rule out."""
    ptx = _compile(rotary=True, fp16_dots=False).asm["ptx"]
    assert TO_BF16.search(ptx) and not FP16_MMA.search(ptx)
