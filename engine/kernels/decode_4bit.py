"""Decoding bitsandbytes' 4-bit bytes in registers, for the fused matmul kernels.

A byte holds two codes (the first value in the high nibble). Rather than look them up in a table
in memory (one load per byte, which is what bounds a naive kernel), the 16 codes are held, as
bf16, in eight 32-bit registers: their high bytes in four, their low bytes in four (`code_table`
builds them; kernels load them once, so the compiler keeps them in registers instead of
re-creating constants). `prmt` (byte permute) picks four table bytes at once by four 3-bit
indices; a third `prmt` chooses, per byte, the table half the fourth index bit names. Two more
interleave high and low bytes into bf16 pairs. Four packed bytes become eight codes, as fp32, in
about 28 integer instructions, with no memory traffic.

Kernels run `DECODE_ASM` through `inline_asm_elementwise` with `pack=4` and arguments
(packed bytes, table word 0, ..., table word 7): outputs $0..$3 are the high-nibble codes of
bytes 0..3 of input $8, $4..$7 the low-nibble ones; each table word arrives four times (one per
packed element), of which the asm reads the first. The codes are the table's values rounded to
bf16 (NF4's within 0.3%; the rounding of a bf16 weight itself), so a bf16 model sees what
bitsandbytes' dequantization gives within bf16 rounding; an fp16 one slightly coarser codes.

`decode_pairs` (tensor-core kernels; `DECODE_PAIRS_*_ASM`) stops earlier: it leaves each byte's
two codes as one register of two 16-bit values in K order (the high nibble's value in the low
half, as MMA operands want them) and scales them there with one packed multiply (`mul.rn.bf16x2` or
`.f16x2`) by the block's absmax rounded to 16 bits, about 20 instructions per four bytes instead
of about 40 through fp32. The table it reads is in x's 16-bit type: `code_table` holds the codes
both as bf16 (words 0-7, which the fp32 decoder also widens) and as fp16 (words 8-15)."""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

# 8 outputs; the packed bytes; 8 table words x 4 elements each.
CONSTRAINTS = ",".join(["=r"] * 8 + ["r"] * (1 + 8 * 4))
# 4 outputs; the packed bytes; the scale pair x 4; 8 table words x 4.
PAIRS_CONSTRAINTS = ",".join(["=r"] * 4 + ["r"] * (1 + 4 + 8 * 4))
# The same over one int32 word of four bytes (pack=1): every argument once.
WORD_PAIRS_CONSTRAINTS = ",".join(["=r"] * 4 + ["r"] * (1 + 1 + 8))
TABLE_WORDS = 8  # one table: the codes in one 16-bit type
TABLE_STRIDE = 16  # words per copy in code_table: the bf16 table, then the fp16 one


def _words(values: list[int]) -> list[int]:
    """16 bytes -> four little-endian 32-bit words (prmt's byte order)."""
    return [sum(values[4 * w + i] << (8 * i) for i in range(4)) for w in range(4)]


def _table_words(code: tuple[float, ...], dtype: torch.dtype) -> list[int]:
    if len(code) != 16:
        raise ValueError(f"a 4-bit code table has 16 entries, got {len(code)}")
    bits = torch.tensor(code, dtype=torch.float32).to(dtype).view(torch.int16)
    bits = [int(b) & 0xFFFF for b in bits.tolist()]
    return _words([b >> 8 for b in bits]) + _words([b & 0xFF for b in bits])


def code_table(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The 16-entry code table as the decoders' int32 words: eight for the codes as bf16 (high
    bytes, then low bytes), eight more for them as fp16; repeated 32 times ([32, 16]). Kernels
    index the copies by something that varies across a warp's threads (a chunk or row index,
    mod 32), so each thread loads a table of its own and the compiler keeps it in ordinary
    registers rather than uniform ones. One read-only tensor
    per code and device, shared by every layer that uses it."""
    return _code_table(tuple(code.float().cpu().tolist()), torch.device(device))


@functools.cache
def _code_table(code: tuple[float, ...], device: torch.device) -> torch.Tensor:
    words = _table_words(code, torch.bfloat16) + _table_words(code, torch.float16)
    table = torch.tensor(words, dtype=torch.int64).to(torch.int32)
    return table.repeat(32, 1).to(device)


def _lookup(packed: str, first_table_arg: int, half: int, copies: int = 4) -> list[str]:
    """Asm setting H and L to the high and low bytes of the codes of nibbles 4*half..4*half+3 of
    `packed` (bytes b0..b3, nibbles low b0, high b0, low b1, ... from bit 0 up). Each table word
    is `copies` consecutive arguments (one per packed element), of which the first is read."""
    table = {f"{name}{i}": f"${first_table_arg + copies * (4 * t + i)}"
             for t, name in enumerate(("hb", "lb")) for i in range(4)}  # fmt: skip
    lines = []
    if half == 0:
        # As table indices, a nibble's low three bits pick within a table half and its top bit
        # picks the half (prmt selector 4 + i): sel holds the former, pick the latter.
        lines += [
            f"and.b32 sel, {packed}, 0x77777777;",
            f"shr.b32 t, {packed}, 1;",
            "lop3.b32 pick, t, 0x44444444, 0x32103210, 0xea;",  # (t & 0x4444..) | 0x3210..
        ]
    else:  # prmt reads selector bits 15:0
        lines += ["shr.b32 sel, sel, 16;", "shr.b32 pick, pick, 16;"]
    for name, out in (("hb", "H"), ("lb", "L")):
        lines += [
            f"prmt.b32 a, {table[name + '0']}, {table[name + '1']}, sel;",
            f"prmt.b32 b, {table[name + '2']}, {table[name + '3']}, sel;",
            f"prmt.b32 {out}, a, b, pick;",
        ]
    return lines


def _decode_asm() -> str:
    lines = ["{", ".reg .b32 sel, pick, t, a, b, H, L, P, Q;"]
    for half in range(2):  # bytes 0-1, then bytes 2-3
        lines += _lookup("$8", 9, half)
        # P = bf16 pair (code(low b), code(high b)); Q the same for the next byte.
        lines += ["prmt.b32 P, L, H, 0x5140;", "prmt.b32 Q, L, H, 0x7362;"]
        first, second = 2 * half, 2 * half + 1
        lines += [
            f"and.b32 ${first}, P, 0xffff0000;",
            f"shl.b32 ${first + 4}, P, 16;",
            f"and.b32 ${second}, Q, 0xffff0000;",
            f"shl.b32 ${second + 4}, Q, 16;",
        ]
    lines.append("}")
    return "\n".join(lines)


def _decode_pairs_asm(multiply: str, copies: int = 4) -> str:
    """$0..$3: byte i's (high-nibble, low-nibble) codes as one 16-bit pair, low half first,
    times the scale pair $5; $4: the packed bytes; then the table words, `copies` arguments
    each (pack=4 over bytes: 4; pack=1 over int32 words: 1)."""
    lines = ["{", ".reg .b32 sel, pick, t, a, b, H, L, P, Q;"]
    for half in range(2):
        lines += _lookup("$4", 5 + copies, half, copies)
        # P = (code(high nibble), code(low nibble)) of byte 2*half, low half first; Q the next.
        lines += ["prmt.b32 P, L, H, 0x4051;", "prmt.b32 Q, L, H, 0x6273;"]
        lines += [f"{multiply} ${2 * half}, P, $5;", f"{multiply} ${2 * half + 1}, Q, $5;"]
    lines.append("}")
    return "\n".join(lines)


DECODE_ASM = _decode_asm()
DECODE_PAIRS_BF16_ASM = _decode_pairs_asm("mul.rn.bf16x2")
DECODE_PAIRS_FP16_ASM = _decode_pairs_asm("mul.rn.f16x2")
WORD_PAIRS_BF16_ASM = _decode_pairs_asm("mul.rn.bf16x2", copies=1)
WORD_PAIRS_FP16_ASM = _decode_pairs_asm("mul.rn.f16x2", copies=1)


_ASM = gl.constexpr(DECODE_ASM)
_CONSTRAINTS = gl.constexpr(CONSTRAINTS)
_PAIRS_CONSTRAINTS = gl.constexpr(PAIRS_CONSTRAINTS)
_PAIRS_BF16 = gl.constexpr(DECODE_PAIRS_BF16_ASM)
_PAIRS_FP16 = gl.constexpr(DECODE_PAIRS_FP16_ASM)
_WORD_CONSTRAINTS = gl.constexpr(WORD_PAIRS_CONSTRAINTS)
_WORD_BF16 = gl.constexpr(WORD_PAIRS_BF16_ASM)
_WORD_FP16 = gl.constexpr(WORD_PAIRS_FP16_ASM)
# The absmax, rounded to x's 16-bit type, in both halves of a register.
_SCALE_BF16 = gl.constexpr("cvt.rn.bf16x2.f32 $0, $1, $1;")
_SCALE_FP16 = gl.constexpr("cvt.rn.f16x2.f32 $0, $1, $1;")
_TABLE_WORDS = gl.constexpr(TABLE_WORDS)
_TABLE_STRIDE = gl.constexpr(TABLE_STRIDE)


@gluon.jit
def load_code_table(table_ptr, lane, FP16: gl.constexpr = False):
    """The eight table words (the fp16 table if FP16, else the bf16 one), each a tensor of
    per-thread copies: `lane` is an integer tensor that varies across a warp's threads (taken
    mod 32), so every thread reads one of code_table's 32 copies."""
    t_ptrs = table_ptr + (_TABLE_WORDS if FP16 else 0) + (lane % 32) * _TABLE_STRIDE
    return (
        gl.load(t_ptrs + 0), gl.load(t_ptrs + 1), gl.load(t_ptrs + 2), gl.load(t_ptrs + 3),
        gl.load(t_ptrs + 4), gl.load(t_ptrs + 5), gl.load(t_ptrs + 6), gl.load(t_ptrs + 7),
    )  # fmt: skip


@gluon.jit
def decode(packed, t0, t1, t2, t3, t4, t5, t6, t7):
    """uint8 bytes -> (high-nibble codes, low-nibble codes) as fp32 (Gluon kernels)."""
    return gl.inline_asm_elementwise(
        _ASM, _CONSTRAINTS, [packed, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=(gl.float32, gl.float32), is_pure=True, pack=4,
    )  # fmt: skip


@gluon.jit
def _scale_pair(scale, FP16: gl.constexpr):
    """The absmax rounded to the 16-bit type, in both halves of an int32."""
    return gl.inline_asm_elementwise(
        _SCALE_FP16 if FP16 else _SCALE_BF16, "=r,r", [scale], gl.int32, True, 1
    )


@gluon.jit
def decode_pairs(packed, scale, t0, t1, t2, t3, t4, t5, t6, t7, FP16: gl.constexpr):
    """uint8 bytes [..., byte] and their fp32 absmax [...] -> int32 [..., byte]: each byte's two
    codes times the absmax, as one register of two 16-bit values (fp16 if FP16, else bf16) in K
    order (tensor-core kernels). The table words must be of the same type."""
    scale_pair = gl.expand_dims(_scale_pair(scale, FP16), len(packed.shape) - 1)
    return gl.inline_asm_elementwise(
        _PAIRS_FP16 if FP16 else _PAIRS_BF16, _PAIRS_CONSTRAINTS,
        [packed, scale_pair, t0, t1, t2, t3, t4, t5, t6, t7], dtype=gl.int32, is_pure=True,
        pack=4,
    )  # fmt: skip


@gluon.jit
def decode_word_pairs(words, scale, t0, t1, t2, t3, t4, t5, t6, t7, FP16: gl.constexpr):
    """`decode_pairs` over int32 words of four bytes each [..., word] -> [..., word, 2, 2] (byte
    2j + i of a word at [..., j, i]: the bytes in order, row-major). Words are what a kernel
    keeps in registers across loop iterations: bytes carried through a loop are re-packed into
    registers one by one."""
    scale_pair = gl.expand_dims(_scale_pair(scale, FP16), len(words.shape) - 1)
    p0, p1, p2, p3 = gl.inline_asm_elementwise(
        _WORD_FP16 if FP16 else _WORD_BF16, _WORD_CONSTRAINTS,
        [words, scale_pair, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=True, pack=1,
    )  # fmt: skip
    return gl.join(gl.join(p0, p2), gl.join(p1, p3))
