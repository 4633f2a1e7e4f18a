"""How many outputs of the GEMV applying SiLU-and-mul as it writes differ from the GEMV then the
SiLU-and-mul kernel, per launch kind (two rows of x or one, fp32 or fp16 table); run from the
repository root on a GPU. Output: silu_and_mul_fused_vs_separate_diff.log beside this file."""

import sys

import torch

sys.path.insert(0, "tests/kernels")
from test_matmul_4bit import quantized  # noqa: E402

from engine.kernels import matmul_4bit as mm  # noqa: E402
from engine.kernels.decode_4bit import code_table  # noqa: E402
from engine.kernels.fused_ops import silu_and_mul  # noqa: E402

CONFIGS = [
    mm.KernelConfig("gemv", 2, 16, num_warps=4, threads_n=2, warps_n=2),
    mm.KernelConfig("gemv", 1, 16, num_warps=4, threads_n=2, warps_n=2),
    mm.KernelConfig("gemv", 1, 16, num_warps=4, threads_n=2, warps_n=2, half_table=True),
]
for n, k in [(22016, 4096), (2006, 4160)]:
    packed, absmax, code, _ = quantized(n, k, "nf4", True)
    table = code_table(code, torch.device("cuda"))
    for c in CONFIGS:
        x = torch.randn(c.block_m, k, device="cuda", dtype=torch.bfloat16)
        fused = torch.empty((c.block_m, n // 2), dtype=x.dtype, device="cuda")
        mm._launch_gemv(x, packed, absmax, table, fused, n, k, 0, 64, c, True)
        separate = silu_and_mul(mm.matmul_4bit(x, packed, absmax, table, (n, k), 64, c))
        diff = (fused.float() - separate.float()).abs()
        print(
            n, k, c.block_m, c.half_table, "differ", int((diff > 0).sum()), "of", diff.numel(),
            "max", float(diff.max()), "ref max", float(separate.float().abs().max()), flush=True,
        )  # fmt: skip
