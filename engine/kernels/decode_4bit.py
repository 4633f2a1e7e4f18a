"""Decoding bitsandbytes' 4-bit bytes for the fused matmul kernels: in registers (the tensor-core
kernels, the portable Triton kernel) or from a byte table in shared memory (the GEMV, below).

A byte holds two codes (the first value in the high nibble). The register decoders look them
up without touching memory: the 16 codes are held, as bf16, in eight 32-bit registers, their
high bytes in four, their low bytes in four (`code_table` builds them; kernels load them once,
so the compiler keeps them in registers instead of re-creating constants). `prmt` (byte
permute) picks four table bytes at once by four 3-bit indices; a third `prmt` chooses, per
byte, the table half the fourth index bit names. Two more interleave high and low bytes into
bf16 pairs. Four packed bytes become eight codes, as fp32, in about 28 integer instructions,
with no memory traffic.

The portable Triton kernel (`gemm_4bit.py`) runs `DECODE_ASM` through
`inline_asm_elementwise` with `pack=4` and arguments
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
both as bf16 (words 0-7, which the fp32 decoder also widens) and as fp16 (words 8-15).

`decode_words` (the GEMV) goes the other way: with the weight bytes the whole cost at batch 1,
it spends one instruction on a byte's two codes, an 8-byte load of them as fp32 from a table
of all 256 byte values in shared memory (`fill_byte_table`; a shift and a lop3 build the
address). The table is repeated so that a warp's loads never share a bank; they are exact fp32
codes."""

from __future__ import annotations

import functools

import torch
import triton
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
PAIR_TABLE_OFFSET = 32 * TABLE_STRIDE  # where code_table's byte table (256 fp32 pairs) starts
# Then the fp16 byte table (256 int32s: a byte's two codes as one fp16 pair).
HALF_PAIR_TABLE_OFFSET = PAIR_TABLE_OFFSET + 2 * 256


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
    bytes, then low bytes), eight more for them as fp16; repeated 32 times (32 x 16 words), then
    the byte table (256 fp32 pairs) that the GEMV copies to shared memory (`fill_byte_table`),
    then the fp16 byte table (256 fp16 pairs: the high nibble's code in the low half), which the
    GEMV can copy there instead (`fill_half_pair_table`).
    Register decoders index the 32 copies by something that varies across a warp's threads (a
    chunk or row index, mod 32), so each thread loads a table of its own and the compiler keeps
    it in ordinary registers rather than uniform ones. One read-only tensor per code and device,
    shared by every layer that uses it."""
    return _code_table(tuple(code.float().cpu().tolist()), torch.device(device))


@functools.cache
def _code_table(code: tuple[float, ...], device: torch.device) -> torch.Tensor:
    words = _table_words(code, torch.bfloat16) + _table_words(code, torch.float16)
    table = torch.tensor(words, dtype=torch.int64).to(torch.int32).repeat(32, 1).flatten()
    # Then the byte table: for each byte value, (code[high nibble], code[low nibble]) in fp32.
    values = torch.tensor(code, dtype=torch.float32)
    pairs = torch.stack([values.repeat_interleave(16), values.repeat(16)], dim=1)
    # The same as fp16 pairs, one int32 each: (high code, low code), low half first.
    half_pairs = pairs.to(torch.float16).view(torch.int32).flatten()
    return torch.cat([table, pairs.flatten().view(torch.int32), half_pairs]).to(device)


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


# The shared-memory byte decoder. One 8-byte entry per byte value (its two codes in fp32), 16
# copies of the 256 entries (32 KB): an 8-byte load is served a half-warp at a time, and lane
# l reads copy l % 16, so a warp's 32 lookups never share a bank. (32 copies, 64 KB, would let
# one prmt build the address instead of a shift and a lop3; it measured 5-10% slower.)
BYTE_TABLE_COPIES = 16


def _entry_address(k: int) -> list[str]:
    """Asm setting `a` to the shared address of byte k of the word $8's entry in this thread's
    copy ($9: the copy's offset) of a table of 128-byte entries at shared offset 0."""
    shift = "shl.b32 t, $8, 7;" if k == 0 else f"shr.u32 t, $8, {8 * k - 7};"
    # (byte k << 7) | copy offset, then the start of shared memory.
    return [shift, "lop3.b32 a, t, 0x7f80, $9, 0xea;", "add.u32 a, a, base;"]


def _byte_lookup_asm() -> str:
    """$0..$3: the high-nibble codes (fp32) of bytes 0..3 of the word $8, $4..$7 the low-nibble
    ones; $9: this thread's copy's offset ((lane % 16) * 8) in the table at the start of shared
    memory. Entry e of copy c is at e * 128 + c * 8."""
    lines = ["{", ".reg .b32 t, a, base;", "mov.u32 base, global_smem;"]
    for k in range(4):
        lines += _entry_address(k) + [f"ld.shared.v2.b32 {{${k}, ${k + 4}}}, [a];"]
    lines.append("}")
    return "\n".join(lines)


# 8 outputs; the word; the copy offset.
_WORD_LOOKUP_CONSTRAINTS = gl.constexpr(",".join(["=r"] * 8 + ["r"] * 2))
_BYTE_LOOKUP = gl.constexpr(_byte_lookup_asm())
_COPIES = gl.constexpr(BYTE_TABLE_COPIES)
_LANE = gl.constexpr("mov.u32 $0, %laneid;")
_PAIR_TABLE_OFFSET = gl.constexpr(PAIR_TABLE_OFFSET)


@triton.constexpr_function
def _table_layout(copies, entry_words, num_warps):
    """The registers' layout of a [256, copies, entry_words] table: one entry a thread."""
    lanes = min(copies, 32)  # more copies than lanes (a wide table's slots): in registers
    return gl.BlockedLayout(
        [1, copies // lanes, entry_words], [32 // lanes, lanes, 1], [num_warps, 1, 1], [2, 1, 0]
    )


@gluon.jit
def _fill_table(
    table_ptr, OFFSET: gl.constexpr, COPIES: gl.constexpr, ENTRY_WORDS: gl.constexpr,
    NUM_WARPS: gl.constexpr, SLOTS: gl.constexpr = 0,
):  # fmt: skip
    """Fill shared memory [256, COPIES, ENTRY_WORDS] int32 with COPIES copies of each of
    code_table's 256 byte entries (ENTRY_WORDS int32s each, from OFFSET), and wait for every
    thread's part. SLOTS > COPIES: entries SLOTS copies apart, the copies in the first slots.
    Returns the buffer (for `keep_table_live`)."""
    layout: gl.constexpr = _table_layout(COPIES, ENTRY_WORDS, NUM_WARPS)
    e = gl.arange(0, 256, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
    h = gl.arange(0, ENTRY_WORDS, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
    src = gl.expand_dims(gl.expand_dims(e * ENTRY_WORDS, 1), 2)
    src = src + gl.expand_dims(gl.expand_dims(h, 0), 1)
    values = gl.load(table_ptr + OFFSET + src)  # [256, 1, ENTRY_WORDS]
    values = values + gl.zeros([256, COPIES, ENTRY_WORDS], gl.int32, layout)  # the copies
    # Allocated, then stored: an allocation initialised in place that nothing Triton can see
    # reads is dropped as dead.
    slots: gl.constexpr = max(SLOTS, COPIES)
    table = gl.allocate_shared_memory(
        gl.int32, [256, slots, ENTRY_WORDS], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    )
    table.slice(0, COPIES, 1).store(values)
    gl.thread_barrier()
    return table


@gluon.jit
def fill_byte_table(table_ptr, NUM_WARPS: gl.constexpr):
    """Fill shared memory [256, 16, 2] int32 with 16 copies of code_table's byte table per
    entry, and wait for every thread's part. It must be the kernel's only shared-memory buffer
    while `decode_words` reads it at shared offset 0: Triton cannot see those reads, so the
    buffer is live to it only up to its fill."""
    return _fill_table(table_ptr, _PAIR_TABLE_OFFSET, _COPIES, 2, NUM_WARPS)


@gluon.jit
def keep_table_live(table, table_ptr, never, NUM_WARPS: gl.constexpr):
    """A read of the table that Triton can see, in a branch taken only if `never` (a runtime
    value the caller knows is false): to Triton's allocator the table is then live up to here,
    so no other shared buffer (a reduction's scratch) is placed on it before this point."""
    if never:
        entries: gl.constexpr = table.shape[0]
        copies: gl.constexpr = table.shape[1]
        words: gl.constexpr = table.shape[2]
        layout: gl.constexpr = _table_layout(copies, words, NUM_WARPS)
        values = table.load(layout)
        e = gl.arange(0, entries, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))
        c = gl.arange(0, copies, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))
        w = gl.arange(0, words, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))
        offsets = (
            gl.expand_dims(gl.expand_dims(e * (copies * words), 1), 2)
            + gl.expand_dims(gl.expand_dims(c * words, 0), 2)
            + gl.expand_dims(gl.expand_dims(w, 0), 1)
        )
        gl.store(table_ptr + offsets, values)


@gluon.jit
def lane_id(like):
    """The thread's lane as an int32 tensor shaped like `like`."""
    return gl.inline_asm_elementwise(
        _LANE, "=r,r", [gl.zeros_like(like).to(gl.int32)], dtype=gl.int32, is_pure=True, pack=1
    )


@gluon.jit
def lane_copy_offset(like):
    """(lane % 16) * 8 as an int32 tensor shaped like `like`: the thread's table copy."""
    return (lane_id(like) % _COPIES) * 8


@gluon.jit
def decode_words(words, copy_offset):
    """int32 words of four packed bytes -> eight fp32 tensors shaped like them: the high-nibble
    codes of bytes 0..3, then the low-nibble ones, through the shared-memory byte table
    (`fill_byte_table`): one 8-byte load per byte."""
    # Not pure: the asm reads shared memory, so it must stay after the barrier that ends the
    # table's fill (a pure asm is free to move across it).
    return gl.inline_asm_elementwise(
        _BYTE_LOOKUP, _WORD_LOOKUP_CONSTRAINTS, [words, copy_offset], dtype=(gl.float32,) * 8,
        is_pure=False, pack=1,
    )  # fmt: skip


# The GEMV's 16-bit byte table: one int32 per byte value (its two codes as an fp16 pair), 32
# copies (32 KB): lane l reads copy l, so a warp's 4-byte lookups never share a bank.
HALF_PAIR_COPIES = 32
_HALF_PAIR_COPIES = gl.constexpr(HALF_PAIR_COPIES)
_HALF_PAIR_TABLE_OFFSET = gl.constexpr(HALF_PAIR_TABLE_OFFSET)


# The same table with entries 256 bytes apart (64 KB, the upper half of each never written or
# read): a lookup's address is then (byte << 8) | (lane * 4), which one prmt builds from the
# word and the lane's offset.
WIDE_PAIR_SLOTS = 64
_WIDE_PAIR_SLOTS = gl.constexpr(WIDE_PAIR_SLOTS)


@gluon.jit
def fill_half_pair_table(table_ptr, NUM_WARPS: gl.constexpr, WIDE: gl.constexpr = False):
    """Fill shared memory [256, 32, 1] int32 (WIDE: [256, 64, 1], the first 32 slots) with 32
    copies of code_table's fp16 byte table per entry, and wait for every thread's part. As
    with `fill_byte_table`, it must be the kernel's only shared memory while its lookups read
    it at shared offset 0."""
    slots: gl.constexpr = _WIDE_PAIR_SLOTS if WIDE else _HALF_PAIR_COPIES
    return _fill_table(table_ptr, _HALF_PAIR_TABLE_OFFSET, _HALF_PAIR_COPIES, 1, NUM_WARPS, slots)


def _half_lookup_asm() -> str:
    """As `_byte_lookup_asm`, from the 16-bit (fp16) byte table of `fill_half_pair_table`: one
    4-byte load per byte (entry e of copy l at e * 128 + l * 4; $9 = lane * 4), then both
    codes widened to fp32."""
    lines = ["{", ".reg .b32 t, a, base, q;", ".reg .b16 lo, hi;", "mov.u32 base, global_smem;"]
    for k in range(4):
        lines += _entry_address(k) + ["ld.shared.b32 q, [a];", "mov.b32 {lo, hi}, q;"]
        lines += [f"cvt.f32.f16 ${k}, lo;", f"cvt.f32.f16 ${k + 4}, hi;"]
    lines.append("}")
    return "\n".join(lines)


_HALF_LOOKUP = gl.constexpr(_half_lookup_asm())


@gluon.jit
def decode_words_half(words, copy_offset):
    """`decode_words` through the fp16 byte table (`fill_half_pair_table`):
    `copy_offset` is lane * 4. Half the shared-memory bytes per lookup; codes exact to fp16."""
    return gl.inline_asm_elementwise(
        _HALF_LOOKUP, _WORD_LOOKUP_CONSTRAINTS, [words, copy_offset], dtype=(gl.float32,) * 8,
        is_pure=False, pack=1,
    )  # fmt: skip


def _half2_word_asm(wide: bool = False, accumulate: bool = False) -> str:
    """$0: the f16x2 sum of byte b's code pair times x pair $(3 + b) over the four bytes of word
    $1 (even values in the low half, odd in the high), through the fp16 byte table
    (`fill_half_pair_table`; $2 = lane * 4): per byte a shift and a lop3 (wide table: one prmt
    putting byte b above the lane's offset), one 4-byte load and one packed fp16 fused
    multiply-add. accumulate: the chain starts from the f16x2 sum $7 instead of zero."""
    lines = ["{", ".reg .b32 t, a, base, q, s;", "mov.u32 base, global_smem;"]
    for k in range(4):
        if wide:  # bytes of a: the offset's low byte, byte k of the word, then the offset's zeros
            lines.append(f"prmt.b32 a, $1, $2, 0x55{k}4;")
        else:
            shift = "shl.b32 t, $1, 7;" if k == 0 else f"shr.u32 t, $1, {8 * k - 7};"
            lines += [shift, "lop3.b32 a, t, 0x7f80, $2, 0xea;"]  # (byte k << 7) | offset
        lines += ["add.u32 a, a, base;", "ld.shared.b32 q, [a];"]
        if k == 0:
            lines.append("fma.rn.f16x2 s, q, $3, $7;" if accumulate else "mul.rn.f16x2 s, q, $3;")
        else:
            lines.append(f"fma.rn.f16x2 s, q, ${3 + k}, s;")
    lines += ["mov.b32 $0, s;", "}"]
    return "\n".join(lines)


_HALF2_WORD = gl.constexpr(_half2_word_asm())
_HALF2_WORD_WIDE = gl.constexpr(_half2_word_asm(wide=True))
_HALF2_WORD_ACC = gl.constexpr(_half2_word_asm(accumulate=True))
_HALF2_WORD_WIDE_ACC = gl.constexpr(_half2_word_asm(wide=True, accumulate=True))
_HALF2_SUM = gl.constexpr(
    "{ .reg .b16 l, h; .reg .f32 a, b; mov.b32 {l, h}, $1; cvt.f32.f16 a, l; "
    "cvt.f32.f16 b, h; add.f32 $0, a, b; }"
)
_TO_HALF2 = gl.constexpr("cvt.rn.f16x2.f32 $0, $2, $1;")  # (even, odd) fp32 -> f16x2


@gluon.jit
def dot_word_half2(words, copy_offset, x0, x1, x2, x3, WIDE: gl.constexpr = False):
    """Per word: sum over its 4 bytes of (both codes) . (the matching f16x2 x pair), packed fp16
    multiply-adds, returned as fp32 (the two halves added). All arguments share one shape.
    WIDE: through the wide table (`fill_half_pair_table(..., WIDE=True)`)."""
    return widen_half2_sum(half2_word_chain(words, copy_offset, x0, x1, x2, x3, WIDE))


@gluon.jit
def half2_word_chain(words, copy_offset, x0, x1, x2, x3, WIDE: gl.constexpr = False):
    """`dot_word_half2`'s f16x2 sum before widening."""
    return gl.inline_asm_elementwise(
        _HALF2_WORD_WIDE if WIDE else _HALF2_WORD, "=r,r,r,r,r,r,r",
        [words, copy_offset, x0, x1, x2, x3], dtype=gl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@gluon.jit
def half2_word_chain_from(acc, words, copy_offset, x0, x1, x2, x3, WIDE: gl.constexpr = False):
    """`half2_word_chain` continuing the f16x2 sum `acc` of an earlier word."""
    return gl.inline_asm_elementwise(
        _HALF2_WORD_WIDE_ACC if WIDE else _HALF2_WORD_ACC, "=r,r,r,r,r,r,r,r",
        [words, copy_offset, x0, x1, x2, x3, acc], dtype=gl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@gluon.jit
def widen_half2_sum(s):
    """An f16x2 sum -> fp32: its two halves added."""
    return gl.inline_asm_elementwise(
        _HALF2_SUM, "=r,r", [s], dtype=gl.float32, is_pure=True, pack=1
    )


@gluon.jit
def to_half2(even, odd):
    """fp32 (even, odd) -> one f16x2 register (even in the low half)."""
    return gl.inline_asm_elementwise(
        _TO_HALF2, "=r,r,r", [even, odd], dtype=gl.int32, is_pure=True, pack=1
    )
