"""A dead worker: /health says which model is down, its requests get a 503 in OpenAI's shape
(no hang), and Serve's health check rebuilds the replica with a fresh worker group."""

from __future__ import annotations

import time

import httpx
import ray
from prometheus_client.parser import text_string_to_metric_families

MODEL = "nibble-demo-tp2"


def _worker(rank: int):
    names = [
        a for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"nibble-worker:{MODEL}:") and a["name"].endswith(f":{rank}")
    ]  # fmt: skip
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def _until(check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError("timed out")


def _workers_down_count(metrics_port: int) -> float:
    """This model's `workers_down` errors as Ray's metrics endpoint exports them now."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ray_nibble_request_errors_total"
        and sample.labels.get("model_name") == MODEL
        and sample.labels.get("error") == "workers_down"
    )


def test_dead_worker_is_reported_and_rebuilt(base_url, serve_instance):
    body = {"model": MODEL, "prompt": "A module", "max_tokens": 4}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        assert http.post("/v1/completions", json=body).status_code == 200
        before = _workers_down_count(serve_instance.metrics_port)
        ray.kill(_worker(1), no_restart=True)
        health = _until(lambda: (r := http.get("/health")).status_code == 503 and r, 30)
        assert health.json()["down"] == [MODEL]
        start = time.monotonic()
        failed = http.post("/v1/completions", json=body)
        assert failed.status_code == 503 and time.monotonic() - start < 30
        assert failed.json()["error"]["type"] == "service_unavailable"
        assert "Traceback" not in failed.text  # the cause is in the server log only
        # A stream's head is out before the workers are asked: the error comes as an event.
        streamed = http.post("/v1/completions", json=body | {"stream": True}).text
        assert '"service_unavailable"' in streamed and streamed.endswith("data: [DONE]\n\n")
        # Each failed request counts once, whole or streamed (once counted twice when whole).
        _until(lambda: _workers_down_count(serve_instance.metrics_port) >= before + 2, 30)
        time.sleep(3)  # a third count would have been reported by now (every second)
        assert _workers_down_count(serve_instance.metrics_port) == before + 2
        assert http.post("/v1/completions", json=body | {"model": "nibble-demo"}).status_code == 200
        # Serve notices through the replica's health check and starts a new worker group.
        _until(lambda: http.get("/health").status_code == 200, 180)
        assert http.post("/v1/completions", json=body).status_code == 200
        # A group that dies while idle (no poll running to notice): the next request finds it,
        # a 503 (it was a 500, and an empty 200 stream), and counts it.
        before = _workers_down_count(serve_instance.metrics_port)
        ray.kill(_worker(1), no_restart=True)
        time.sleep(1)  # the kill lands; nothing asks the group meanwhile
        failed = http.post("/v1/completions", json=body)
        assert failed.status_code == 503, failed.text
        assert failed.json()["error"]["type"] == "service_unavailable"
        streamed = http.post("/v1/completions", json=body | {"stream": True}).text
        assert '"service_unavailable"' in streamed and streamed.endswith("data: [DONE]\n\n")
        _until(lambda: _workers_down_count(serve_instance.metrics_port) >= before + 2, 30)
