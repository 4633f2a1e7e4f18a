"""The GEMV's shared-memory byte tables (fp32 and fp16 code pairs), on the host side: what
`code_table` hands the kernels and the address arithmetic their lookup asm does, checked against
bitsandbytes' own code tables. The lookups themselves run only on a GPU
(tests/kernels/test_matmul_4bit.py); these run in CI."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")
bnbF = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_byte_table_holds_both_codes_of_every_byte(quant_type):
    """Entry e of the table the GEMV copies to shared memory is (code[e >> 4], code[e & 15]) in
    fp32, exactly: a byte's first value is in its high nibble."""
    from engine.kernels.decode_4bit import PAIR_TABLE_OFFSET, code_table

    code = bnbF.get_4bit_type(quant_type, device="cpu")
    table = code_table(code, torch.device("cpu"))
    pairs = table[PAIR_TABLE_OFFSET : PAIR_TABLE_OFFSET + 512].view(torch.float32).view(256, 2)
    values = code.float()
    for byte in (0, 1, 0x10, 0x7F, 0xA5, 0xFF):
        assert pairs[byte, 0] == values[byte >> 4] and pairs[byte, 1] == values[byte & 15]
    expected = torch.stack([values.repeat_interleave(16), values.repeat(16)], dim=1)
    assert torch.equal(pairs, expected)


def _lookup_addresses(
    asm: str, word: int, copy_offset: int, word_arg: str = "$8", offset_arg: str = "$9"
) -> list[int]:
    """The shared-memory offsets a lookup asm loads from for one word (its operands word_arg and
    offset_arg), by evaluating its integer instructions: shl/shr then lop3 0xea = (a & b) | c,
    or one prmt."""
    word_re, offset_re = re.escape(word_arg), re.escape(offset_arg)
    addresses = []
    t = 0
    for line in asm.splitlines():
        if m := re.match(rf"shl\.b32 t, {word_re}, (\d+);", line):
            t = (word << int(m.group(1))) & 0xFFFFFFFF
        elif m := re.match(rf"shr\.u32 t, {word_re}, (\d+);", line):
            t = word >> int(m.group(1))
        elif m := re.match(rf"lop3\.b32 a, t, (0x[0-9a-f]+), {offset_re}, 0xea;", line):
            addresses.append((t & int(m.group(1), 16)) | copy_offset)
        elif m := re.match(rf"prmt\.b32 a, {word_re}, {offset_re}, (0x[0-9a-f]+);", line):
            addresses.append(_prmt(word, copy_offset, int(m.group(1), 16)))
    return addresses


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX prmt.b32 (default mode, selectors 0-7): byte i of the result is byte
    (selector >> 4i) & 7 of b:a."""
    source = (b << 32) | a
    picks = ((source >> (8 * ((selector >> (4 * i)) & 7))) & 0xFF for i in range(4))
    return sum(byte << (8 * i) for i, byte in enumerate(picks))


@pytest.mark.parametrize("half", [False, True])
def test_lookup_addresses_match_the_filled_layout(half):
    """The asm must read entry `byte k of the word` from the thread's copy, as the fill lays
    the table out ([256 entries, 16 copies, 2 fp32] row-major, or for the fp16 table
    [256 entries, 32 copies, 1 pair]), for every byte value and every lane."""
    from engine.kernels.decode_4bit import (
        BYTE_TABLE_COPIES,
        HALF_PAIR_COPIES,
        _byte_lookup_asm,
        _half_lookup_asm,
    )

    asm = _half_lookup_asm() if half else _byte_lookup_asm()
    assert asm.count("ld.shared.b32" if half else "ld.shared.v2.b32") == 4
    entry_bytes = HALF_PAIR_COPIES * 4 if half else BYTE_TABLE_COPIES * 2 * 4
    for lane in range(32):
        copy_offset = lane * 4 if half else (lane % BYTE_TABLE_COPIES) * 8
        for word in (0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF, 0x80FF7F01):
            wanted = [((word >> (8 * k)) & 0xFF) * entry_bytes + copy_offset for k in range(4)]
            assert _lookup_addresses(asm, word, copy_offset) == wanted


@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_packed_lookup_addresses_match_the_filled_layout(wide, accumulate):
    """The packed-fp16 GEMV's asm must read entry `byte k of the word` from the lane's copy of
    the fp16 table as `fill_half_pair_table` lays it out: [256 entries, 32 copies] of int32, or
    with the wide layout [256 entries, 64 slots] (copies in the first 32), for every byte value
    and lane."""
    from engine.kernels.decode_4bit import HALF_PAIR_COPIES, WIDE_PAIR_SLOTS, _half2_word_asm

    asm = _half2_word_asm(wide, accumulate)
    assert asm.count("ld.shared.b32") == 4
    # A chain continuing an earlier word's sum starts from it ($7), else from the first product.
    first = "fma.rn.f16x2 s, q, $3, $7;" if accumulate else "mul.rn.f16x2 s, q, $3;"
    assert first in asm
    entry_bytes = (WIDE_PAIR_SLOTS if wide else HALF_PAIR_COPIES) * 4
    for lane in range(32):
        for word in (0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF, 0x80FF7F01):
            wanted = [((word >> (8 * k)) & 0xFF) * entry_bytes + lane * 4 for k in range(4)]
            assert _lookup_addresses(asm, word, lane * 4, "$1", "$2") == wanted


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_half_pair_table_is_each_bytes_codes_in_fp16(quant_type):
    """Entry e of the fp16 byte table is one int32: code[e >> 4] in the low half (a byte's first
    value), code[e & 15] in the high half."""
    from engine.kernels.decode_4bit import HALF_PAIR_TABLE_OFFSET, code_table

    code = bnbF.get_4bit_type(quant_type, device="cpu")
    table = code_table(code, torch.device("cpu"))
    words = table[HALF_PAIR_TABLE_OFFSET : HALF_PAIR_TABLE_OFFSET + 256]
    assert table.numel() == HALF_PAIR_TABLE_OFFSET + 256  # nothing after it
    values = code.float().to(torch.float16)
    low = (words & 0xFFFF).to(torch.int16).view(torch.float16)
    high = (words >> 16).to(torch.int16).view(torch.float16)
    assert torch.equal(low, values.repeat_interleave(16))
    assert torch.equal(high, values.repeat(16))
