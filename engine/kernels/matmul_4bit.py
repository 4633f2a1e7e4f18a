"""`x @ dequantize_4bit(W).T` straight from bitsandbytes' packed layout: the launch-config
table and the dispatcher.

The layout (the same for pre-quantized and in-flight weights): W is [N, K] row-major, two 4-bit
codes per byte (the first value in the high nibble), and one fp32 absmax per `blocksize`
consecutive values of the flat weight. With K a multiple of the blocksize (`supports`), row n's
value k has scale absmax[n * K / blocksize + k / blocksize]. A value is code[nibble] * absmax.
Bytes are decoded in registers, or in the GEMV from a byte table in shared memory
(`decode_4bit`).

The kernels, named by `KernelConfig.kernel`:
- "gemv" (`gemv_4bit.py`, Gluon): 1-8 rows of x; fp32 FMAs, each thread's 32-value sums scaled
  once. The weight bytes are the whole cost, so it streams them with wide loads and decodes
  each byte with one load from a table in shared memory.
- "mma" (`mma_4bit.py`, Gluon, Hopper): up to 64 rows of x on tensor cores from registers;
  each byte's codes stay one scaled 16-bit pair, fed to `mma.sync` with x as its N side.
- "wgmma" (`wgmma_4bit.py`, Gluon, Hopper only): more rows; decoded, scaled 16-bit weights
  staged in double-buffered shared memory for asynchronous warpgroup MMAs, the weights as the
  MMA's 64-row side (`w_left`, small batches) or x. With `decode_warps`, warp-specialized
  (`wgmma_ws_4bit.py`): those warps copy and decode while one warpgroup issues the MMAs; with
  `tma` as well (`wgmma_tma_4bit.py`), one more warp brings the operands in by TMA.
- "wgmma_rs" (`wgmma_rs_4bit.py`, Gluon, Hopper only): warpgroup MMAs with the decoded weights
  as their A operand straight from registers (no decoded tile in shared memory), x's tile
  staged in shared memory in the fragments' K order; 16 weight rows per warp.
- "gemm" (`gemm_4bit.py`, Triton, any GPU): more rows; W decoded, scaled and cast in
  registers as the left (`w_left`) or right operand of `tl.dot`, x's even and odd columns
  meeting W's high and low nibbles as two dots.
Which to use is measured per GPU, batch bucket and layer shape (`benchmarks/tune_matmul_4bit.py`
writes `configs/<gpu>.json`); "bitsandbytes" there means bitsandbytes' own matmul won."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from engine.kernels.fragment_4bit import STEP_VALUES
from engine.kernels.gemm_4bit import gemm_4bit_kernel
from engine.kernels.gemv_4bit import gemv_4bit_kernel
from engine.kernels.gpu_info import capability, sm_count
from engine.kernels.pdl import pdl_enabled, pdl_launch, pdl_start

GROUP_SIZE = 64  # K and the blocksize must be multiples of this: a thread's 32 values share a scale
logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"


@triton.jit
def _sum_splits(
    part_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):  # fmt: skip
    """out = sum over split-K partials (fp32), in a fixed order: results are deterministic.
    Launched as a programmatic dependent (`pdl.py`), it is resident before the matmul that
    writes the partials has finished, and waits for it."""
    pdl_start(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """One launch shape of one kernel, or "bitsandbytes": use bnb's own matmul here. Fields a
    kernel does not read keep their defaults (threads_n and warps_n: "gemv" only; w_left:
    "gemm" and "wgmma"; "wgmma_rs" reads block_m, split_k, num_warps and num_stages, and
    wants block_n = 16 * num_warps)."""

    kernel: str  # "gemv", "mma", "gemm", "wgmma", "wgmma_rs" (Hopper) or "bitsandbytes"
    block_m: int = 0
    block_n: int = 0
    block_k: int = 0  # gemm, wgmma: values of K per loop step (wgmma_rs: 128 or 0, its step fixed)
    split_k: int = 1
    num_warps: int = 4
    # gemm, wgmma, wgmma_rs: K steps of copies in flight. mma (two steps per iteration): 2 = as
    # the iteration starts; 4 = the next iteration's requested before this one's are decoded.
    num_stages: int = 2
    # gemv: how the program's block_n rows spread over a warp's threads and over warps (the rest
    # of each is along K); block_n / (threads_n * warps_n) rows live in each thread's registers.
    threads_n: int = 1
    warps_n: int = 1
    # gemm: W as the dot's left operand (in registers), or the right one (via shared memory).
    # wgmma: W as the MMA's 64-row side (block_n a multiple of 16 * num_warps, block_m of 8),
    # or x (block_m == 16 * num_warps).
    w_left: bool = True
    # gemv: decode through the table of fp16 code pairs (4 bytes a lookup, then widened) instead
    # of the fp32 one (8 bytes a lookup).
    half_table: bool = False
    # gemv, one row of x: the fp16 table's code pairs meet x's pairs in packed fp16 fused
    # multiply-adds (f16x2), four bytes a chain, each word's sum widened once. x must fit fp16.
    packed_fma: bool = False
    # gemv, packed_fma: the fp16 table with entries 256 bytes apart (64 KB of shared memory, half
    # of it unused), so one prmt builds each lookup's address instead of a shift and a lop3.
    wide_table: bool = False
    # gemv, packed_fma: two words (eight bytes) per f16x2 chain before it is widened to fp32,
    # instead of one (half the widenings; sixteen fp16 products a sum instead of eight).
    pair_words: bool = False
    # gemv: 0 launches a program per block of rows; n > 0 launches at most n programs per SM,
    # each taking every grid-th block (fewer, longer-lived programs: the table is filled once
    # per program, and each block's first words are requested while the last one finishes).
    programs_per_sm: int = 0
    # wgmma: 0 = every warp decodes and issues MMAs in turn; 4 or 8 = warp-specialized, that
    # many warps copying and decoding beside one MMA warpgroup (num_warps must be 4), into a
    # ring of decode_tiles weight tiles (how many steps they may run ahead of the MMAs; the
    # copies run num_stages - decode_tiles steps ahead).
    decode_warps: int = 0
    decode_tiles: int = 2
    # wgmma, warp-specialized: one more warp brings each step's packed bytes and x's tile in
    # with TMA copies (wgmma_tma_4bit.py) instead of the decoders' per-thread cp.async.
    tma: bool = False
    # gemv: each step's x pairs are requested with its weight words, an iteration ahead, instead
    # of as the step begins (more registers; faster where x is several rows: batch 2's o and
    # down, 16-22%; slower at batch 1).
    x_ahead: bool = False
    # wgmma, not warp-specialized: each step's MMAs stay in flight while the next step's bytes
    # are decoded and copies started, and are waited for as that step begins (else, waited for
    # before the decode: the compiler then schedules the decode after the wait, and a program
    # never decodes under its own MMAs; wgmma_4bit.py).
    mma_in_flight: bool = False


# Batch buckets: a config is chosen for the smallest bucket that holds M.
M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def m_bucket(m: int) -> int:
    """The bucket whose measured config serves M rows; M past the largest bucket (prefill
    chunks) uses the largest bucket's in direct calls (the engine sends it to bitsandbytes)."""
    for bucket in M_BUCKETS:
        if m <= bucket:
            return bucket
    return M_BUCKETS[-1]


def default_config(m: int) -> KernelConfig:
    """A launch shape for any M (what direct calls use where nothing was measured)."""
    if m <= 4:
        return KernelConfig("gemv", triton.next_power_of_2(m), block_n=4, num_warps=4)
    if m <= 64:
        return KernelConfig("gemm", max(16, triton.next_power_of_2(m)), 64, 128, 1, 4, 3)
    return KernelConfig("gemm", 128, 128, 64, 1, 8, 3)


def own_table_path(device_name: str, config_dir: Path) -> Path:
    """Where the launch table measured on this GPU lives in config_dir (it may not exist)."""
    return config_dir / (device_name.replace(" ", "_") + ".json")


def launch_table_path(device_name: str, device_capability: tuple[int, int]) -> Path | None:
    """This GPU's launch table; else the first (by file name) measured on a GPU of the same
    compute capability, which records it (an H100 borrows the H200's: the same kernels and
    shared memory, less bandwidth); else None. Other files in the folder are skipped."""
    own = own_table_path(device_name, CONFIG_DIR)
    if own.exists():
        return own
    for path in sorted(CONFIG_DIR.glob("*.json")):
        table = _read_table(path)
        if table is not None and tuple(table.get("capability", ())) == device_capability:
            return path
    return None


def _read_table(path: Path) -> dict | None:
    """A launch table's contents, or None for any other file (the tuner's measurements.json,
    a file cut short)."""
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return table if isinstance(table, dict) and isinstance(table.get("configs"), dict) else None


@functools.cache
def _tuned_table(device_name: str, device_capability: tuple[int, int]) -> dict[str, KernelConfig]:
    """Measured choices for this GPU, or borrowed from one of its architecture
    (`launch_table_path`): "{bucket}" or "{bucket}:{N}x{K}" -> KernelConfig."""
    path = launch_table_path(device_name, device_capability)
    if path is None:
        return {}
    if path != own_table_path(device_name, CONFIG_DIR):
        logger.warning(
            "no 4-bit matmul launch table measured on %s; using %s's (benchmarks/"
            "tune_matmul_4bit.py measures one)", device_name, path.stem.replace("_", " "),
        )  # fmt: skip
    entries = json.loads(path.read_text())["configs"]  # this GPU's own: a broken file raises
    return {key: KernelConfig(**value) for key, value in entries.items()}


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _measured(m: int, n: int, k: int, device: torch.device) -> KernelConfig | None:
    table = _tuned_table(_device_name(device), capability(device))
    bucket = m_bucket(m)
    return table.get(f"{bucket}:{n}x{k}") or table.get(str(bucket))


@functools.lru_cache(maxsize=8192)
def kernel_for(m: int, n: int, k: int, device: torch.device) -> KernelConfig | None:
    """The fused launch to use in the engine for this shape, or None where bitsandbytes' own
    kernel measured faster on this GPU, nothing was measured, the measured launch cannot run
    this shape (a bucket's config measured on other layer shapes), or M is past the largest
    bucket: there (prefill chunks) the fused kernels would decode the weights again for every
    tile of rows, while bitsandbytes dequantizes them once and cuBLAS multiplies at full rate."""
    if m > M_BUCKETS[-1]:
        return None
    config = _measured(m, n, k, device)
    return config if config is not None and fits(config, m, k, device) else None


def choose_config(m: int, n: int, k: int, device: torch.device) -> KernelConfig:
    """The fused launch for a direct call: the measured one where it can run, else a default."""
    return kernel_for(m, n, k, device) or default_config(m)


def fits(config: KernelConfig, m: int, k: int, device: torch.device) -> bool:
    """Whether `config` names a fused launch that can run M rows with this K on this device
    ("bitsandbytes" does not)."""
    if config.x_ahead and config.kernel != "gemv":
        return False  # a GEMV switch
    if config.mma_in_flight and (config.kernel != "wgmma" or config.decode_warps):
        return False  # a switch of the plain warpgroup kernel
    if config.kernel == "gemv":
        if (config.wide_table or config.pair_words) and not config.packed_fma:
            return False
        return config.block_m >= m and (config.block_m == 1 or not config.packed_fma)
    if config.kernel == "mma":  # 16 weight rows per warp, 8-64 rows of x in one tile
        # Hopper: the bf16 pairs are scaled with mul.bf16x2, an sm_90 instruction.
        return (
            m <= config.block_m
            and config.block_m in MMA_BLOCK_M
            and config.block_n == 16 * config.num_warps
            and capability(device) == (9, 0)
        )
    if config.kernel == "wgmma":
        return (
            _wgmma_tiles(config)
            and k % config.block_k == 0
            and m > 0
            and capability(device) == (9, 0)
        )
    if config.kernel == "wgmma_rs":
        return _wgmma_rs_tiles(config) and k % RS_STEP == 0 and capability(device) == (9, 0)
    return config.kernel == "gemm"


RS_STEP = STEP_VALUES.value  # wgmma_rs: K values per step (16 bytes per lane and weight row)
HOPPER_SHARED_BYTES = 232448  # the most shared memory one program may allocate on sm_90


def _wgmma_rs_tiles(config: KernelConfig) -> bool:
    """Whether the register-A warpgroup kernel can tile this way: one or two warpgroups of 16
    weight rows a warp, the batch as the MMAs' N (8-128: more spills), copies at least one
    step ahead, and the stages fit shared memory."""
    bm, warps = config.block_m, config.num_warps
    if warps not in (4, 8) or config.block_n != 16 * warps or not config.w_left:
        return False
    if bm & (bm - 1) or not 8 <= bm <= 128 or config.num_stages < 2 or config.split_k < 1:
        return False
    if config.decode_warps or config.tma or config.block_k not in (0, RS_STEP):
        return False
    # A stage: x's tile (16-bit), then per weight row 64 packed bytes and four fp32 absmax.
    stage = bm * RS_STEP * 2 + config.block_n * (RS_STEP // 2 + 4 * 4)
    return config.num_stages * stage + 1024 <= HOPPER_SHARED_BYTES


MMA_BLOCK_M = (8, 16, 32, 64)  # x rows the register MMA kernel holds: 8 per MMA, power of two
DECODE_WARPS = (4, 8)  # the warp-specialized warpgroup kernel's decoder partition sizes
# Registers per thread of its decoders, and the kernel's cap (one program per SM: 64K
# registers over its threads; the MMA warpgroup gets what the decoders leave).
DECODE_REGS = {4: (232, 256), 8: (152, 168)}
# The same with the TMA loader warp beside them: (decoders', loader's, kernel cap).
TMA_REGS = {4: (232, 24, 168), 8: (152, 24, 128)}


def _wgmma_tiles(config: KernelConfig) -> bool:
    """Whether the warpgroup kernel can tile this way: whole 16-byte chunks per thread, enough
    weight rows for every thread, and MMA shapes Hopper has (M 64 per warpgroup, N 8-256)."""
    bm, bn, bk, warps = config.block_m, config.block_n, config.block_k, config.num_warps
    decoders = config.decode_warps or warps  # the warps that copy and decode the weight rows
    if bk not in (32, 64, 128) or warps not in (4, 8) or bn < (32 // (bk // 32)) * decoders:
        return False
    if config.num_stages < 2:  # copies run at least one step ahead
        return False
    if not config.decode_warps and config.num_stages < 3:  # and two in the plain kernel
        return False
    if config.tma and not config.decode_warps:  # the TMA loader is a warp-specialized partition
        return False
    if config.decode_warps:  # warp-specialized: one MMA warpgroup
        if warps != 4 or config.decode_warps not in DECODE_WARPS:
            return False
        if config.decode_tiles not in (2, 3) or config.num_stages <= config.decode_tiles:
            return False
    if bm & (bm - 1) or bn & (bn - 1):  # Gluon tensors have power-of-two shapes
        return False
    if config.w_left:  # W rows: the MMA's M; the batch: its N
        return bn % (16 * warps) == 0 and bm % 8 == 0 and 8 <= bm <= 256
    return bm == 16 * warps and bn % 8 == 0 and bn <= 256


def config_to_json(config: KernelConfig) -> dict[str, object]:
    return asdict(config)


def supports(shape: tuple[int, int], blocksize: int) -> bool:
    """Whether the fused kernels can run this layer: every row starts a new absmax block (they
    index scales per row), a thread's 32 values share one, and the blocksize is a power of two
    (the kernels split a step's absmax index into the step's and the chunk's)."""
    k = shape[1]
    power_of_two = blocksize & (blocksize - 1) == 0
    return (
        power_of_two and k % GROUP_SIZE == 0 and blocksize % GROUP_SIZE == 0 and k % blocksize == 0
    )


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    table: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int,
    config: KernelConfig | None = None,
    silu_and_mul: bool = False,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16) @ W.T with W [N, K] in bnb's packed layout; returns [..., N] in x's
    dtype. `table` comes from `code_table(code, device)`. silu_and_mul (W = [gate | up]):
    returns [..., N / 2] = silu(gate) * up instead, applied by the GEMV as it writes its output
    (one K split) and by a second kernel otherwise; the same bits either way."""
    n, k = shape
    if silu_and_mul and n % 2:
        raise ValueError(f"silu_and_mul needs an even number of output features, got {n}")
    if not supports(shape, blocksize):
        raise ValueError(
            f"the 4-bit kernel needs K ({k}) to be a multiple of the blocksize ({blocksize}), "
            f"and both of {GROUP_SIZE}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16) or x.shape[-1] != k:
        raise ValueError(f"x must be fp16/bf16 with last dimension {k}, got {x.dtype} {x.shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return torch.empty((*lead, n // 2 if silu_and_mul else n), dtype=x.dtype, device=x.device)
    config = config or choose_config(m, n, k, x.device)
    if not fits(config, m, k, x.device):
        raise ValueError(f"{config} is not a fused launch for {m} rows, K={k}, on {x.device}")
    if silu_and_mul:
        if fused_silu_and_mul(config):
            out = torch.empty((m, n // 2), dtype=x.dtype, device=x.device)
            _launch_gemv(x2, packed, absmax, table, out, n, k, 0, blocksize, config, True)
            return out.reshape(*lead, n // 2)
        from engine.kernels.fused_ops import silu_and_mul as activation

        out = matmul_4bit(x2, packed, absmax, table, shape, blocksize, config)
        return activation(out).reshape(*lead, n // 2)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    split = config.split_k
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    stride_ok = 0 if split == 1 else m * n
    if config.kernel == "gemv":
        _launch_gemv(x2, packed, absmax, table, target, n, k, stride_ok, blocksize, config)
    elif config.kernel == "mma":
        _launch_mma(x2, packed, absmax, table, target, n, k, stride_ok, blocksize, config)
    elif config.kernel == "wgmma":
        _launch_wgmma(x2, packed, absmax, table, target, n, k, stride_ok, blocksize, config)
    elif config.kernel == "wgmma_rs":
        _launch_wgmma_rs(x2, packed, absmax, table, target, n, k, stride_ok, blocksize, config)
    else:
        args = (
            x2, packed, absmax, table, target, m, n, k, x2.stride(0), n, stride_ok, k // 2,
            k // blocksize,
        )  # fmt: skip
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split)
        gemm_4bit_kernel[grid](
            *args, BLOCKSIZE=blocksize, BLOCK_M=config.block_m,
            BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split,
            EVEN_K=k % config.block_k == 0, W_LEFT=config.w_left, num_warps=config.num_warps,
            num_stages=config.num_stages,
        )  # fmt: skip
    if split > 1:
        sum_splits(target, out)
    return out.reshape(*lead, n)


def sum_splits(partials: torch.Tensor, out: torch.Tensor) -> None:
    """out [M, N] = the sum of split-K partials [SPLIT_K, M, N] (fp32)."""
    block = 1024
    numel = out.numel()
    _sum_splits[(triton.cdiv(numel, block),)](
        partials, out, numel, SPLIT_K=partials.shape[0], BLOCK=block, **pdl_launch(out.device)
    )


def fused_silu_and_mul(config: KernelConfig) -> bool:
    """Whether this GEMV launch applies SiLU-and-mul as it writes its output: one row of x
    through packed fp16 multiply-adds (the batch-1 launches), one K split, and an even number
    of rows per thread (a gate row and its up row side by side). (Through the fp32 table, the
    fused output differed from the separate kernel's in a few elements by a rounding step on
    an H200, the packed launches in none; those launches keep the second kernel.)"""
    rows = config.block_n // (config.threads_n * config.warps_n)
    return (
        config.kernel == "gemv"
        and config.block_m == 1
        and config.packed_fma
        and config.split_k == 1
        and rows % 2 == 0
    )


def _launch_gemv(
    x2, packed, absmax, table, target, n, k, stride_ok, blocksize, config, silu_and_mul=False
) -> None:
    m = x2.shape[0]
    rows, spread = divmod(config.block_n, config.threads_n * config.warps_n)
    if spread or rows < 1 or 32 % config.threads_n or config.num_warps % config.warps_n:
        raise ValueError(f"gemv config {config} does not tile its rows over threads and warps")
    if x2.stride(0) % 2 or x2.data_ptr() % 4:  # pairs must be whole, aligned int32s
        x2 = x2.clone(memory_format=torch.contiguous_format)
    pairs = x2.view(torch.int32)  # (x[2i], x[2i+1]) per int32, as the kernel reads them
    if packed.data_ptr() % 4:
        raise ValueError("the GEMV reads the packed weight as int32 words: align it to 4 bytes")
    words = packed.view(-1).view(torch.int32)  # rows of K/8 words (K is a multiple of 64)
    # Hopper: launched as a programmatic dependent, so its weight loads overlap the end of the
    # kernel before it (the gdc_wait in gemv_4bit).
    pdl = pdl_enabled(x2.device)
    blocks = triton.cdiv(n, config.block_n)
    if config.programs_per_sm:
        blocks = min(blocks, config.programs_per_sm * sm_count(x2.device))
    grid = (blocks, config.split_k)
    gemv_4bit_kernel[grid](
        pairs, words, absmax, table, target, m, n, k, pairs.stride(0), target.stride(-2),
        stride_ok, k // 8, k // blocksize, BLOCKSIZE=blocksize, X_FP16=x2.dtype == torch.float16,
        BLOCK_M=config.block_m, ROWS=rows,
        THREADS_N=config.threads_n, WARPS_N=config.warps_n, SPLIT_K=config.split_k,
        PDL=pdl, HALF_TABLE=config.half_table, HALF2=config.packed_fma,
        PERSISTENT=config.programs_per_sm > 0, WIDE_TABLE=config.wide_table,
        PAIR_WORDS=config.pair_words, SILU_AND_MUL=silu_and_mul, X_AHEAD=config.x_ahead,
        num_warps=config.num_warps, launch_pdl=pdl,
    )  # fmt: skip


def _launch_mma(x2, packed, absmax, table, target, n, k, stride_ok, blocksize, config) -> None:
    from engine.kernels.mma_4bit import mma_4bit_kernel

    grid = (triton.cdiv(n, config.block_n), config.split_k)
    mma_4bit_kernel[grid](
        x2, packed, absmax, table, target, x2.shape[0], n, k, x2.stride(0), n, stride_ok, k // 2,
        k // blocksize, BLOCKSIZE=blocksize, X_FP16=x2.dtype == torch.float16,
        BLOCK_M=config.block_m, SPLIT_K=config.split_k, PREFETCH=config.num_stages > 2,
        num_warps=config.num_warps,
    )  # fmt: skip


def _warpgroup_grid(packed, m: int, n: int, config: KernelConfig) -> tuple[int, int, int]:
    """The warpgroup kernels' grid, (N tiles, M tiles, K splits), once the packed weight is
    known to start on 16 bytes (its copies are 16 bytes wide)."""
    if packed.data_ptr() % 16:
        raise ValueError("the warpgroup kernel needs the packed weight 16-byte aligned")
    return (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)


def _launch_wgmma(x2, packed, absmax, table, target, n, k, stride_ok, blocksize, config) -> None:
    from engine.kernels.wgmma_4bit import wgmma_4bit_kernel  # Hopper-only module

    m = x2.shape[0]
    # cp.async copies 16 bytes at a time: x's rows and the packed weight must start on 16 bytes.
    if x2.data_ptr() % 16 or x2.stride(0) % 8:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    grid = _warpgroup_grid(packed, m, n, config)
    args = (
        x2, packed, absmax, table, target, m, n, k, x2.stride(0), n, stride_ok, k // 2,
        k // blocksize,
    )  # fmt: skip
    tiles = dict(
        BLOCKSIZE=blocksize, X_FP16=x2.dtype == torch.float16, BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        W_LEFT=config.w_left, NUM_STAGES=config.num_stages, num_warps=config.num_warps,
    )  # fmt: skip
    if config.tma:
        _launch_wgmma_tma(x2, packed, grid, args, tiles, config)
    elif config.decode_warps:
        from engine.kernels.wgmma_ws_4bit import wgmma_ws_4bit_kernel

        decode_regs, maxnreg = DECODE_REGS[config.decode_warps]
        wgmma_ws_4bit_kernel[grid](
            *args, **tiles, DECODE_WARPS=config.decode_warps, DECODE_REGS=decode_regs,
            DECODE_TILES=config.decode_tiles, maxnreg=maxnreg,
        )  # fmt: skip
    else:
        wgmma_4bit_kernel[grid](*args, **tiles, MMA_IN_FLIGHT=config.mma_in_flight)


def _launch_wgmma_rs(x2, packed, absmax, table, target, n, k, stride_ok, blocksize, config) -> None:
    from engine.kernels.wgmma_rs_4bit import wgmma_rs_4bit_kernel  # Hopper-only module

    m = x2.shape[0]
    # x is copied as int32 pairs from rows a compile-time stride apart (its offsets become the
    # copies' immediates): whole, aligned pairs, a contiguous row stride.
    if x2.data_ptr() % 4 or x2.stride(0) != k:
        x2 = x2.clone(memory_format=torch.contiguous_format)
    grid = _warpgroup_grid(packed, m, n, config)
    wgmma_rs_4bit_kernel[grid](
        x2, packed, absmax, table, target, m, n, k, x2.stride(0), n, stride_ok, k // 2,
        k // blocksize, BLOCKSIZE=blocksize, X_FP16=x2.dtype == torch.float16,
        BLOCK_M=config.block_m, SPLIT_K=config.split_k, NUM_STAGES=config.num_stages,
        X_STRIDE=k, num_warps=config.num_warps,
    )  # fmt: skip


@functools.cache
def _tma_tile_layouts(block_k: int):
    """Shared layouts of x's tile and of the packed bytes' tile, as TMA writes them (computed
    once: building them costs more than the descriptors)."""
    from engine.kernels.wgmma_4bit import tile_layouts
    from engine.kernels.wgmma_tma_4bit import packed_tile_layout

    return tile_layouts(block_k)[0], packed_tile_layout(block_k)


def _launch_wgmma_tma(x2, packed, grid, args, tiles, config) -> None:
    """The warpgroup kernel fed by TMA: x [M, K] and the packed bytes [N, K / 2] as tensor
    descriptors of one K step's tiles (built per call, about 16 us on the host: inside a CUDA
    graph they are captured with the launch)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from engine.kernels.wgmma_tma_4bit import wgmma_tma_4bit_kernel

    n, k = args[6], args[7]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    x_layout, w_layout = _tma_tile_layouts(bk)
    x_desc = TensorDescriptor.from_tensor(x2, [bm, bk], x_layout)
    rows = packed.view(torch.uint8).reshape(n, k // 2)
    w_desc = TensorDescriptor.from_tensor(rows, [bn, bk // 2], w_layout)
    decode_regs, loader_regs, maxnreg = TMA_REGS[config.decode_warps]
    wgmma_tma_4bit_kernel[grid](
        x_desc, w_desc, *args, **tiles, DECODE_WARPS=config.decode_warps, DECODE_REGS=decode_regs,
        DECODE_TILES=config.decode_tiles, LOADER_REGS=loader_regs, maxnreg=maxnreg,
    )  # fmt: skip
