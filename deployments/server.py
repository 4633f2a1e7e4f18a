"""One model's Serve deployment: owns a worker group and streams engine outputs to requests."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

from ray import serve

from deployments.config import ModelArgs
from deployments.metrics import metric
from deployments.openai_serving import OpenAIServing
from deployments.protocol import OpenAIError, bad_request
from engine.model_files import load_tokenizer
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from workers.group import PlacementStrategy, WorkerGroup, WorkerGroupError
from workers.messages import AbortRequest, AddRequest

logger = logging.getLogger(__name__)
POLL_TIMEOUT_S = 0.05


@serve.deployment
class ModelServer:
    """Requests arrive from the ingress; one background task moves output batches from the worker
    group's rank 0 to each request's queue. A request whose caller goes away is aborted, which
    frees its KV blocks at once."""

    def __init__(self, args: ModelArgs) -> None:
        self.args = args
        config = args.engine_config()
        self.tokenizer = load_tokenizer(config.model, config.tokenizer, config.revision)
        replica = serve.get_replica_context().replica_tag
        self.metrics_tags = {"model_name": args.name}
        self.group = WorkerGroup(
            config, PlacementStrategy(args.placement_strategy), metrics_labels=(args.name, replica)
        )
        self.limits = self.group.info.limits
        self.serving = OpenAIServing(args.name, self.tokenizer, self.limits, self.generate)
        self._queues: dict[str, asyncio.Queue] = {}
        self._wakeup = asyncio.Event()
        self._pump_task: asyncio.Task | None = None

    # Engine side.

    def _ensure_pump(self) -> None:
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        while True:
            if not self._queues:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                batch = await self.group.poll_async(POLL_TIMEOUT_S)
            except WorkerGroupError as e:
                logger.error("model %s: worker group failed: %s", self.args.name, e)
                for queue in self._queues.values():
                    queue.put_nowait(e)
                self._queues.clear()
                return
            for request_id, reason in batch.rejected:
                if (queue := self._queues.get(request_id)) is not None:
                    queue.put_nowait(bad_request(reason))
            # Outputs are cumulative: only a request's latest one in a batch needs sending.
            latest = {output.request_id: output for output in batch.outputs}
            for request_id, output in latest.items():
                if (queue := self._queues.get(request_id)) is not None:
                    queue.put_nowait(output)

    async def generate(
        self, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come; aborts it if the caller stops listening. The
        request was validated by OpenAIServing (and rank 0 rejects what cannot run)."""
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            # Also finds a group that died while idle (no poll was running to notice).
            self.group.submit([AddRequest(request_id, prompt, prompt_token_ids, params)])
        except WorkerGroupError:
            self._queues.pop(request_id, None)
            self._count_error("workers_down")
            raise OpenAIError(503, "the model's workers are down", "service_unavailable") from None
        self._ensure_pump()
        self._wakeup.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                # A caller that fell behind gets the latest (cumulative) output in one piece.
                while isinstance(item, RequestOutput) and not item.finished and not queue.empty():
                    item = queue.get_nowait()
                if isinstance(item, WorkerGroupError):
                    self._count_error("workers_down")
                    # The cause (a traceback, with paths) is in the log, not for clients.
                    raise OpenAIError(
                        503, "the model's workers failed; retry shortly", "service_unavailable"
                    )
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished and self.group.healthy:
                try:
                    self.group.submit([AbortRequest(request_id)])
                except WorkerGroupError:
                    pass  # the group is gone, and the request with it

    def _count_error(self, kind: str) -> None:
        metric("nibble_request_errors").inc(1, self.metrics_tags | {"error": kind})

    # What the ingress calls. Each streams: first a head ({"status": ...}), then the body.

    async def completions(self, body: dict) -> AsyncIterator[object]:
        async for item in self._counted(self.serving.completions, body):
            yield item

    async def chat_completions(self, body: dict) -> AsyncIterator[object]:
        async for item in self._counted(self.serving.chat_completions, body):
            yield item

    async def _counted(self, handler, body: dict) -> AsyncIterator[object]:
        """Counts the client's invalid requests; a failed worker group is counted where it is
        seen (`generate`), for streamed and whole responses alike, once."""
        async for item in self.serving.run(handler, body):
            if isinstance(item, dict) and 400 <= item.get("status", 200) < 500:
                self._count_error("invalid_request")
            yield item

    async def tokenize(self, body: dict) -> dict:
        return _status_or_error(self.serving.tokenize, body)

    async def detokenize(self, body: dict) -> dict:
        return _status_or_error(self.serving.detokenize, body)

    async def info(self) -> dict:
        return {
            "id": self.args.name,
            "max_model_len": self.limits.max_model_len,
            "root": self.args.model,
        }

    async def stats(self) -> dict[str, int]:
        return await self.group.workers[0].stats.remote()

    async def healthy(self) -> bool:
        try:
            self.group.check_health()
        except WorkerGroupError:
            return False
        return True

    def check_health(self) -> None:
        """Serve's replica health check: a dead worker group makes Serve replace this replica
        (whose new worker group then loads from scratch)."""
        self.group.check_health()

    def __del__(self) -> None:
        group = getattr(self, "group", None)
        if group is not None:
            group.shutdown()


def _status_or_error(handler, body: dict) -> dict:
    """A handler's response as {"status": 200, "body": ...} or {"status": 4xx, "error": ...}: an
    exception raised in a replica reaches the ingress wrapped by Ray, not as an OpenAIError."""
    try:
        return {"status": 200, "body": handler(body)}
    except OpenAIError as e:
        return e.result()
