"""Metrics through Ray into a real Prometheus server: every dashboard query returns data, and
every metric in the README table is scraped."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import pytest

from deployments.dashboards import DASHBOARDS, OUT_DIR
from deployments.metrics import SPECS
from workers.dist import free_port

WINDOW = "1m"  # Grafana's $__rate_interval, for a 1 s scrape interval


@pytest.fixture(scope="module")
def prometheus(serve_instance, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is required (.ci/setup installs it)"
    work = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{serve_instance.metrics_port}"]}],
        }],
    }  # fmt: skip
    (work / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _query(url, 'up{job="ray"} == 1'), "Prometheus scraping Ray's metrics port")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _query(url: str, expr: str) -> list:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _wait(check, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


async def _traffic(base_url: str) -> None:
    """Completions, chat, streams, errors, and enough concurrent long requests to preempt."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        jobs = [
            http.post("/v1/completions", json={"model": "nibble-demo", "prompt": "A list", "max_tokens": 16}),
            http.post("/v1/chat/completions", json={"model": "nibble-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}),
            http.post("/v1/completions", json={"model": "nibble-demo", "prompt": "x", "temperature": -1}),
            http.post("/v1/completions", json={"model": "nobody", "prompt": "x"}),
            http.post("/v1/completions", json={"model": "nibble-demo", "prompt": "A module", "max_tokens": 16, "stream": True}),
        ] + [
            # 6 x (prompt + 200 tokens) needs ~80 blocks; the TP model has 48: preemptions.
            http.post("/v1/completions", json={"model": "nibble-demo-tp2", "prompt": f"Function {i}", "max_tokens": 200, "ignore_eos": True})
            for i in range(6)
        ]  # fmt: skip
        responses = await asyncio.gather(*jobs)
    assert sorted(r.status_code for r in responses).count(200) == 9


def test_every_dashboard_query_returns_data(base_url, prometheus):
    for _ in range(2):  # two rounds: rates need two samples of each series
        asyncio.run(_traffic(base_url))
        time.sleep(3)
    _wait(lambda: _query(prometheus, "ray_nibble_num_preemptions_total"), "metrics in Prometheus")
    time.sleep(2)
    empty = []
    for filename in DASHBOARDS:
        for panel in json.loads((OUT_DIR / filename).read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", WINDOW)
                if not _query(prometheus, expr):
                    empty.append(f"{filename} / {panel['title']}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_every_metric_in_the_table_is_scraped(base_url, prometheus):
    missing = []
    for spec in SPECS:
        name = spec.prometheus_name + ("_count" if spec.kind == "histogram" else "")
        if not _query(prometheus, name):
            missing.append(name)
    assert not missing, f"not scraped: {missing}"
    errors = _query(prometheus, 'ray_nibble_request_errors_total{error="invalid_request"}')
    assert errors and float(errors[0]["value"][1]) >= 1
    ranks = {
        r["metric"]["tp_rank"]
        for r in _query(
            prometheus, 'ray_nibble_step_time_seconds_count{model_name="nibble-demo-tp2"}'
        )
    }
    assert ranks == {"0", "1"}
