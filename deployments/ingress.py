"""The OpenAI-compatible HTTP front: authentication, body limits, routing by model name, and
errors in OpenAI's JSON shape."""

import asyncio
import hmac
import json
import logging
import os
import time
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.config import AppArgs
from deployments.metrics import metric
from deployments.protocol import OpenAIError, bad_request

logger = logging.getLogger(__name__)
RETRY_AFTER_S = "1"
HEALTH_WAIT_S = 2.0  # how long /health waits for a model's replicas (see health())
app = FastAPI(title="nibble", docs_url=None, redoc_url=None)
_OPEN_PATHS = {"/health", "/version"}


_ROUTES = (
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/version",
    "/tokenize", "/detokenize",
)  # fmt: skip


@app.middleware("http")
async def record_http_metrics(request: Request, call_next):
    """Requests by route and status, and their duration (for a stream: until it starts)."""
    start = time.perf_counter()
    response = await call_next(request)
    path = request.url.path
    route = next((r for r in _ROUTES if path.endswith(r)), "other")  # bounded label values
    tags = {"route": route, "status_code": str(response.status_code)}
    metric("nibble_http_requests").inc(1, tags)
    metric("nibble_http_request_duration_seconds").observe(
        time.perf_counter() - start, {"route": route}
    )
    return response


def error_response(e: OpenAIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def error_result_response(result: dict) -> JSONResponse:
    """The response for an error a replica returned (`OpenAIError.result`)."""
    return JSONResponse(result["error"], status_code=result["status"])


def load_api_keys(args: AppArgs) -> list[bytes]:
    """The accepted keys: the config's and those in api_keys_env, which must hold one (a Secret
    mounted empty must not turn authentication off)."""
    keys = list(args.api_keys)
    if args.api_keys_env:
        if args.api_keys_env not in os.environ:
            raise ValueError(f"api_keys_env names {args.api_keys_env}, which is not set")
        from_env = [k.strip() for k in os.environ[args.api_keys_env].split(",") if k.strip()]
        if not from_env:
            raise ValueError(f"api_keys_env names {args.api_keys_env}, which holds no key")
        keys += from_env
    return [k.encode() for k in keys]


def authorize(request: Request, api_keys: list[bytes]) -> None:
    """Raise 401 unless the request bears one of the keys (none: all pass; so do the open
    paths, also under the app's route prefix, which Serve keeps in the path)."""
    path = request.url.path.removeprefix(request.scope.get("root_path", "").rstrip("/"))
    if not api_keys or path in _OPEN_PATHS:
        return
    header = request.headers.get("authorization", "")
    key = header.removeprefix("Bearer ").strip().encode()
    if not header.startswith("Bearer ") or not any(hmac.compare_digest(key, k) for k in api_keys):
        raise OpenAIError(401, "invalid or missing API key", "authentication_error")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, servers: dict[str, DeploymentHandle], args: AppArgs) -> None:
        self.servers = servers
        self.args = args
        self.api_keys = load_api_keys(args)

    # Shared checks.

    def _authorize(self, request: Request) -> None:
        authorize(request, self.api_keys)

    async def _body(self, request: Request) -> dict:
        self._authorize(request)
        length = request.headers.get("content-length")
        limit = self.args.max_request_body_bytes
        if length is not None and int(length) > limit:
            raise OpenAIError(
                413, f"request body is larger than {limit} bytes", "invalid_request_error"
            )
        raw = await request.body()
        if len(raw) > limit:
            raise OpenAIError(
                413, f"request body is larger than {limit} bytes", "invalid_request_error"
            )
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        return body

    def _server(self, body: dict) -> DeploymentHandle:
        name = body.get("model")
        if not isinstance(name, str):
            raise bad_request("model is required", "model")
        if name not in self.servers:
            raise OpenAIError(
                404, f"the model `{name}` does not exist", "invalid_request_error", "model"
            )
        return self.servers[name]

    async def _generate(self, request: Request, method: str):
        try:
            body = await self._body(request)
            server = self._server(body)
            stream = getattr(server, method).options(stream=True).remote(body)
            head = await stream.__anext__()
        except OpenAIError as e:
            return error_response(e)
        except BackPressureError:
            return error_response(
                OpenAIError(503, "the server is at capacity; retry shortly", "server_overloaded"),
                {"Retry-After": RETRY_AFTER_S},
            )
        if head["status"] != 200:
            return error_result_response(head)
        if head["stream"]:
            return StreamingResponse(stream, media_type="text/event-stream")
        result = await stream.__anext__()
        if "error" in result and "status" in result:
            return error_result_response(result)
        return JSONResponse(result)

    # Routes.

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._generate(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._generate(request, "chat_completions")

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except OpenAIError as e:
            return error_response(e)
        data = [await self._model_card(name) for name in self.servers]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model:path}")  # served names may hold slashes (hub ids)
    async def model(self, model: str, request: Request):
        try:
            self._authorize(request)
            self._server({"model": model})
        except OpenAIError as e:
            return error_response(e)
        return await self._model_card(model)

    async def _model_card(self, name: str) -> dict:
        info = await self.servers[name].info.remote()
        return {"id": name, "object": "model", "owned_by": "nibble", "created": 0} | info

    @app.get("/health")
    async def health(self):
        """503 naming the models whose workers are down; 200 otherwise. A model whose replicas
        have every request slot taken answers only once one frees, so after HEALTH_WAIT_S it is
        reported `busy` (serving), not waited for: a probe must not time out under load. (A
        dead group frees its slots at once, its requests failing; Serve's own health check,
        which takes no slot, replaces its replica.)"""
        results = await asyncio.gather(*(self._healthy(s) for s in self.servers.values()))
        state = dict(zip(self.servers, results, strict=True))
        down = [name for name, healthy in state.items() if healthy is False]
        busy = [name for name, healthy in state.items() if healthy is None]
        if down:
            return JSONResponse({"status": "unhealthy", "down": down}, status_code=503)
        return {"status": "ok"} | ({"busy": busy} if busy else {})

    @staticmethod
    async def _healthy(server: DeploymentHandle) -> bool | None:
        """The model's health, or None if its replicas did not answer within HEALTH_WAIT_S."""

        async def ask() -> bool:
            return await server.healthy.remote()

        try:
            return await asyncio.wait_for(ask(), HEALTH_WAIT_S)
        except (asyncio.TimeoutError, BackPressureError):
            return None

    @app.get("/version")
    async def version(self):
        try:
            return {"version": version("nibble")}
        except PackageNotFoundError:
            return {"version": "unknown"}

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self._tokenizer_call(request, "tokenize")

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self._tokenizer_call(request, "detokenize")

    async def _tokenizer_call(self, request: Request, method: str):
        try:
            body = await self._body(request)
            result = await getattr(self._server(body), method).remote(body)
        except OpenAIError as e:
            return error_response(e)
        if result["status"] != 200:
            return error_result_response(result)
        return result["body"]
