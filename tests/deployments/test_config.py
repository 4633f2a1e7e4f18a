"""The Serve YAML schema: every shipped config validates; mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.app import build_app
from deployments.config import AppArgs

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_validate(path):
    config = yaml.safe_load(path.read_text())
    for application in config["applications"]:
        assert application["import_path"] == "deployments.app:build_app"
        args = AppArgs.model_validate(application["args"])
        assert args.models


def test_unknown_fields_are_named():
    with pytest.raises(ValidationError) as info:
        build_app({"models": [{"model": "m", "max_num_seq": 4, "deployment": {"replicas": 2}}]})
    text = str(info.value)
    assert "models.0.max_num_seq" in text and "models.0.deployment.replicas" in text
    assert "Extra inputs are not permitted" in text
    with pytest.raises(ValidationError, match="api_key"):
        build_app({"models": [{"model": "m"}], "api_key": "x"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"models": []}, "at least 1"),
        ({"models": [{"model": "a"}, {"model": "b", "served_model_name": "a"}]}, "unique"),
        (
            {
                "models": [
                    {"model": "a", "deployment": {"num_replicas": 2, "autoscaling_config": {}}}
                ]
            },
            "not both",
        ),
        (
            {"models": [{"model": "a", "deployment": {"max_queued_requests": 0}}]},
            "max_queued_requests",
        ),
        ({"models": [{"model": "a", "tensor_parallel_size": 0}]}, "tensor_parallel_size"),
        ({"models": [{"model": "a", "quantization": "gptq"}]}, "quantization"),
        (
            {
                "models": [
                    {
                        "model": "a",
                        "deployment": {
                            "autoscaling_config": {"min_replicas": 3, "max_replicas": 2}
                        },
                    }
                ]
            },
            "min_replicas",
        ),
    ],
)
def test_invalid_values_say_what(args, message):
    with pytest.raises(ValidationError, match=message):
        AppArgs.model_validate(args)
