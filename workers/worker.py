"""One tensor-parallel rank as a Ray actor.

Rank 0 owns the LLMEngine and runs the step loop on a thread of its own: requests arrive through
`submit`, each step's plan is broadcast to the other ranks, and outputs leave in batches through
`poll`. The other ranks sit in `follow`, running every plan they receive. No Ray call happens per
step."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback

import ray
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.model_spec import ModelSpec
from engine.outputs import RequestOutput
from workers.dist import broadcast_object, free_port, init_distributed
from workers.engine_metrics import EngineMetrics
from workers.messages import AbortRequest, AddRequest, OutputBatch, WorkerInfo

logger = logging.getLogger(__name__)
_IDLE_WAIT_S = 0.05


class Worker:
    def __init__(
        self,
        rank: int,
        world_size: int,
        config: EngineConfig,
        metrics_labels: tuple[str, str] | None = None,
    ) -> None:
        """metrics_labels: (model_name, replica) to export metrics under, or None for none."""
        self.rank = rank
        self.metrics = EngineMetrics(*metrics_labels, tp_rank=rank) if metrics_labels else None
        self.world_size = world_size
        self.config = config
        self.engine: LLMEngine | None = None
        self.cpu_group = None
        # One item per submit() call: a batch of requests is added before the next step.
        self._inbox: queue.Queue[list[AddRequest | AbortRequest]] = queue.Queue()
        self._outbox: list[RequestOutput] = []
        self._rejected: list[tuple[str, str]] = []
        self._has_output = threading.Condition()
        self._error: str | None = None
        self._step_started: float | None = None  # monotonic start of the step in progress
        self._stopping = threading.Event()

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def init(self, master_addr: str, master_port: int) -> WorkerInfo | None:
        """Join the process group and load this rank's shard. Rank 0 returns the engine's info."""
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(0)  # Ray exposes this actor's GPU as device 0
        config = self.config.model_copy(update={"device": str(device)})
        if self.world_size > 1:
            self.cpu_group = init_distributed(
                self.rank, self.world_size, master_addr, master_port, device
            )
        if self.rank != 0:
            self.runner = ModelSpec.resolve(config).build_runner()
            if self.metrics:
                self.metrics.record_load(self.runner.load_report)
            return None
        broadcast = self._broadcast if self.world_size > 1 else None
        self.engine = LLMEngine(config, broadcast=broadcast)
        report = self.engine.runner.load_report
        if self.metrics:
            self.metrics.record_load(report)
            self.engine.collect_stats = True
        return WorkerInfo(
            limits=self.engine.limits, num_blocks=self.engine.runner.num_blocks,
            load_seconds=report.load_seconds, weight_bytes=report.weight_bytes,
            weight_bytes_16bit=report.weight_bytes_16bit, quantization=report.quantization,
        )  # fmt: skip

    def _broadcast(self, plan) -> None:
        broadcast_object(plan, self.cpu_group)

    def pid(self) -> int:
        return os.getpid()

    # Ranks > 0.

    def follow(self) -> None:
        """Run every step plan rank 0 broadcasts, until it broadcasts None."""
        while (plan := broadcast_object(None, self.cpu_group)) is not None:
            start = time.perf_counter()
            self.runner.run(plan)
            if self.metrics:
                self.metrics.record_step_time(time.perf_counter() - start)

    # Rank 0.

    def submit(self, messages: list[AddRequest | AbortRequest]) -> None:
        self._inbox.put(messages)

    def poll(self, timeout_s: float) -> OutputBatch:
        """Wait up to timeout_s for outputs; return all that have accumulated."""
        with self._has_output:
            if not (self._outbox or self._rejected or self._error):
                self._has_output.wait(timeout_s)
            started = self._step_started
            running = time.monotonic() - started if started is not None else 0.0
            batch = OutputBatch(self._outbox, self._rejected, self._error, running)
            self._outbox, self._rejected = [], []
        return batch

    def run_loop(self) -> None:
        """The step loop; returns when stopped, raises if a step fails."""
        engine = self.engine
        try:
            while not self._stopping.is_set():
                busy = self._drain_inbox(block=not engine.has_unfinished_requests())
                if engine.has_unfinished_requests():
                    busy = True
                    # Watched from poll: a step that never ends is a hung rank (a collective
                    # waits on it) that no loop's end would reveal.
                    self._step_started = time.monotonic()
                    outputs = engine.step()
                    self._step_started = None
                    if outputs:
                        with self._has_output:
                            self._outbox.extend(outputs)
                            self._has_output.notify_all()
                if busy and self.metrics:
                    self.metrics.record_engine(engine.take_stats())
        except Exception:
            with self._has_output:
                self._error = traceback.format_exc()
                self._has_output.notify_all()
            if self.metrics:
                self.metrics.forget_engine_state()
            raise
        finally:
            if self.world_size > 1 and self._error is None:
                self._broadcast(None)  # release the followers

    def _drain_inbox(self, block: bool) -> bool:
        """Handle every waiting message; True if there was any."""
        try:
            messages = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            for message in messages:
                self._handle(message)
            try:
                messages = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _handle(self, message: AddRequest | AbortRequest) -> None:
        engine = self.engine
        if isinstance(message, AbortRequest):
            final = engine.abort_request(message.request_id)
            if final is not None:
                with self._has_output:
                    self._outbox.append(final)
                    self._has_output.notify_all()
            return
        try:
            engine.add_request(
                message.request_id, message.prompt, message.params,
                prompt_token_ids=message.prompt_token_ids,
            )  # fmt: skip
        except ValueError as e:
            with self._has_output:
                self._rejected.append((message.request_id, str(e)))
                self._has_output.notify_all()

    def stats(self) -> dict[str, int]:
        """Rank 0's engine state, for health pages and tests."""
        engine = self.engine
        return {
            "num_unfinished_requests": len(engine.requests),
            "num_running": len(engine.scheduler.running),
            "num_waiting": len(engine.scheduler.waiting),
            "num_free_blocks": engine.block_manager.num_free_blocks,
            "num_blocks": engine.block_manager.num_blocks,
        }

    def stop(self) -> None:
        self._stopping.set()
