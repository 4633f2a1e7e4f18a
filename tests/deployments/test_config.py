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
        # Values that passed once and failed later, or silently did something else.
        ({"models": [{"model": "a", "block_size": 100}]}, "block_size 100 is not one of"),
        ({"models": [{"model": "a", "device": "gpu"}]}, "device 'gpu' is not cpu, cuda or cuda:N"),
        (
            {"models": [{"model": "a", "max_num_batched_tokens": 8, "max_num_seqs": 256}]},
            r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(256\)",
        ),
        ({"models": [{"model": "a"}], "api_keys": ["sk-1", " "]}, "empty keys"),
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


def test_a_local_model_is_served_under_the_name_its_config_gives(tmp_path, monkeypatch):
    """A local path is made absolute for the replicas, but clients name the model as the config
    does (it was served under the absolute path; and `m` and `./m` collided into one)."""
    from deployments.app import _absolute_paths
    from deployments.config import ModelArgs

    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    for written in ("m", "./m"):
        model = _absolute_paths(ModelArgs(model=written))
        assert model.name == written and model.model == str((tmp_path / "m").resolve())
    named = _absolute_paths(ModelArgs(model="m", served_model_name="demo"))
    assert named.name == "demo"


def test_api_keys_fail_closed_and_open_paths_work_under_a_route_prefix(monkeypatch):
    """An api_keys_env that holds no key is an error (authentication would silently be off);
    /health and /version stay open when the app is served under a route prefix."""
    from starlette.requests import Request

    from deployments.ingress import authorize, load_api_keys
    from deployments.protocol import OpenAIError

    args = AppArgs.model_validate({"models": [{"model": "m"}], "api_keys_env": "NIBBLE_TEST_KEYS"})
    monkeypatch.setenv("NIBBLE_TEST_KEYS", " , ")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(args)
    monkeypatch.setenv("NIBBLE_TEST_KEYS", "sk-1")
    keys = load_api_keys(args)

    def request(path: str, root: str, key: str | None = None) -> Request:
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        return Request({
            "type": "http", "method": "GET", "path": path, "root_path": root, "headers": headers,
            "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 8000),
        })  # fmt: skip

    for root in ("", "/nibble"):
        authorize(request(f"{root}/health", root), keys)
        authorize(request(f"{root}/v1/models", root, "sk-1"), keys)
        with pytest.raises(OpenAIError, match="API key"):
            authorize(request(f"{root}/v1/models", root), keys)
