"""The Serve entry point: `import_path: deployments.app:build_app`."""

from __future__ import annotations

from pathlib import Path

from ray.serve import Application

from deployments.config import AppArgs, ModelArgs
from deployments.ingress import OpenAIIngress
from deployments.server import ModelServer


def _server_options(model: ModelArgs) -> dict:
    d = model.deployment
    options = {
        "name": f"model:{model.name}",
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "ray_actor_options": {"num_cpus": d.num_cpus},
        "health_check_period_s": 5,
    }
    if d.autoscaling_config is not None:
        options["autoscaling_config"] = d.autoscaling_config.model_dump(exclude_none=True)
    else:
        options["num_replicas"] = d.num_replicas or 1
    return options


def _absolute_paths(model: ModelArgs) -> ModelArgs:
    """Local model paths are relative to where `serve run` starts, not to the replicas. The
    served name stays what the config says (`served_model_name`, else `model` as written)."""
    update = {"served_model_name": model.name}
    for field in ("model", "tokenizer"):
        value = getattr(model, field)
        if value is not None and Path(value).exists():
            update[field] = str(Path(value).resolve())
    return model.model_copy(update=update)


def build_app(args: dict) -> Application:
    """Validate the YAML `args` (unknown fields are rejected by name) and bind the app: one
    ModelServer deployment per model behind one OpenAI ingress."""
    app_args = AppArgs.model_validate(args)
    app_args.models = [_absolute_paths(m) for m in app_args.models]
    servers = {m.name: ModelServer.options(**_server_options(m)).bind(m) for m in app_args.models}
    ingress = OpenAIIngress.options(max_ongoing_requests=app_args.ingress_max_ongoing_requests)
    return ingress.bind(servers, app_args)
