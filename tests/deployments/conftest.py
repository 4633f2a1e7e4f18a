"""Starts the real Serve app from configs/*.yaml on a local Ray (CPU) for the API tests."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import ray
from ray import serve
from serve_configs import config_args

from deployments.app import build_app
from workers.dist import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
def serve_instance():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # metrics reach the export port in ~1 s
    os.chdir(ROOT)  # configs name the demo model relative to the repository root
    metrics_port = free_port()
    # Ray gives a new node's raylet a fixed 30 s to register; a loaded 2-core CI machine has
    # missed that once, right after another Ray session. One more attempt, then fail.
    for attempt in range(2):
        try:
            ray.init(
                num_cpus=8, include_dashboard=False, logging_level="ERROR",
                _metrics_export_port=metrics_port,
            )  # fmt: skip
            break
        except Exception as exc:
            ray.shutdown()
            if attempt or "timed out during startup" not in str(exc):
                raise
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", metrics_port=metrics_port)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="package")
def base_url(serve_instance):
    """The two-model app (one of them tensor-parallel) at /."""
    serve.run(build_app(config_args("cpu-two-models.yaml")), name="nibble", route_prefix="/")
    return serve_instance.url


@pytest.fixture(scope="package")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="package")
def secure_url(serve_instance):
    """The demo model with API keys and a one-request capacity, at /secure."""
    args = config_args("llama.yaml")
    args["api_keys"] = ["sk-test-key"]
    args["max_request_body_bytes"] = 4096
    args["models"][0]["deployment"] = {
        "num_replicas": 1, "max_ongoing_requests": 1, "max_queued_requests": 1,
    }  # fmt: skip
    serve.run(build_app(args), name="secure", route_prefix="/secure")
    return f"{serve_instance.url}/secure"
