"""Tensor parallelism across real Ray actors over gloo (CPU): same tokens as one rank."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import ray
import torch
from checkpoints import bnb_config, build_model, prequantize
from prompts import PROMPTS

from engine import LLM, SamplingParams
from workers import WorkerGroupError

MAX_NEW = 8
# Max abs difference of first-token log-probabilities, TP=2 vs TP=1, float32. Both ways the
# ranks hold exactly the bytes one rank would (pre-quantized: exact slices; in flight: each rank
# quantizes its slice, with double-quant statistics computed over the whole tensor), so only
# the order of the all-reduce's sums differs.
TOLERANCE = {"prequant": 1e-4, "inflight": 1e-4}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # another test module's cluster: start a fresh one of our own size
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _generate(llm: LLM, vocab: int):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=vocab)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outputs]
    first = torch.tensor(
        [[o.outputs[0].logprobs[0][t].logprob for t in range(vocab)] for o in outputs]
    )
    return tokens, first


def _compare(path, mode: str, **kwargs) -> None:
    args = dict(model=str(path), dtype="float32", **kwargs)
    if mode == "inflight":
        args |= dict(
            quantization="bitsandbytes", quantization_config={"bnb_4bit_compute_dtype": "float32"}
        )
    one = LLM(**args)
    vocab = one.llm_engine.hf_config.vocab_size
    tokens_1, logprobs_1 = _generate(one, vocab)
    two = LLM(**args, tensor_parallel_size=2)
    try:
        tokens_2, logprobs_2 = _generate(two, vocab)
    finally:
        two.shutdown()
    assert tokens_2 == tokens_1
    assert (logprobs_2 - logprobs_1).abs().max().item() < TOLERANCE[mode]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["inflight", "prequant"])
def test_tp2_matches_tp1(checkpoints, family, mode):
    path = checkpoints(f"{family}-nf4-dq") if mode == "prequant" else checkpoints(family)
    _compare(path, mode)


def test_tp2_with_one_kv_head_replicates_it(tmp_path):
    path = build_model(tmp_path / "mqa", num_key_value_heads=1)
    prequant = prequantize(path, tmp_path / "mqa-nf4-dq", bnb_config("nf4", True))
    _compare(prequant, "prequant")


def test_prequantized_split_off_block_boundary_is_a_clear_error(tmp_path):
    # down_proj's input (intermediate_size 160) splits into 80 columns per rank: not whole
    # 64-value blocks, so the packed weight cannot be sliced exactly.
    path = build_model(tmp_path / "odd", intermediate_size=160)
    prequant = prequantize(path, tmp_path / "odd-nf4", bnb_config("nf4", False))
    with pytest.raises(ValueError, match=r"mlp\.down_proj.*not aligned to its 64-value blocks"):
        LLM(model=str(prequant), tensor_parallel_size=2)


def test_invalid_sizes_fail_fast(checkpoints, tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3.*num_attention_heads \(4\)"):
        LLM(model=str(checkpoints("llama")), tensor_parallel_size=3)
    wide = build_model(tmp_path / "wide", num_attention_heads=8, num_key_value_heads=8)
    with pytest.raises(
        ValueError, match=r"tensor_parallel_size=8 needs 8 [CG]PUs; the Ray cluster has [24]"
    ):
        LLM(model=str(wide), tensor_parallel_size=8)
    assert time.monotonic() - start < 10


def test_rank_resources_follow_the_named_device_not_the_clusters_moment():
    """A config naming CUDA asks for GPUs even while the cluster has none (an autoscaler adds
    GPU nodes for the pending placement group; KubeRay applies the Serve config before the GPU
    pods are up), instead of landing on the head's CPUs; without a device named, what the
    cluster holds decides, and a group it cannot hold fails at once."""
    from engine.config import EngineConfig
    from workers.group import rank_resources

    def config(device):
        return EngineConfig(model="m", tensor_parallel_size=2, device=device)

    cpus_only, with_gpus = {"CPU": 8.0}, {"CPU": 8.0, "GPU": 4.0}
    assert rank_resources(config("cuda"), cpus_only, None, 1.0) == {"GPU": 1, "CPU": 1}
    assert rank_resources(config("cuda:1"), cpus_only, None, 1.0) == {"GPU": 1, "CPU": 1}
    assert rank_resources(config(None), cpus_only, None, 1.0) == {"CPU": 1.0}
    assert rank_resources(config(None), with_gpus, None, 1.0) == {"GPU": 1, "CPU": 1}
    assert rank_resources(config("cpu"), with_gpus, None, 2.0) == {"CPU": 2.0}
    with pytest.raises(ValueError, match=r"needs 2 GPUs; the Ray cluster has 1"):
        rank_resources(config(None), {"CPU": 8.0, "GPU": 1.0}, None, 1.0)
    with pytest.raises(ValueError, match=r"needs 10 CPUs; the Ray cluster has 8"):
        rank_resources(config("cpu"), cpus_only, None, 5.0)


def test_killed_worker_ends_requests_with_an_error_and_group_rebuilds(checkpoints):
    path = str(checkpoints("llama"))
    llm = LLM(model=path, quantization="bitsandbytes", tensor_parallel_size=2)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    engine.add_request("long", PROMPTS[2], params)
    engine.add_request("waiting", PROMPTS[0], params)
    while not engine.step():  # first outputs: both requests are running
        pass
    ray.kill(engine.group.workers[1], no_restart=True)
    start = time.monotonic()
    with pytest.raises(WorkerGroupError, match="rank 1 is down"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - start < 30
    assert not engine.has_unfinished_requests() and not engine.group.healthy
    with pytest.raises(WorkerGroupError):
        llm.generate(PROMPTS[:1], use_tqdm=False)
    llm.shutdown()
    rebuilt = LLM(model=path, quantization="bitsandbytes", tensor_parallel_size=2)
    try:
        out = rebuilt.generate(
            PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False
        )
        assert all(len(o.outputs[0].token_ids) == 4 for o in out)
    finally:
        rebuilt.shutdown()


def test_killed_worker_ends_the_async_poll_with_an_error_naming_it(checkpoints):
    """The Serve model server polls through poll_async (its 503 carries this error)."""
    llm = LLM(model=str(checkpoints("llama")), quantization="bitsandbytes", tensor_parallel_size=2)
    engine = llm.llm_engine
    engine.add_request(
        "long", PROMPTS[2], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    )
    while not engine.step():  # first outputs: the request is running
        pass
    ray.kill(engine.group.workers[1], no_restart=True)

    async def poll_until_down() -> None:
        while True:
            await engine.group.poll_async(0.1)

    start = time.monotonic()
    try:
        with pytest.raises(WorkerGroupError, match="rank 1 is down"):
            asyncio.run(poll_until_down())
        assert time.monotonic() - start < 30
    finally:
        llm.shutdown()


def test_a_hung_rank_fails_the_group_once_a_step_outlasts_step_stall_s(checkpoints):
    """A rank that hangs (stopped, not dead) ends no loop; rank 0 waits in a collective until its
    10-minute timeout. The group fails once a step has run for step_stall_s (3 s here)."""
    llm = LLM(model=str(checkpoints("llama")), quantization="bitsandbytes", tensor_parallel_size=2)
    engine = llm.llm_engine
    engine.group.step_stall_s = 3.0
    engine.add_request(
        "long", PROMPTS[2], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    )
    while not engine.step():  # first outputs: the request is running
        pass
    pid = ray.get(engine.group.workers[1].pid.remote())
    os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    try:
        with pytest.raises(WorkerGroupError, match=r"a step has run for \d+ s .*a rank is hung"):
            while engine.has_unfinished_requests():
                engine.step()
        assert time.monotonic() - start < 30 and not engine.group.healthy
    finally:
        os.kill(pid, signal.SIGCONT)
        llm.shutdown()


def test_a_failing_follower_is_named_with_its_own_error_and_ids_are_unique(checkpoints):
    """The group's error carries the follower's exception (a RayTaskError's first line names
    only the task); and, as the single-process engine does, a request id in use is refused."""
    llm = LLM(model=str(checkpoints("llama")), quantization="bitsandbytes", tensor_parallel_size=2)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    try:
        engine.add_request("a", PROMPTS[0], params)
        with pytest.raises(ValueError, match="request id 'a' is already running"):
            engine.add_request("a", PROMPTS[1], params)
        with pytest.raises(ValueError, match="request id 'b' is already running"):
            engine.add_requests([("b", PROMPTS[0], params, None), ("b", PROMPTS[1], params, None)])

        def fail_steps(worker) -> None:  # runs on rank 1 (nested: pickled by value)
            def run(plan):
                raise RuntimeError("injected failure on this rank")

            worker.runner.run = run

        ray.get(engine.group.workers[1].__ray_call__.remote(fail_steps))
        own_error = r"rank 1 is down \(RuntimeError: injected failure on this rank\)"
        with pytest.raises(WorkerGroupError, match=own_error):
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        llm.shutdown()


def test_a_generate_batch_reaches_rank_0_whole(checkpoints):
    """LLM.generate hands the group its prompts in one message, so rank 0's first step holds
    all of them; sent one by one, rank 0 starts stepping on the first while the rest arrive."""

    def record_schedule_sizes(worker) -> None:  # runs on rank 0 (nested: pickled by value)
        engine = worker.engine
        engine.schedule_sizes = sizes = []
        schedule = engine.scheduler.schedule

        def recorded():
            out = schedule()
            sizes.append(len(out.scheduled))
            return out

        engine.scheduler.schedule = recorded

    llm = LLM(model=str(checkpoints("llama")), tensor_parallel_size=2)
    try:
        rank0 = llm.llm_engine.group.workers[0]
        ray.get(rank0.__ray_call__.remote(record_schedule_sizes))
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        llm.generate(PROMPTS, params, use_tqdm=False)
        sizes = ray.get(rank0.__ray_call__.remote(lambda worker: worker.engine.schedule_sizes))
    finally:
        llm.shutdown()
    assert sizes[0] == len(PROMPTS), sizes


def test_a_failed_loop_stops_exporting_the_engines_last_state():
    """Ray exports a gauge while it is re-set; after a failed step loop the running/waiting/cache
    gauges are no longer re-set (they age out), while the load gauges stay."""
    from workers.engine_metrics import EngineMetrics

    metrics = EngineMetrics("m", "r", 0)
    metrics._set("nibble_num_requests_running", 3, metrics.replica)
    metrics._set("nibble_kv_cache_usage_perc", 0.5, metrics.replica)
    load = metrics.rank | {"quantization": "bitsandbytes"}
    metrics._set("nibble_model_weight_bytes", 10, load)
    metrics.forget_engine_state()
    assert [name for name, _ in metrics._gauges] == ["nibble_model_weight_bytes"]
