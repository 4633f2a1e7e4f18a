"""The Triton kernels' tests (test_fused_ops.py: paged-attention decode with and without a split
context, paged-attention prefill, the cache write, add + RMSNorm, SiLU-and-mul, rotary, greedy
sampling) on machines without a GPU, such as CI: run in Triton's CPU interpreter, in a
subprocess because TRITON_INTERPRET must be set before any kernel is defined. The fused 4-bit
matmul kernels are Gluon and PTX, which the interpreter cannot run; GPU hosts run all of these
compiled instead."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="GPUs run the compiled kernels"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton"),
]


def test_kernel_tests_pass_in_the_triton_interpreter():
    tests = Path(__file__).with_name("test_fused_ops.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, summary
