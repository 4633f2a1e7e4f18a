"""A model replica's worker group: a placement group, one Worker actor per rank, their lifecycle,
and their health."""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import time
import uuid

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import AutoConfig

from engine.config import EngineConfig
from engine.model_files import resolve_model_dir
from workers.messages import AbortRequest, AddRequest, OutputBatch, WorkerInfo
from workers.worker import Worker

logger = logging.getLogger(__name__)

# How long a failed step waits for a dead follower's loop to resolve, so that the error names
# the rank that died (the group is going down either way).
FOLLOWER_DEATH_WAIT_S = 2.0
# Kept in the workers' environment: NCCL and PyTorch settings of the host (e.g. NVLink
# multicast off) must reach the processes that run collectives.
_PASSED_ENV_PREFIXES = ("NCCL_", "TORCH_", "NVSHMEM_", "CUDA_", "HF_")


class PlacementStrategy(str, enum.Enum):
    STRICT_PACK = "STRICT_PACK"  # all ranks on one node (the default: NVLink, shared memory)
    PACK = "PACK"  # one node if possible, else several
    SPREAD = "SPREAD"  # across nodes


class WorkerGroupError(RuntimeError):
    """The group cannot serve: a worker died or a step failed."""


def check_tensor_parallel_size(config: EngineConfig) -> None:
    """Fail before anything starts if the model cannot be split tensor_parallel_size ways."""
    size = config.tensor_parallel_size
    hf = AutoConfig.from_pretrained(resolve_model_dir(config.model, config.revision))
    heads = hf.num_attention_heads
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    problems = []
    if heads % size:
        problems.append(f"num_attention_heads ({heads}) is not divisible by it")
    if kv_heads % size and size % kv_heads:
        problems.append(f"num_key_value_heads ({kv_heads}) neither divides nor is divisible by it")
    if hf.intermediate_size % size:
        problems.append(f"intermediate_size ({hf.intermediate_size}) is not divisible by it")
    if problems:
        raise ValueError(
            f"tensor_parallel_size={size} does not fit this model: " + "; ".join(problems)
        )


def rank_resources(
    config: EngineConfig, cluster: dict[str, float], use_gpu: bool | None, num_cpus: float
) -> dict[str, float]:
    """What each rank's placement bundle asks for. A CUDA device named in the config (`cuda`,
    `cuda:N`) always asks for GPUs, even where the cluster has none yet: an autoscaler (KubeRay's)
    adds GPU nodes for the pending placement group, where choosing from what the cluster holds
    at the moment would put the model on the head node's CPUs. With no device named, GPUs are
    used where the cluster has them, else CPUs, and a group the cluster cannot hold fails at
    once."""
    size = config.tensor_parallel_size
    named_cuda = (config.device or "").startswith("cuda")
    if use_gpu is None:
        use_gpu = named_cuda or (config.device is None and cluster.get("GPU", 0) > 0)
    unit, need = ("GPU", size) if use_gpu else ("CPU", size * num_cpus)
    have = cluster.get(unit, 0)
    if have < need and not (use_gpu and named_cuda):
        raise ValueError(
            f"tensor_parallel_size={size} needs {need:g} {unit}s; the Ray cluster has {have:g}"
        )
    return {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": num_cpus}


# A decode step takes milliseconds and a prefill chunk well under a second; the first steps may
# compile kernels for a while. Five minutes without a step ending is a hung rank.
STEP_STALL_S = 300.0


class WorkerGroup:
    def __init__(
        self,
        config: EngineConfig,
        placement_strategy: PlacementStrategy = PlacementStrategy.STRICT_PACK,
        use_gpu: bool | None = None,
        num_cpus_per_worker: float = 1.0,
        ready_timeout_s: float = 600.0,
        metrics_labels: tuple[str, str] | None = None,
        step_stall_s: float = STEP_STALL_S,
    ) -> None:
        """metrics_labels: (model_name, replica) under which the workers export metrics.
        step_stall_s: how long one step may run before the group is declared hung."""
        self.config = config
        self.step_stall_s = step_stall_s
        size = config.tensor_parallel_size
        check_tensor_parallel_size(config)
        if not ray.is_initialized():
            ray.init()
        bundle = rank_resources(config, ray.cluster_resources(), use_gpu, num_cpus_per_worker)
        self.placement_group = placement_group(
            [dict(bundle) for _ in range(size)], strategy=placement_strategy.value
        )
        try:
            ray.get(self.placement_group.ready(), timeout=ready_timeout_s)
        except GetTimeoutError as e:
            remove_placement_group(self.placement_group)
            raise ValueError(
                f"could not place {size} workers ({bundle} each, {placement_strategy.value}) "
                f"within {ready_timeout_s:.0f} s"
            ) from e
        env = {k: v for k, v in os.environ.items() if k.startswith(_PASSED_ENV_PREFIXES)}
        actor_cls = ray.remote(Worker)
        # Named, so operators (and tests) can find a group's ranks:
        # nibble-worker:<model>:<group id>:<rank>.
        label = metrics_labels[0] if metrics_labels else config.model.rsplit("/", 1)[-1]
        self.group_id = uuid.uuid4().hex[:8]
        self.workers = [
            actor_cls.options(
                name=f"nibble-worker:{label}:{self.group_id}:{i}",
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
                runtime_env={"env_vars": env},
            ).remote(i, size, config, metrics_labels)  # fmt: skip
            for i in range(size)
        ]
        self.healthy = True
        try:
            addr, port = ray.get(self.workers[0].address.remote())
            infos = _unwrap(lambda: ray.get([w.init.remote(addr, port) for w in self.workers]))
        except BaseException:
            self.shutdown()
            raise
        self.info: WorkerInfo = infos[0]
        # Long-running calls: each resolves only when its loop ends, so a resolved one means a
        # worker stopped (or died).
        self._loops = [self.workers[0].run_loop.remote()]
        self._loops += [w.follow.remote() for w in self.workers[1:]]
        unit = "GPU" if "GPU" in bundle else "CPU"
        logger.info("worker group of %d ranks ready (%s)", size, unit)

    def submit(self, messages: list[AddRequest | AbortRequest]) -> None:
        self.check_health()
        self.workers[0].submit.remote(messages)

    def poll(self, timeout_s: float = 0.1) -> OutputBatch:
        """Outputs since the last poll. Raises WorkerGroupError once any worker has died."""
        self.check_health()
        try:
            batch = ray.get(self.workers[0].poll.remote(timeout_s), timeout=timeout_s + 30)
        except (RayActorError, GetTimeoutError) as e:
            self._fail(f"rank 0 stopped answering: {e}")
        return self._checked(batch)

    async def poll_async(self, timeout_s: float = 0.1) -> OutputBatch:
        """poll() for asyncio callers (the Serve model server)."""
        self.check_health()
        try:
            batch = await asyncio.wait_for(self.workers[0].poll.remote(timeout_s), timeout_s + 30)
        except (RayActorError, asyncio.TimeoutError) as e:
            self._fail(f"rank 0 stopped answering: {type(e).__name__} {e}")
        if batch.error:  # _checked then waits for a dead follower: not on the event loop
            return await asyncio.to_thread(self._checked, batch)
        return self._checked(batch)

    def _checked(self, batch: OutputBatch) -> OutputBatch:
        """The batch, unless rank 0's loop failed, a worker died while it was gathered, or a
        step has run for longer than step_stall_s (a hung rank: alive, so no loop ends, while
        the others wait in a collective until its 10-minute timeout)."""
        if batch.step_running_s > self.step_stall_s:
            self._fail_if_down(self._loops[1:], 0)
            self._fail(
                f"a step has run for {batch.step_running_s:.0f} s (more than step_stall_s = "
                f"{self.step_stall_s:.0f} s): a rank is hung"
            )
        if batch.error:
            # A rank that dies mid-step breaks rank 0's collective first ("connection reset"):
            # name the dead rank, whose loop resolves moments later, rather than the symptom.
            self._fail_if_down(self._loops[1:], FOLLOWER_DEATH_WAIT_S)
            self._fail(f"a step failed on rank 0:\n{batch.error}")
        self.check_health()
        return batch

    def check_health(self) -> None:
        if not self.healthy:
            raise WorkerGroupError("the worker group is down")
        self._fail_if_down(self._loops, 0)

    def _fail_if_down(self, loops: list[ray.ObjectRef], timeout_s: float) -> None:
        """Fail the group, naming the rank, if one of these loops ended within timeout_s."""
        if not loops:
            return
        done, _ = ray.wait(loops, num_returns=1, timeout=timeout_s)
        if done:
            rank = self._loops.index(done[0])
            try:
                ray.get(done[0])
                reason = "its loop ended"
            except Exception as e:  # noqa: BLE001 - any failure of the worker is reported
                reason = _failure_reason(e)
            self._fail(f"worker rank {rank} is down ({reason})")

    def _fail(self, reason: str) -> None:
        self.healthy = False
        logger.error("worker group unhealthy: %s", reason)
        raise WorkerGroupError(f"the worker group is down: {reason}")

    def shutdown(self) -> None:
        """Stop every worker and free the placement group; a new group can then be built."""
        self.healthy = False
        for worker in getattr(self, "workers", []):
            ray.kill(worker, no_restart=True)
        if getattr(self, "placement_group", None) is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
        time.sleep(0)  # let Ray process the kills before a rebuild reuses the resources


def _failure_reason(e: Exception) -> str:
    """What made a worker's loop fail: the worker's own exception (a RayTaskError's first line
    names only the task), else the actor's death."""
    cause = getattr(e, "cause", None)
    error = cause if isinstance(cause, BaseException) else e
    text = _ANSI.sub("", str(error)).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _unwrap(call):
    """Re-raise a worker's ValueError (bad model, bad size) as itself, not as a Ray error."""
    try:
        return call()
    except RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, ValueError):
            raise ValueError(str(cause)) from None
        raise
