"""Every metric nibble exports, in one place: names, types, labels and meanings.

Metrics go through Ray's metrics pipeline (`ray.util.metrics`), which serves them in Prometheus
format on each node's metrics export port (the port KubeRay's PodMonitors scrape). Prometheus
sees each name with Ray's `ray_` prefix, e.g. `ray_nibble_time_to_first_token_seconds_bucket`.
Meanings follow vLLM's where the concept is the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# Seconds, from sub-millisecond GPU steps to slow CPU requests.
LATENCY_BUCKETS = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
]  # fmt: skip
COUNT_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
RAY_PREFIX = "ray_"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    description: str
    tag_keys: tuple[str, ...]
    buckets: tuple[float, ...] | None = None

    @property
    def prometheus_name(self) -> str:
        """The name as Prometheus sees it under Ray (counters gain `_total`)."""
        suffix = "_total" if self.kind == "counter" else ""
        return f"{RAY_PREFIX}{self.name}{suffix}"


M, R, T = ("model_name",), ("model_name", "replica"), ("model_name", "replica", "tp_rank")
L, C = tuple(LATENCY_BUCKETS), tuple(COUNT_BUCKETS)

SPECS = [
    # Requests (recorded by rank 0 of each worker group).
    MetricSpec("nibble_time_to_first_token_seconds", "histogram", "Arrival to first generated token.", M, L),
    MetricSpec("nibble_inter_token_latency_seconds", "histogram", "Time between consecutive tokens of a sequence.", M, L),
    MetricSpec("nibble_request_time_per_output_token_seconds", "histogram", "Decode time divided by generated tokens after the first, per finished sequence.", M, L),
    MetricSpec("nibble_e2e_request_latency_seconds", "histogram", "Arrival to finish, per finished sequence.", M, L),
    MetricSpec("nibble_request_queue_time_seconds", "histogram", "Arrival to first scheduled.", M, L),
    MetricSpec("nibble_request_prefill_time_seconds", "histogram", "First scheduled to first token.", M, L),
    MetricSpec("nibble_request_decode_time_seconds", "histogram", "First token to finish.", M, L),
    MetricSpec("nibble_prompt_tokens", "counter", "Prompt tokens of admitted requests.", M),
    MetricSpec("nibble_generation_tokens", "counter", "Generated tokens.", M),
    MetricSpec("nibble_request_success", "counter", "Finished sequences by finish reason (stop, length, abort).", ("model_name", "finished_reason")),
    MetricSpec("nibble_request_errors", "counter", "Requests that ended in an error, by kind (invalid_request, workers_down).", ("model_name", "error")),
    MetricSpec("nibble_num_requests_running", "gauge", "Sequences in the running batch.", R),
    MetricSpec("nibble_num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", R),
    # Engine.
    MetricSpec("nibble_kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use (0-1).", R),
    MetricSpec("nibble_num_preemptions", "counter", "Sequences preempted (to be recomputed) for lack of KV blocks.", M),
    MetricSpec("nibble_num_steps_launched_ahead", "counter", "Decode steps queued on the device before the previous step's tokens were read back (async scheduling).", M),
    MetricSpec("nibble_batch_size", "histogram", "Sequences per engine step.", M, C),
    MetricSpec("nibble_step_tokens", "histogram", "Tokens (prefill + decode) per engine step.", M, C),
    MetricSpec("nibble_step_time_seconds", "histogram", "Forward pass (+ sampling on rank 0) time per step, per rank.", T, L),
    # Model load (one value per rank).
    MetricSpec("nibble_model_load_time_seconds", "gauge", "Seconds to build and load the model shard.", T + ("quantization",)),
    MetricSpec("nibble_model_quantization_time_seconds", "gauge", "Seconds spent quantizing weights while loading (0 when pre-quantized).", T + ("quantization",)),
    MetricSpec("nibble_model_weight_bytes", "gauge", "Bytes of the weights this rank holds.", T + ("quantization",)),
    MetricSpec("nibble_model_weight_ratio_to_16bit", "gauge", "Weight bytes relative to the same weights in 16 bits.", T + ("quantization",)),
    # HTTP (recorded by the ingress).
    MetricSpec("nibble_http_requests", "counter", "HTTP requests by route and status code.", ("route", "status_code")),
    MetricSpec("nibble_http_request_duration_seconds", "histogram", "HTTP request duration (streams: until the last byte).", ("route",), L),
]  # fmt: skip
SPEC_BY_NAME = {s.name: s for s in SPECS}

_metrics: dict[str, object] = {}


def metric(name: str):
    """This process's ray.util.metrics object for one spec, created on first use."""
    if name not in _metrics:
        from ray.util import metrics as ray_metrics

        spec = SPEC_BY_NAME[name]
        if spec.kind == "counter":
            _metrics[name] = ray_metrics.Counter(name, spec.description, spec.tag_keys)
        elif spec.kind == "gauge":
            _metrics[name] = ray_metrics.Gauge(name, spec.description, spec.tag_keys)
        else:
            _metrics[name] = ray_metrics.Histogram(
                name, spec.description, list(spec.buckets), spec.tag_keys
            )
    return _metrics[name]
