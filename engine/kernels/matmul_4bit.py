"""`x @ dequantize_4bit(W).T` straight from bitsandbytes' packed layout, in one Triton kernel.

The layout (the same for pre-quantized and in-flight weights): W is [N, K] row-major, two 4-bit
codes per byte (the first value in the high nibble), and one fp32 absmax per `blocksize`
consecutive values, so row n's block g has scale absmax[n * K / blocksize + g]. A value is
code[nibble] * absmax.

Two kernels share that decoding:
- `_gemv_4bit`: small batches (a handful of rows). Plain FMAs in fp32; the weight bytes are the
  whole cost, so it is built to stream them (many narrow programs, wide loads).
- `_gemm_4bit`: larger batches. Each tile of codes is decoded in registers and fed to tensor cores
  (`tl.dot`); the block scale is applied to the partial product of each 64-value group.

Both look up a byte's two codes at once in a 256-entry table of bf16 pairs (one gather per byte).
Which kernel and tile sizes to use is measured per GPU, batch bucket and shape
(`benchmarks/tune_matmul_4bit.py` writes `configs/<gpu>.json`)."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

GROUP_SIZE = 64  # values per inner step: one absmax block of the default blocksize
GROUP = tl.constexpr(GROUP_SIZE)
CONFIG_DIR = Path(__file__).parent / "configs"


@triton.jit
def _decode_pair(table_ptr, packed):
    """Two fp32 values (high nibble, low nibble) of each byte, via the bf16-pair table."""
    pair = tl.load(table_ptr + packed.to(tl.int32))
    high = ((pair >> 16) << 16).to(tl.float32, bitcast=True)
    low = (pair << 16).to(tl.float32, bitcast=True)
    return high, low


@triton.jit
def _gemv_4bit(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """Few rows: fp32 FMAs over [BLOCK_N, GROUPS, 32]-byte tiles, scaled per 64-value group."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    half: tl.constexpr = GROUP // 2
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_j = tl.arange(0, half)
    n_ok = offs_n < N
    num_groups = K // GROUP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(pid_k * GROUPS, num_groups, GROUPS * SPLIT_K):
        g = g0 + offs_g
        g_ok = g < num_groups
        byte_offs = (
            offs_n[:, None, None] * stride_w + g[None, :, None] * half + offs_j[None, None, :]
        )
        ok = n_ok[:, None, None] & g_ok[None, :, None]
        packed = tl.load(w_ptr + byte_offs, mask=ok, other=0)
        high, low = _decode_pair(table_ptr, packed)
        scale_offs = offs_n[:, None] * stride_a + (g[None, :] * GROUP) // BLOCKSIZE
        scale = tl.load(absmax_ptr + scale_offs, mask=n_ok[:, None] & g_ok[None, :], other=0.0)
        high = high * scale[:, :, None]
        low = low * scale[:, :, None]
        x_offs = (
            offs_m[:, None, None] * stride_xm + g[None, :, None] * GROUP + 2 * offs_j[None, None, :]
        )
        x_ok = (offs_m[:, None, None] < M) & g_ok[None, :, None]
        x_even = tl.load(x_ptr + x_offs, mask=x_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + x_offs + 1, mask=x_ok, other=0.0).to(tl.float32)
        prod = (
            high[None, :, :, :] * x_even[:, None, :, :] + low[None, :, :, :] * x_odd[:, None, :, :]
        )
        acc += tl.sum(tl.sum(prod, axis=3), axis=2)
    out_offs = pid_k * stride_ok + offs_m[:, None] * stride_om + offs_n[None, :]
    out_ok = (offs_m[:, None] < M) & n_ok[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _gemm_4bit(
    x_ptr, w_ptr, absmax_ptr, table_ptr, out_ptr,
    M, N, K, stride_xm, stride_om, stride_ok, stride_w, stride_a,
    BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """More rows: per 64-value group, the even and odd codes go to tensor cores as two
    K=32 dots against x's even and odd columns; the group's scale multiplies the product."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    half: tl.constexpr = GROUP // 2
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, half)
    m_ok = offs_m < M
    n_ok = offs_n < N
    num_groups = K // GROUP
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g0 in range(pid_k * GROUPS, num_groups, GROUPS * SPLIT_K):
        for i in tl.static_range(GROUPS):
            g = g0 + i
            g_ok = g < num_groups
            packed = tl.load(
                w_ptr + offs_n[:, None] * stride_w + g * half + offs_j[None, :],
                mask=n_ok[:, None] & g_ok, other=0,
            )  # fmt: skip
            high, low = _decode_pair(table_ptr, packed)
            x_offs = offs_m[:, None] * stride_xm + g * GROUP + 2 * offs_j[None, :]
            x_even = tl.load(x_ptr + x_offs, mask=m_ok[:, None] & g_ok, other=0.0)
            x_odd = tl.load(x_ptr + x_offs + 1, mask=m_ok[:, None] & g_ok, other=0.0)
            part = tl.dot(x_even, tl.trans(high.to(dot_dtype)))
            part = tl.dot(x_odd, tl.trans(low.to(dot_dtype)), part)
            scale = tl.load(
                absmax_ptr + offs_n * stride_a + (g * GROUP) // BLOCKSIZE,
                mask=n_ok & g_ok, other=0.0,
            )  # fmt: skip
            acc += part * scale[None, :]
    out_offs = pid_k * stride_ok + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(
        out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :]
    )


@triton.jit
def _sum_splits(part_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over split-K partials (fp32), in a fixed order: results are deterministic."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """One launch shape of either kernel, or "bitsandbytes": use bnb's own matmul here."""

    kernel: str  # "gemv", "gemm" or "bitsandbytes"
    block_m: int = 0
    block_n: int = 0
    groups: int = 0  # 64-value groups per loop step
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


# Batch buckets: a config is chosen for the smallest bucket that holds M.
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def m_bucket(m: int) -> int:
    for bucket in M_BUCKETS:
        if m <= bucket:
            return bucket
    return M_BUCKETS[-1]


def default_config(m: int) -> KernelConfig:
    """A launch shape for any M (what direct calls use where nothing was measured)."""
    if m <= 4:
        return KernelConfig("gemv", triton.next_power_of_2(m), 16, 8, 1, 4, 2)
    if m <= 64:
        return KernelConfig("gemm", max(16, triton.next_power_of_2(m)), 128, 2, 4, 4, 3)
    return KernelConfig("gemm", 128, 64, 2, 1, 8, 3)


@functools.cache
def _tuned_table(device_name: str) -> dict[str, KernelConfig]:
    """Measured choices for this GPU: "{bucket}" or "{bucket}:{N}x{K}" -> KernelConfig."""
    path = CONFIG_DIR / (device_name.replace(" ", "_") + ".json")
    if not path.exists():
        return {}
    entries = json.loads(path.read_text())["configs"]
    return {key: KernelConfig(**value) for key, value in entries.items()}


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _measured(m: int, n: int, k: int, device: torch.device) -> KernelConfig | None:
    table = _tuned_table(_device_name(device))
    bucket = m_bucket(m)
    return table.get(f"{bucket}:{n}x{k}") or table.get(str(bucket))


def kernel_for(m: int, n: int, k: int, device: torch.device) -> KernelConfig | None:
    """The fused launch to use in the engine for this shape, or None where bitsandbytes' own
    kernel measured faster on this GPU, or nothing was measured for it."""
    config = _measured(m, n, k, device)
    if config is None or config.kernel == "bitsandbytes":
        return None
    return _fit(config, m)


def choose_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """The fused launch for a direct call: the measured one, else a default."""
    config = _measured(m, n, k, device)
    if config is None or config.kernel == "bitsandbytes":
        return default_config(m)
    return _fit(config, m)


def _fit(config: KernelConfig, m: int) -> KernelConfig:
    if config.kernel == "gemv" and config.block_m < m:  # measured for a smaller M
        return default_config(m)
    return config


def config_to_json(config: KernelConfig) -> dict[str, object]:
    return asdict(config)


@functools.cache
def _pair_table_cpu(code: tuple[float, ...]) -> torch.Tensor:
    bits = torch.tensor(code, dtype=torch.float32).to(torch.bfloat16).view(torch.int16)
    bits = bits.numpy().astype(np.uint32) & 0xFFFF
    byte = np.arange(256)
    table = (bits[byte >> 4] << 16) | bits[byte & 15]
    return torch.from_numpy(table.astype(np.uint32).view(np.int32))


def pair_table(code: torch.Tensor, device: torch.device) -> torch.Tensor:
    """For each byte value, its two codes as bf16 bits packed in one int32 (high nibble's code in
    the upper half). bf16 codes are exact in fp32, fp16 and bf16 arithmetic alike."""
    return _pair_table_cpu(tuple(code.float().cpu().tolist())).to(device)


def supports(shape: tuple[int, int], blocksize: int) -> bool:
    return shape[1] % GROUP_SIZE == 0 and blocksize % GROUP_SIZE == 0


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    table: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16) @ W.T with W [N, K] in bnb's packed layout; returns [..., N] in x's
    dtype. `table` comes from `pair_table(code)`."""
    n, k = shape
    if not supports(shape, blocksize):
        raise ValueError(
            f"the 4-bit kernel needs K ({k}) and the blocksize ({blocksize}) to be multiples "
            f"of {GROUP_SIZE}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    config = config or choose_config(m, n, k, x.device)
    split = config.split_k
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    stride_ok = 0 if split == 1 else m * n
    args = (
        x2, packed, absmax, table, target, m, n, k, x2.stride(0), n, stride_ok, k // 2,
        k // blocksize,
    )  # fmt: skip
    meta = dict(
        BLOCKSIZE=blocksize, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        GROUPS=config.groups, SPLIT_K=split, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    if config.kernel == "gemv":
        if config.block_m < m:
            raise ValueError(f"gemv config for {config.block_m} rows used for {m}")
        _gemv_4bit[(triton.cdiv(n, config.block_n), split)](*args, **meta)
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split)
        _gemm_4bit[grid](*args, **meta)
    if split > 1:
        block = 1024
        _sum_splits[(triton.cdiv(m * n, block),)](target, out, m * n, SPLIT_K=split, BLOCK=block)
    return out.reshape(*lead, n)
