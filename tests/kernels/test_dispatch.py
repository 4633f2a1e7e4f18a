"""How the fused 4-bit matmul is chosen and what it refuses: pure dispatch logic, no GPU needed
(Triton must be importable; CI, which has none, skips these)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")


def test_dispatch_never_picks_a_launch_that_cannot_run(monkeypatch):
    """A bucket's config was measured on other layer shapes: where it cannot run this one (the
    warpgroup kernel needs K to be a multiple of its step, e.g. a tensor-parallel shard of a down
    projection), the engine falls back to bitsandbytes and direct calls to a default."""
    from engine.kernels import matmul_4bit as mm

    table = {
        "16": mm.KernelConfig("wgmma", 64, 64, 128, 4, 4, 3),
        "1": mm.KernelConfig("gemv", 1, 4, num_warps=2),
    }
    monkeypatch.setattr(mm, "_measured", lambda m, n, k, device: table[str(mm.m_bucket(m))])
    monkeypatch.setattr(mm, "capability", lambda device: (9, 0))
    mm.kernel_for.cache_clear()
    cuda = torch.device("cuda")
    try:
        assert mm.kernel_for(16, 4096, 4096, cuda) == table["16"]
        assert mm.kernel_for(16, 4096, 2752, cuda) is None  # 2752 = 21.5 steps of 128
        assert mm.choose_config(16, 4096, 2752, cuda) == mm.default_config(16)
        assert mm.kernel_for(1, 4096, 2752, cuda) == table["1"]
        assert mm.kernel_for(2048, 4096, 4096, cuda) is None  # a prefill chunk: bitsandbytes
        monkeypatch.setattr(mm, "capability", lambda device: (8, 0))  # no warpgroup MMA
        mm.kernel_for.cache_clear()
        assert mm.kernel_for(16, 4096, 4096, cuda) is None
    finally:
        mm.kernel_for.cache_clear()


def test_a_gpu_without_its_own_table_borrows_one_of_its_architecture(monkeypatch, caplog):
    """An H100 has no measured table: it runs the H200's launches (same SMs and shared memory),
    not bitsandbytes' matmul everywhere; a GPU of another architecture borrows nothing."""
    import json

    from engine.kernels import matmul_4bit as mm

    h200 = json.loads((mm.CONFIG_DIR / "NVIDIA_H200.json").read_text())
    cuda = torch.device("cuda")
    for name, arch, expected in [
        ("NVIDIA H100 80GB HBM3", (9, 0), mm.KernelConfig(**h200["configs"]["64:4096x4096"])),
        ("NVIDIA A100-SXM4-80GB", (8, 0), None),
    ]:
        monkeypatch.setattr(mm, "_device_name", lambda device, name=name: name)
        monkeypatch.setattr(mm, "capability", lambda device, arch=arch: arch)
        mm.kernel_for.cache_clear()
        mm._tuned_table.cache_clear()  # the warning comes with the table's first read
        with caplog.at_level("WARNING", logger=mm.__name__):
            assert mm.kernel_for(64, 4096, 4096, cuda) == expected
        assert ("NVIDIA H200's" in caplog.text) == (expected is not None)
        caplog.clear()
    mm.kernel_for.cache_clear()


def test_borrowing_skips_files_that_are_not_launch_tables(monkeypatch, tmp_path):
    """The configs folder may also hold the tuner's measurements (a list) or a file cut short:
    the search for a same-architecture table passes over them."""
    from engine.kernels import matmul_4bit as mm

    (tmp_path / "A_measurements.json").write_text("[]")
    (tmp_path / "B_cut_short.json").write_text('{"capability": [9, 0], "configs": {')
    (tmp_path / "C_no_configs.json").write_text('{"capability": [9, 0]}')
    (tmp_path / "NVIDIA_H200.json").write_text((mm.CONFIG_DIR / "NVIDIA_H200.json").read_text())
    monkeypatch.setattr(mm, "CONFIG_DIR", tmp_path)
    assert mm.launch_table_path("NVIDIA H100 80GB HBM3", (9, 0)) == tmp_path / "NVIDIA_H200.json"
    assert mm.launch_table_path("NVIDIA H200", (9, 0)) == tmp_path / "NVIDIA_H200.json"
    assert mm.launch_table_path("NVIDIA A100-SXM4-80GB", (8, 0)) is None


def test_layers_the_kernels_cannot_index_are_refused():
    """Scales are indexed per row, so K must hold whole absmax blocks; x must be 16-bit."""
    from engine.kernels import matmul_4bit as mm

    assert mm.supports((4096, 11008), 64) and mm.supports((4096, 11008), 256)
    assert not mm.supports((4096, 5504), 256)  # 5504 = 21.5 blocks of 256
    assert not mm.supports((4096, 4608), 192)  # not a power of two
    packed = torch.zeros(64 * 256 // 2, dtype=torch.uint8)
    absmax = torch.ones(64 * 256 // 64)
    with pytest.raises(ValueError, match="fp16/bf16"):
        mm.matmul_4bit(torch.zeros(2, 256), packed, absmax, torch.zeros(32, 16), (64, 256), 64)


def test_warpgroup_tiles_hopper_has():
    """The warpgroup kernel's tiles: 64 weight rows per warpgroup on the MMA's M side and the
    batch (8-256, multiples of 8) on its N side, or the other way round with 64 rows of x."""
    from engine.kernels import matmul_4bit as mm

    hopper = [
        mm.KernelConfig("wgmma", 8, 64, 64, 1, 4, 3, w_left=True),
        mm.KernelConfig("wgmma", 256, 128, 128, 2, 8, 4, w_left=True),
        mm.KernelConfig("wgmma", 64, 64, 128, 4, 4, 3, w_left=False),
        mm.KernelConfig("wgmma", 128, 256, 64, 1, 8, 4, w_left=False),
    ]
    assert all(mm._wgmma_tiles(c) for c in hopper)
    refused = [
        mm.KernelConfig("wgmma", 12, 64, 64, 1, 4, w_left=True),  # batch tile not a multiple of 8
        mm.KernelConfig("wgmma", 8, 64, 64, 1, 8, w_left=True),  # 2 warpgroups, 64 weight rows
        mm.KernelConfig("wgmma", 512, 64, 64, 1, 4, w_left=True),  # MMA N above 256
        mm.KernelConfig("wgmma", 32, 64, 64, 1, 4, w_left=False),  # x rows != 16 * num_warps
        mm.KernelConfig("wgmma", 64, 64, 96, 1, 4, w_left=False),  # partial 16-byte chunks
        mm.KernelConfig("wgmma", 24, 64, 64, 1, 4, w_left=True),  # not a power of two
        mm.KernelConfig("wgmma", 64, 192, 64, 1, 4, w_left=False),  # not a power of two
        mm.KernelConfig("wgmma", 64, 64, 64, 1, 4, 1, w_left=True),  # no copy ahead
        # The plain kernel decodes step i+1 while step i's MMA runs: copies 2 steps ahead.
        mm.KernelConfig("wgmma", 64, 64, 64, 1, 4, 2, w_left=True),
    ]
    assert not any(mm._wgmma_tiles(c) for c in refused)


def test_mmas_in_flight_are_a_switch_of_the_plain_warpgroup_kernel(monkeypatch):
    """`mma_in_flight` changes where the plain warpgroup kernel waits for its MMAs; a launch of
    any other kernel (or the warp-specialized one) that asks for it is refused, not run without."""
    from engine.kernels import matmul_4bit as mm

    cuda = torch.device("cuda")
    monkeypatch.setattr(mm, "capability", lambda device: (9, 0))
    plain = mm.KernelConfig("wgmma", 64, 64, 64, 1, 4, 6, w_left=False, mma_in_flight=True)
    assert mm.fits(plain, 64, 4096, cuda)
    refused = [
        dataclasses.replace(plain, decode_warps=8),
        mm.KernelConfig("wgmma_rs", 64, 64, 128, 2, 4, 3, mma_in_flight=True),
        mm.KernelConfig("mma", 8, 64, 0, 2, 4, mma_in_flight=True),
        mm.KernelConfig("gemv", 1, 16, mma_in_flight=True),
        mm.KernelConfig("gemm", 16, 64, 64, 4, mma_in_flight=True),
    ]
    assert not any(mm.fits(c, 8, 4096, cuda) for c in refused)


def test_register_a_warpgroup_tiles(monkeypatch):
    """The register-A warpgroup kernel: 16 weight rows per warp in one or two warpgroups, a
    power-of-two batch tile of 8-128, K in whole 128-value steps, stages that fit shared
    memory, Hopper."""
    from engine.kernels import matmul_4bit as mm

    cuda = torch.device("cuda")
    monkeypatch.setattr(mm, "capability", lambda device: (9, 0))
    config = mm.KernelConfig("wgmma_rs", 64, 64, 128, 2, 4, 3)
    assert mm.fits(config, 100, 4096, cuda)  # rows past the tile: more tiles
    assert mm.fits(mm.KernelConfig("wgmma_rs", 16, 128, 128, 1, 8, 2), 3, 11008, cuda)
    assert not mm.fits(config, 100, 4160, cuda)  # 4160: not whole 128-value steps
    refused = [
        mm.KernelConfig("wgmma_rs", 64, 128, 128, 1, 4, 3),  # block_n != 16 * num_warps
        mm.KernelConfig("wgmma_rs", 48, 64, 128, 1, 4, 3),  # not a power of two
        mm.KernelConfig("wgmma_rs", 256, 64, 128, 1, 4, 3),  # more spills
        mm.KernelConfig("wgmma_rs", 64, 64, 128, 1, 4, 1),  # no copy ahead
        mm.KernelConfig("wgmma_rs", 128, 64, 128, 1, 4, 7),  # 7 x 38 KB of stages
        mm.KernelConfig("wgmma_rs", 64, 64, 128, 1, 4, 3, w_left=False),
    ]
    assert not any(mm.fits(c, 64, 4096, cuda) for c in refused)
    monkeypatch.setattr(mm, "capability", lambda device: (8, 0))  # warpgroup MMAs: sm_90
    assert not mm.fits(config, 64, 4096, cuda)


def test_register_mma_tiles(monkeypatch):
    """The register tensor-core kernel: 16 weight rows per warp, a power-of-two tile of 8-64 rows
    of x, Hopper."""
    from engine.kernels import matmul_4bit as mm

    cuda = torch.device("cuda")
    config = mm.KernelConfig("mma", 8, 64, 0, 2, 4)
    monkeypatch.setattr(mm, "capability", lambda device: (9, 0))
    assert mm.fits(config, 8, 4096, cuda)
    assert not mm.fits(config, 9, 4096, cuda)
    assert not mm.fits(mm.KernelConfig("mma", 8, 32, 0, 2, 4), 1, 4096, cuda)
    assert mm.fits(mm.KernelConfig("mma", 64, 16, 0, 2, 1), 64, 4096, cuda)
    assert not mm.fits(mm.KernelConfig("mma", 64, 16, 0, 2, 1), 65, 4096, cuda)
    assert not mm.fits(mm.KernelConfig("mma", 24, 16, 0, 2, 1), 20, 4096, cuda)  # not 2^n
    assert not mm.fits(mm.KernelConfig("mma", 128, 16, 0, 2, 1), 100, 4096, cuda)
    monkeypatch.setattr(mm, "capability", lambda device: (8, 0))  # no mul.bf16x2 before sm_90
    assert not mm.fits(config, 1, 4096, cuda)


def test_decode_splits_stop_at_the_longest_contexts_tile_count():
    """The paged-attention decode kernel splits each context over more programs where the batch
    is small, but never into more parts than the longest context has tiles (rounded up to a
    power of two, at least 2): capping loses no program that had a tile to work on."""
    from engine.kernels.paged_attention import MAX_SPLITS, split_count

    sms = 132
    assert split_count(32, sms) == 8  # batch 1 of a 32-KV-head model
    assert [split_count(32, sms, tiles) for tiles in (0, 1, 2, 3, 4, 5, 8, 9, 100)] == [
        2, 2, 2, 4, 4, 8, 8, 8, 8,
    ]  # fmt: skip
    assert split_count(128, sms, 100) == 4
    assert split_count(132, sms, 1) == split_count(512, sms) == 1  # the batch fills the GPU
    for programs in (1, 2, 8, 32, 64, 100, 131):
        uncapped = split_count(programs, sms)
        assert uncapped in (2, 4, 8) and uncapped <= MAX_SPLITS
        for tiles in range(40):
            splits = split_count(programs, sms, tiles)
            assert splits in (2, 4, 8) and splits <= uncapped
            assert min(splits, tiles) == min(uncapped, tiles)


def test_decode_splits_need_the_block_size_with_a_context_length():
    """The tile a context is counted in follows the cache's block size: a context length
    without it is refused, not counted in some default block."""
    from engine.kernels.paged_attention import default_num_splits

    with pytest.raises(ValueError, match="block_size"):
        default_num_splits(1, 32, torch.device("cuda"), 300)


def test_every_decode_step_finds_a_captured_graph(monkeypatch):
    """A decode step replays the graph of its bucket and split count; the counts its longest
    context can ask for must all have been captured, or the step would fail. For an H200's 132
    SMs, 32- and 8-KV-head models, 16- and 128-token blocks, every bucket and every context
    length up to 4096 tokens, through the engine's own split rule (`default_num_splits`)."""
    from engine.cuda_graphs import capture_sizes, split_contexts
    from engine.kernels import paged_attention
    from engine.kernels.paged_attention import default_num_splits, split_deciding_contexts

    monkeypatch.setattr(paged_attention, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")  # never touched: the SM count is the only device query
    sizes = capture_sizes(256)
    for kv_heads in (32, 8):
        for block_size in (16, 128):

            def decode_splits(size, context, kv_heads=kv_heads, block_size=block_size):
                return default_num_splits(size, kv_heads, cuda, context, block_size)

            keys = split_contexts(sizes, split_deciding_contexts(block_size), decode_splits)
            for size in sizes:
                for context in range(1, 4097):
                    assert (size, decode_splits(size, context)) in keys
            assert {s for b, s in keys if b == 1} == {2, 4, 8}
            assert {s for b, s in keys if b == 256} == {1}
