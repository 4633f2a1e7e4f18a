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


def test_twins_pair_each_plain_warpgroup_launch_with_its_mmas_in_flight(tmp_path):
    """`--twins` measures the table's launches of a bucket and, for each plain warpgroup one,
    the same launch at its own stage count and at 3, 4 and 6, with its MMAs kept in flight and
    not; other kinds (and the warp-specialized kernel, which has no such switch) get none."""
    from benchmarks.tune_matmul_4bit import twins

    plain = KernelConfig("wgmma", 64, 64, 64, 1, 4, 6, w_left=False)
    ws = KernelConfig("wgmma", 64, 128, 128, 4, 4, 4, decode_warps=8)
    mma = KernelConfig("mma", 16, 32, 0, 4, 2)
    table = tmp_path / "GPU.json"
    table.write_text(json.dumps({"configs": {
        "64": config_to_json(plain), "64:4096x4096": config_to_json(ws),
        "16": config_to_json(mma),
    }}))  # fmt: skip
    paired = [
        KernelConfig("wgmma", 64, 64, 64, 1, 4, stages, w_left=False, mma_in_flight=flying)
        for stages in (6, 3, 4)
        for flying in (False, True)
    ]
    assert twins(table, 64) == [plain, ws, *paired[1:]]  # paired[0] is the table's own
    assert twins(table, 16) == [mma]
