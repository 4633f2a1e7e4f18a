"""Timing a GPU call the way the engine runs it: inside a CUDA graph (no Python launch cost),
with its weights streamed from HBM rather than sitting in L2.

`time_in_graph(calls)` captures the calls back to back in one CUDA graph, replays it, and returns
the mean milliseconds per call. Given independent instances of one call, each with its own copy
of the weights (`copies_for` says how many make them outgrow L2), that is what one linear of one
decoder layer costs in a decode step, where 32 layers' weights stream through in turn."""

from __future__ import annotations

from collections.abc import Callable

import torch


def time_in_graph(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Mean ms per call of `calls`, all captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compiles, allocator pools, lazy inits
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * len(calls))


def copies_for(nbytes: int, l2_bytes: int = 50 << 20) -> int:
    """How many copies of `nbytes` of weights make the working set at least 4x the L2 cache."""
    return max(2, -(-4 * l2_bytes // max(nbytes, 1)))
