"""Records the engine's per-step figures and each rank's load report as Prometheus metrics
(through Ray's pipeline; names and meanings in deployments/metrics.py)."""

from __future__ import annotations

import threading
import time

from deployments.metrics import metric
from engine.loader import LoadReport
from engine.stats import StepStats

# Ray exports a gauge only while it keeps being set (a value not refreshed within about two
# report intervals, 2 s by default, ages out), so gauges are re-set this often.
GAUGE_REFRESH_S = 0.5


_ENGINE_STATE_GAUGES = (
    "nibble_num_requests_running",
    "nibble_num_requests_waiting",
    "nibble_kv_cache_usage_perc",
)


class EngineMetrics:
    def __init__(self, model_name: str, replica: str, tp_rank: int) -> None:
        self.model = {"model_name": model_name}
        self.replica = self.model | {"replica": replica}
        self.rank = self.replica | {"tp_rank": str(tp_rank)}
        self._gauges: dict[tuple[str, tuple], float] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._refresh_gauges, daemon=True, name="gauges").start()

    def _set(self, name: str, value: float, tags: dict[str, str]) -> None:
        with self._lock:
            self._gauges[(name, tuple(sorted(tags.items())))] = value
        metric(name).set(value, tags)

    def _refresh_gauges(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._lock:
                gauges = list(self._gauges.items())
            for (name, tags), value in gauges:
                metric(name).set(value, dict(tags))

    def forget_engine_state(self) -> None:
        """The engine's loop failed: its running/waiting/cache gauges stop being re-set, so they
        age out within seconds instead of showing the last state until the replica is
        replaced (the load gauges stay: the weights were loaded)."""
        with self._lock:
            for key in [k for k in self._gauges if k[0] in _ENGINE_STATE_GAUGES]:
                del self._gauges[key]

    def record_load(self, report: LoadReport) -> None:
        tags = self.rank | {"quantization": report.quantization}
        self._set("nibble_model_load_time_seconds", report.load_seconds, tags)
        self._set("nibble_model_quantization_time_seconds", report.quantization_seconds, tags)
        self._set("nibble_model_weight_bytes", report.weight_bytes, tags)
        self._set("nibble_model_weight_ratio_to_16bit", report.ratio_to_16bit, tags)

    def record_step_time(self, seconds: float) -> None:
        metric("nibble_step_time_seconds").observe(seconds, self.rank)

    def record_engine(self, stats: StepStats) -> None:
        """Rank 0: everything one or more steps (and aborts) produced."""
        m = self.model
        if stats.num_seqs:
            self.record_step_time(stats.step_seconds)
            metric("nibble_batch_size").observe(stats.num_seqs, m)
            metric("nibble_step_tokens").observe(stats.num_tokens, m)
        self._set("nibble_num_requests_running", stats.num_running, self.replica)
        self._set("nibble_num_requests_waiting", stats.num_waiting, self.replica)
        self._set("nibble_kv_cache_usage_perc", stats.kv_cache_usage, self.replica)
        if stats.num_preempted:
            metric("nibble_num_preemptions").inc(stats.num_preempted, m)
        if stats.num_launched_ahead:
            metric("nibble_num_steps_launched_ahead").inc(stats.num_launched_ahead, m)
        if stats.num_generated_tokens:
            metric("nibble_generation_tokens").inc(stats.num_generated_tokens, m)
        if stats.num_prompt_tokens:
            metric("nibble_prompt_tokens").inc(stats.num_prompt_tokens, m)
        for value in stats.time_to_first_token:
            metric("nibble_time_to_first_token_seconds").observe(value, m)
        for value in stats.inter_token_latency:
            metric("nibble_inter_token_latency_seconds").observe(value, m)
        for f in stats.finished:
            metric("nibble_request_success").inc(1, m | {"finished_reason": f.finish_reason})
            metric("nibble_e2e_request_latency_seconds").observe(f.e2e, m)
            for name, value in (
                ("nibble_request_queue_time_seconds", f.queue),
                ("nibble_request_prefill_time_seconds", f.prefill),
                ("nibble_request_decode_time_seconds", f.decode),
                ("nibble_request_time_per_output_token_seconds", f.time_per_output_token),
            ):
                if value is not None:
                    metric(name).observe(value, m)
