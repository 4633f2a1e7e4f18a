"""The fused 4-bit matmul against bitsandbytes' own dequantization, on every Llama 7B/8B/70B
linear shape and the batch sizes decode sees.

Skipped where no GPU is present (CI); the GPU host's log is committed under benchmarks/results/."""

from __future__ import annotations

import functools

import pytest
import torch

from engine.kernels import kernels_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (kernels_available() and torch.cuda.is_available()),
        reason="needs a CUDA GPU and Triton (the decoder is PTX: no CPU interpreter)",
    ),
]
bnbF = pytest.importorskip("bitsandbytes.functional")

# (N, K) of the merged q/k/v, o, merged gate/up and down projections.
SHAPES = {
    "llama2-7b": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)],
    "llama3-8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
    "llama3-70b": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)],
}
BATCHES = [1, 2, 3, 7, 16, 33, 64, 128, 256]
CASES = [(model, shape) for model, shapes in SHAPES.items() for shape in shapes]


@functools.cache
def quantized(n: int, k: int, quant_type: str, nested: bool, blocksize: int = 64):
    """(packed, de-nested fp32 absmax, code, bnb's dequantized weight) of a seeded random W."""
    g = torch.Generator(device="cuda").manual_seed(n * 31 + k)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    packed, state = bnbF.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    reference = bnbF.dequantize_4bit(packed, state)  # bf16, as bnb's matmul sees it
    absmax = state.absmax
    if nested:  # de-nested exactly as the engine's loader does
        absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return packed.view(-1), absmax.float().view(-1), state.code, reference


@pytest.mark.parametrize(
    "quant_type,nested", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
)
@pytest.mark.parametrize("model,shape", CASES, ids=[f"{m}-{n}x{k}" for m, (n, k) in CASES])
def test_matches_bitsandbytes_dequantize(model, shape, quant_type, nested):
    from engine.kernels.decode_4bit import code_table
    from engine.kernels.matmul_4bit import matmul_4bit

    n, k = shape
    packed, absmax, code, weight = quantized(n, k, quant_type, nested)
    table = code_table(code, torch.device("cuda"))
    exact = weight.float().T
    for m in BATCHES:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ exact
        out = matmul_4bit(x, packed, absmax, table, shape, 64)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        # bf16 tolerance: what cuBLAS's bf16 matmul of the same operands is off by, with slack.
        bf16_err = ((x @ weight.T).float() - expected).norm() / expected.norm()
        err = (out.float() - expected).norm() / expected.norm()
        assert err <= max(2 * bf16_err, 4e-3), (
            f"m={m}: relative error {err:.2e} (bf16 {bf16_err:.2e})"
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_activations_and_3d_input(dtype):
    from engine.kernels.decode_4bit import code_table
    from engine.kernels.matmul_4bit import matmul_4bit

    n, k = 4096, 4096
    packed, absmax, code, weight = quantized(n, k, "nf4", True)
    table = code_table(code, torch.device("cuda"))
    x = torch.randn(2, 5, k, device="cuda", dtype=dtype)
    out = matmul_4bit(x, packed, absmax, table, (n, k), 64)
    expected = x.float() @ weight.float().T
    assert out.shape == (2, 5, n) and out.dtype == dtype
    assert (out.float() - expected).norm() / expected.norm() < 4e-3


def test_deterministic_across_calls():
    """Split-K partials are summed in a fixed order: the same input gives the same bits."""
    from engine.kernels.decode_4bit import code_table
    from engine.kernels.matmul_4bit import matmul_4bit

    packed, absmax, code, _ = quantized(4096, 11008, "nf4", True)
    table = code_table(code, torch.device("cuda"))
    x = torch.randn(16, 11008, device="cuda", dtype=torch.bfloat16)
    first = matmul_4bit(x, packed, absmax, table, (4096, 11008), 64)
    for _ in range(3):
        assert torch.equal(matmul_4bit(x, packed, absmax, table, (4096, 11008), 64), first)


def _kernel_variants() -> list:
    from engine.kernels.matmul_4bit import KernelConfig

    persistent = {"half_table": True, "packed_fma": True, "programs_per_sm": 1}
    packed = {"half_table": True, "packed_fma": True}
    variants = [
        KernelConfig("gemv", 1, 4, num_warps=2),
        KernelConfig("gemv", 4, 8, num_warps=4, threads_n=2, warps_n=2),
        KernelConfig("gemv", 8, 2, num_warps=8, warps_n=2),
        KernelConfig("gemv", 1, 8, num_warps=8),  # 8 rows a thread
        KernelConfig("gemv", 2, 32, num_warps=4, threads_n=4, warps_n=4),  # short K steps
        KernelConfig("gemv", 1, 32, 0, 4, 4, threads_n=8, warps_n=4),  # split K
        # Through the fp16 code-pair table.
        KernelConfig("gemv", 1, 16, num_warps=4, threads_n=2, warps_n=2, half_table=True),
        KernelConfig("gemv", 4, 8, 0, 2, 4, threads_n=2, warps_n=2, half_table=True),  # split K
        # Packed fp16 multiply-adds (one row of x).
        KernelConfig(
            "gemv", 1, 16, num_warps=4, threads_n=2, warps_n=2, half_table=True, packed_fma=True
        ),
        KernelConfig(
            "gemv", 1, 32, 0, 4, 4, threads_n=8, warps_n=4, half_table=True, packed_fma=True
        ),  # split K
        # Persistent: fewer programs than row blocks, each taking every grid-th block.
        KernelConfig("gemv", 1, 8, num_warps=4, threads_n=2, warps_n=2, **persistent),
        KernelConfig("gemv", 1, 4, 0, 2, 4, threads_n=2, warps_n=2, **persistent),  # split K
        KernelConfig("gemv", 2, 8, num_warps=4, threads_n=2, warps_n=2, programs_per_sm=1),
        # x pairs requested an iteration ahead, per block of rows and persistent.
        KernelConfig("gemv", 2, 16, num_warps=4, threads_n=2, warps_n=2, x_ahead=True),
        KernelConfig(
            "gemv", 2, 8, 0, 1, 4, threads_n=2, warps_n=2, programs_per_sm=1, x_ahead=True
        ),
        KernelConfig("gemv", 1, 16, 0, 2, 4, threads_n=2, warps_n=2, x_ahead=True, **packed),
        # The wide table (one prmt per lookup address), persistent or not.
        KernelConfig("gemv", 1, 16, 0, 1, 4, threads_n=2, warps_n=2, wide_table=True, **packed),
        KernelConfig("gemv", 1, 16, 0, 1, 8, threads_n=1, warps_n=4, wide_table=True, **persistent),
        # Two words per fp16 chain.
        KernelConfig("gemv", 1, 32, 0, 1, 4, threads_n=2, warps_n=2, pair_words=True, **packed),
        KernelConfig("mma", 8, 64, 0, 1, 4),
        KernelConfig("mma", 8, 16, 0, 4, 1),
        KernelConfig("mma", 16, 64, 0, 2, 4),
        KernelConfig("mma", 8, 32, 0, 8, 2, 4),  # next iteration's bytes prefetched
        KernelConfig("mma", 16, 16, 0, 16, 1, 4),
        KernelConfig("mma", 32, 32, 0, 1, 2),
        KernelConfig("mma", 64, 16, 0, 4, 1),
        KernelConfig("gemm", 16, 64, 128, 4, 4, 3, w_left=True),
        KernelConfig("gemm", 64, 128, 64, 1, 4, 3, w_left=False),
    ]
    if torch.cuda.get_device_capability() == (9, 0):  # warpgroup MMA: Hopper only
        variants += [
            KernelConfig("wgmma", 64, 128, 64, 1, 4, 4, w_left=False),
            KernelConfig("wgmma", 64, 256, 128, 2, 4, 3, w_left=False),
            KernelConfig("wgmma", 128, 128, 64, 1, 8, 4, w_left=False),
            KernelConfig("wgmma", 8, 64, 64, 1, 4, 4, w_left=True),
            KernelConfig("wgmma", 16, 128, 128, 4, 4, 4, w_left=True),
            KernelConfig("wgmma", 64, 256, 64, 2, 8, 3, w_left=True),
            KernelConfig("wgmma", 16, 64, 128, 4, 4, 6, w_left=True),  # copies 5 steps ahead
            KernelConfig("wgmma", 64, 128, 128, 2, 4, 4, w_left=False),
            # Each step's MMAs in flight while the next step decodes.
            KernelConfig("wgmma", 64, 64, 64, 1, 4, 6, w_left=False, mma_in_flight=True),
            KernelConfig("wgmma", 32, 64, 128, 4, 4, 3, w_left=True, mma_in_flight=True),
            KernelConfig("wgmma", 128, 128, 64, 1, 8, 4, w_left=True, mma_in_flight=True),
            KernelConfig("wgmma", 64, 128, 128, 2, 4, 4, w_left=False, mma_in_flight=True),
            # Warp-specialized: decoder warps beside one MMA warpgroup.
            KernelConfig("wgmma", 64, 128, 128, 2, 4, 4, w_left=True, decode_warps=4),
            KernelConfig("wgmma", 16, 64, 128, 4, 4, 3, w_left=True, decode_warps=8),
            KernelConfig(
                "wgmma", 128, 128, 64, 1, 4, 5, w_left=True, decode_warps=8, decode_tiles=3
            ),
            KernelConfig(
                "wgmma", 64, 64, 64, 2, 4, 6, w_left=False, decode_warps=4, decode_tiles=3
            ),
            KernelConfig("wgmma", 64, 128, 128, 1, 4, 6, w_left=False, decode_warps=8),
            # Fed by TMA (a loader warp beside them).
            KernelConfig("wgmma", 64, 128, 128, 2, 4, 4, w_left=True, decode_warps=8, tma=True),
            KernelConfig("wgmma", 16, 64, 64, 4, 4, 6, w_left=True, decode_warps=4, tma=True),
            KernelConfig("wgmma", 128, 128, 64, 1, 4, 4, decode_warps=8, decode_tiles=3, tma=True),
            KernelConfig("wgmma", 64, 64, 128, 2, 4, 4, w_left=False, decode_warps=4, tma=True),
            # The decoded weights as the MMAs' A operand from registers.
            KernelConfig("wgmma_rs", 64, 64, 128, 1, 4, 4),
            KernelConfig("wgmma_rs", 16, 64, 128, 4, 4, 3),
            KernelConfig("wgmma_rs", 32, 128, 128, 2, 8, 5),
            KernelConfig("wgmma_rs", 128, 128, 128, 1, 8, 3),
        ]
    return variants


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_kernel_variant(quant_type, dtype):
    """A sample of each kernel kind's launch shapes, whatever the tuner picked on this GPU: rows
    that do not fill a tile, K not a multiple of the step, N not a multiple of the block."""
    from engine.kernels.decode_4bit import code_table
    from engine.kernels.matmul_4bit import fits, matmul_4bit

    for n, k in [(4096, 11008), (1003, 4160)]:  # 4160: not a multiple of 128-value steps
        packed, absmax, code, weight = quantized(n, k, quant_type, True)
        table = code_table(code, torch.device("cuda"))
        for config in _kernel_variants():
            if config.kernel == "gemv" or config.block_m == 8:
                m = min(config.block_m, 7)
            elif config.kernel == "mma":
                m = config.block_m - 3  # rows that do not fill the tile
            elif config.kernel in ("wgmma", "wgmma_rs") and config.w_left:
                m = config.block_m + 3  # a second batch tile, ragged
            else:
                m = 33
            if not fits(config, m, k, torch.device("cuda")):
                continue  # the dispatcher never runs it here (tests/kernels/test_dispatch.py)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            expected = x.float() @ weight.float().T
            out = matmul_4bit(x, packed, absmax, table, (n, k), 64, config)
            err = (out.float() - expected).norm() / expected.norm()
            assert err < 4e-3, f"{config} on {n}x{k}: relative error {err:.2e}"


@pytest.mark.parametrize("blocksize", [128, 256])
def test_larger_blocksizes(blocksize):
    """Absmax blocks longer than a K step (a step's scale index splits into the step's and the
    chunk's): one launch of each kernel kind, 128- and 64-value steps."""
    from engine.kernels.decode_4bit import code_table
    from engine.kernels.matmul_4bit import KernelConfig, fits, matmul_4bit

    n, k = 4096, 11008  # 43 blocks of 256
    packed, absmax, code, weight = quantized(n, k, "nf4", True, blocksize)
    table = code_table(code, torch.device("cuda"))
    packed_fma = dict(packed_fma=True, wide_table=True)
    launches = [
        (1, KernelConfig("gemv", 1, 16, 0, 1, 4, threads_n=2, warps_n=2, **packed_fma)),
        (2, KernelConfig("gemv", 2, 16, num_warps=4, threads_n=2, warps_n=2)),
        (13, KernelConfig("mma", 16, 64, 0, 2, 4)),
        (33, KernelConfig("wgmma", 64, 128, 64, 1, 4, 4, w_left=False)),
        (61, KernelConfig("wgmma", 64, 128, 128, 2, 4, 4, w_left=True)),
        (45, KernelConfig("wgmma", 64, 64, 64, 1, 4, 6, w_left=False, mma_in_flight=True)),
        (64, KernelConfig("wgmma", 64, 128, 128, 2, 4, 4, w_left=True, decode_warps=8, tma=True)),
        (37, KernelConfig("wgmma_rs", 64, 64, 128, 2, 4, 4)),
    ]
    for m, config in launches:
        if not fits(config, m, k, torch.device("cuda")):
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ weight.float().T
        out = matmul_4bit(x, packed, absmax, table, (n, k), blocksize, config)
        err = (out.float() - expected).norm() / expected.norm()
        assert err < 4e-3, f"{config}, blocksize {blocksize}: relative error {err:.2e}"


def test_register_a_warpgroup_edges():
    """wgmma_rs where its clamps and launcher matter: N not a multiple of the block (rows past
    N re-read the last row, never stored), splits with no steps (K = 256 over four splits), x a
    column slice of a wider tensor (copied to rows K apart, the kernel's compile-time stride)."""
    from engine.kernels.decode_4bit import code_table
    from engine.kernels.matmul_4bit import KernelConfig, fits, matmul_4bit

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("warpgroup MMAs: Hopper only")
    cases = [
        ((1003, 4096), 37, KernelConfig("wgmma_rs", 64, 64, 128, 2, 4, 3), False),
        ((512, 256), 16, KernelConfig("wgmma_rs", 16, 64, 128, 4, 4, 2), False),
        ((4096, 4096), 33, KernelConfig("wgmma_rs", 32, 128, 128, 1, 8, 4), True),
    ]
    for (n, k), m, config, sliced in cases:
        assert fits(config, m, k, torch.device("cuda"))
        packed, absmax, code, weight = quantized(n, k, "nf4", True)
        table = code_table(code, torch.device("cuda"))
        x = torch.randn(m, 2 * k if sliced else k, device="cuda", dtype=torch.bfloat16)[:, :k]
        expected = x.float() @ weight.float().T
        out = matmul_4bit(x, packed, absmax, table, (n, k), 64, config)
        err = (out.float() - expected).norm() / expected.norm()
        assert err < 4e-3, f"{config} on {m}x{n}x{k}: relative error {err:.2e}"


@pytest.mark.parametrize("mma_in_flight", [False, True])
def test_plain_warpgroup_short_loops(mma_in_flight):
    """The plain warpgroup kernel where its loop is shortest: fewer K steps than copy stages
    (the prologue's copies past the last step copy nothing), one step, and splits with none
    (K = 256 in two 128-value steps over four splits), one and two warpgroups, with each step's
    MMAs waited for after the decode or left in flight across it."""
    from engine.kernels.decode_4bit import code_table
    from engine.kernels.matmul_4bit import KernelConfig, fits, matmul_4bit

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("warpgroup MMAs: Hopper only")
    flight = dict(mma_in_flight=mma_in_flight)
    cases = [
        ((1003, 128), 45, KernelConfig("wgmma", 64, 64, 64, 1, 4, 6, w_left=False, **flight)),
        ((512, 64), 45, KernelConfig("wgmma", 64, 64, 64, 1, 4, 3, w_left=False, **flight)),
        ((512, 256), 20, KernelConfig("wgmma", 32, 64, 128, 4, 4, 3, w_left=True, **flight)),
        ((640, 192), 9, KernelConfig("wgmma", 16, 128, 64, 2, 8, 4, w_left=True, **flight)),
    ]
    for (n, k), m, config in cases:
        assert fits(config, m, k, torch.device("cuda"))
        packed, absmax, code, weight = quantized(n, k, "nf4", True)
        table = code_table(code, torch.device("cuda"))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        expected = x.float() @ weight.float().T
        out = matmul_4bit(x, packed, absmax, table, (n, k), 64, config)
        err = (out.float() - expected).norm() / expected.norm()
        assert err < 4e-3, f"{config} on {m}x{n}x{k}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_as_the_gemv_writes_equals_the_separate_kernel(dtype):
    """gate_up with SiLU-and-mul applied by the GEMV as it writes its output (each program's
    rows being gate/up pairs) equals the GEMV then the SiLU-and-mul kernel, bit for bit: one row
    of x through the fp16 table (wide, two words a chain, persistent, or plain); launches that
    do not fuse (a K split, one row a thread, two rows of x) take the second kernel.
    N/2 not a multiple of the block: the last block's pairs repeat the last rows, unstored."""
    from engine.kernels.decode_4bit import code_table
    from engine.kernels.fused_ops import silu_and_mul
    from engine.kernels.matmul_4bit import KernelConfig, fused_silu_and_mul, matmul_4bit

    packed_fma = {"half_table": True, "packed_fma": True}
    fusing = [
        KernelConfig("gemv", 1, 32, 0, 1, 4, threads_n=2, warps_n=2, wide_table=True,
                     pair_words=True, **packed_fma),
        KernelConfig("gemv", 1, 16, 0, 1, 8, threads_n=1, warps_n=4, wide_table=True,
                     programs_per_sm=1, **packed_fma),
        KernelConfig("gemv", 1, 16, 0, 1, 4, threads_n=2, warps_n=2, **packed_fma),
    ]  # fmt: skip
    separate = [
        KernelConfig("gemv", 1, 32, 0, 4, 4, threads_n=8, warps_n=4, **packed_fma),  # split K
        KernelConfig("gemv", 1, 4, 0, 1, 4, threads_n=4, **packed_fma),  # one row a thread
        KernelConfig("gemv", 2, 16, num_warps=4, threads_n=2, warps_n=2),  # two rows of x
    ]
    assert all(map(fused_silu_and_mul, fusing)) and not any(map(fused_silu_and_mul, separate))
    for n, k in [(22016, 4096), (2 * 1003, 4160)]:
        packed, absmax, code, _ = quantized(n, k, "nf4", True)
        table = code_table(code, torch.device("cuda"))
        for config in fusing + separate:
            x = torch.randn(config.block_m, k, device="cuda", dtype=dtype)
            fused = matmul_4bit(x, packed, absmax, table, (n, k), 64, config, silu_and_mul=True)
            expected = silu_and_mul(matmul_4bit(x, packed, absmax, table, (n, k), 64, config))
            assert fused.shape == (config.block_m, n // 2)
            assert torch.equal(fused, expected), f"{config} on {n}x{k}"
