"""The tuner measures the launches the current table names beside its new candidates, so a
re-tune limited to some kernel kinds cannot displace a faster launch of another kind."""

from __future__ import annotations

import json

from benchmarks.tune_matmul_4bit import incumbents
from engine.kernels.matmul_4bit import KernelConfig, config_to_json


def test_a_buckets_incumbents_are_its_fused_launches(tmp_path):
    mma = KernelConfig("mma", 16, 32, 0, 4, 2)
    wgmma = KernelConfig("wgmma", 32, 64, 128, 2, 4, 4)
    table = tmp_path / "GPU.json"
    table.write_text(json.dumps({"configs": {
        "16": config_to_json(mma),
        "16:4096x4096": config_to_json(wgmma),
        "16:4096x11008": config_to_json(mma),  # the same launch twice: measured once
        "16:22016x4096": config_to_json(KernelConfig("bitsandbytes")),  # bnb is timed anyway
        "160": config_to_json(KernelConfig("gemv", 1, 16)),  # another bucket, not a prefix
        "32": config_to_json(wgmma),
    }}))  # fmt: skip
    assert incumbents(table, 16) == [mma, wgmma]
    assert incumbents(table, 32) == [wgmma]
    assert incumbents(table, 64) == []
    assert incumbents(None, 16) == []
