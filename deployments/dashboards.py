"""The Grafana dashboards, built as code with grafana-foundation-sdk from the metric names in
deployments/metrics.py. The Helm chart ships the JSON this writes (helm/nibble/dashboards/).

    python -m deployments.dashboards          # rewrite helm/nibble/dashboards/*.json
"""

from __future__ import annotations

from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

from deployments.metrics import SPEC_BY_NAME

OUT_DIR = Path(__file__).resolve().parents[1] / "helm" / "nibble" / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"


def n(name: str, suffix: str = "") -> str:
    """A metric's name as Prometheus sees it under Ray (checked against metrics.py)."""
    return SPEC_BY_NAME[name].prometheus_name + suffix


def quantiles(name: str, *by: str) -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram, one series per value of the `by` labels (model_name)."""
    by = by or ("model_name",)
    bucket = n(name, "_bucket")
    legend = " ".join(f"{{{{{label}}}}}" for label in by)
    return [
        (
            f"histogram_quantile({q}, sum by (le, {', '.join(by)}) (rate({bucket}[{RATE}])))",
            f"p{int(q * 100)} {legend}",
        )
        for q in (0.5, 0.95, 0.99)
    ]


def mean(name: str, by: str = "model_name") -> list[tuple[str, str]]:
    return [(
        f"sum by ({by}) (rate({n(name, '_sum')}[{RATE}])) / sum by ({by}) (rate({n(name, '_count')}[{RATE}]))",
        f"{{{{{by}}}}}",
    )]  # fmt: skip


def panel(title: str, unit: str, queries: list[tuple[str, str]], description: str = "") -> Panel:
    p = Panel().title(title).unit(unit).datasource(DATASOURCE).height(8).span(12)
    if description:
        p = p.description(description)
    for i, (expr, legend) in enumerate(queries):
        p = p.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)))
    return p


def _base(title: str, uid: str) -> Dashboard:
    return (
        Dashboard(title).uid(uid).tags(["nibble", "llm"]).refresh("30s").time("now-1h", "now")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )  # fmt: skip


def overview() -> Dashboard:
    rate = lambda name, by: [(f"sum by ({by}) (rate({n(name)}[{RATE}]))", f"{{{{{by}}}}}")]  # noqa: E731
    return (
        _base("nibble / Overview", "nibble-overview")
        .with_row(Row("Throughput"))
        .with_panel(
            panel("Generated tokens/s", "short", rate("nibble_generation_tokens", "model_name"))
        )
        .with_panel(panel("Prompt tokens/s", "short", rate("nibble_prompt_tokens", "model_name")))
        .with_panel(
            panel(
                "Finished sequences/s by reason",
                "reqps",
                [
                    (
                        f"sum by (model_name, finished_reason) (rate({n('nibble_request_success')}[{RATE}]))",
                        "{{model_name}} {{finished_reason}}",
                    )
                ],
            )
        )  # fmt: skip
        .with_panel(
            panel(
                "Replicas (worker groups reporting)",
                "short",
                [
                    (
                        f"count by (model_name) ({n('nibble_kv_cache_usage_perc')})",
                        "{{model_name}}",
                    )
                ],
            )
        )  # fmt: skip
        .with_row(Row("Latency"))
        .with_panel(
            panel("Time to first token", "s", quantiles("nibble_time_to_first_token_seconds"))
        )
        .with_panel(
            panel("Inter-token latency", "s", quantiles("nibble_inter_token_latency_seconds"))
        )
        .with_panel(
            panel(
                "End-to-end request latency", "s", quantiles("nibble_e2e_request_latency_seconds")
            )
        )
        .with_panel(panel("Queue time", "s", quantiles("nibble_request_queue_time_seconds")))
        .with_row(Row("Load"))
        .with_panel(
            panel(
                "Running and waiting sequences",
                "short",
                [
                    (
                        f"sum by (model_name) ({n('nibble_num_requests_running')})",
                        "running {{model_name}}",
                    ),
                    (
                        f"sum by (model_name) ({n('nibble_num_requests_waiting')})",
                        "waiting {{model_name}}",
                    ),
                ],
            )
        )  # fmt: skip
        .with_panel(
            panel(
                "KV cache usage",
                "percentunit",
                [
                    (
                        f"max by (model_name, replica) ({n('nibble_kv_cache_usage_perc')})",
                        "{{model_name}} {{replica}}",
                    )
                ],
            )
        )  # fmt: skip
        .with_row(Row("Errors"))
        .with_panel(
            panel(
                "HTTP responses/s by status",
                "reqps",
                [
                    (
                        f"sum by (route, status_code) (rate({n('nibble_http_requests')}[{RATE}]))",
                        "{{route}} {{status_code}}",
                    )
                ],
            )
        )  # fmt: skip
        .with_panel(
            panel(
                "Request errors/s",
                "reqps",
                [
                    (
                        f"sum by (model_name, error) (rate({n('nibble_request_errors')}[{RATE}]))",
                        "{{model_name}} {{error}}",
                    )
                ],
            )
        )  # fmt: skip
    )


def engine() -> Dashboard:
    return (
        _base("nibble / Engine and workers", "nibble-engine")
        .with_row(Row("Steps"))
        .with_panel(
            panel(
                "Step time per rank",
                "s",
                quantiles("nibble_step_time_seconds", "model_name", "tp_rank"),
            )  # fmt: skip
        )
        .with_panel(panel("Sequences per step (mean)", "short", mean("nibble_batch_size")))
        .with_panel(panel("Tokens per step (mean)", "short", mean("nibble_step_tokens")))
        .with_panel(
            panel(
                "Preemptions/s",
                "short",
                [
                    (
                        f"sum by (model_name) (rate({n('nibble_num_preemptions')}[{RATE}]))",
                        "{{model_name}}",
                    )
                ],
            )
        )  # fmt: skip
        .with_panel(
            panel(
                "Decode steps launched ahead (share of steps)",
                "percentunit",
                [
                    (
                        f"sum by (model_name) (rate({n('nibble_num_steps_launched_ahead')}[{RATE}]))"
                        f" / sum by (model_name) "
                        f"(rate({n('nibble_step_time_seconds', '_count')}"
                        f'{{tp_rank="0"}}[{RATE}]))',
                        "{{model_name}}",
                    )
                ],
            )
        )  # fmt: skip
        .with_panel(
            panel(
                "Prefill and decode time (p95)",
                "s",
                [
                    (q, f"prefill {leg}")
                    for q, leg in quantiles("nibble_request_prefill_time_seconds")[1:2]
                ]
                + [
                    (q, f"decode {leg}")
                    for q, leg in quantiles("nibble_request_decode_time_seconds")[1:2]
                ],
            )
        )  # fmt: skip
        .with_panel(
            panel(
                "Time per output token",
                "s",
                quantiles("nibble_request_time_per_output_token_seconds"),
            )
        )
        .with_row(Row("Model load"))
        .with_panel(
            panel(
                "Load and quantization time per rank",
                "s",
                [
                    (
                        f"max by (model_name, tp_rank) ({n('nibble_model_load_time_seconds')})",
                        "load {{model_name}} rank {{tp_rank}}",
                    ),
                    (
                        f"max by (model_name, tp_rank) ({n('nibble_model_quantization_time_seconds')})",
                        "quantize {{model_name}} rank {{tp_rank}}",
                    ),
                ],
            )
        )  # fmt: skip
        .with_panel(
            panel(
                "Weight memory per rank",
                "bytes",
                [
                    (
                        f"max by (model_name, tp_rank, quantization) ({n('nibble_model_weight_bytes')})",
                        "{{model_name}} rank {{tp_rank}} {{quantization}}",
                    ),
                ],
            )
        )  # fmt: skip
        .with_panel(
            panel(
                "Weights vs 16-bit",
                "percentunit",
                [
                    (
                        f"max by (model_name, quantization) ({n('nibble_model_weight_ratio_to_16bit')})",
                        "{{model_name}} {{quantization}}",
                    ),
                ],
            )
        )  # fmt: skip
    )


DASHBOARDS = {"nibble-overview.json": overview, "nibble-engine.json": engine}


def render(build) -> str:
    return JSONEncoder(sort_keys=True, indent=2).encode(build().build()) + "\n"


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for filename, build in DASHBOARDS.items():
        (OUT_DIR / filename).write_text(render(build))
        print(OUT_DIR / filename)


if __name__ == "__main__":
    main()
