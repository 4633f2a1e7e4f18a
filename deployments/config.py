"""The schema of the Serve YAML's `args` (what `build_app` receives), validated before anything
starts. Unknown fields are rejected with their names."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config import EngineConfig


class AutoscalingConfig(BaseModel):
    """Ray Serve's autoscaling on ongoing requests (a subset of its options, same names)."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Ongoing requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling_config: min_replicas must be <= max_replicas")
        return self


class DeploymentArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count.")
    autoscaling_config: AutoscalingConfig | None = Field(None, description="Scale on load.")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one replica takes at once (Serve queues the rest)."
    )
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description="Requests queued per deployment beyond that before 503 (-1: no limit).",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs of the server actor (not its workers).")

    @model_validator(mode="after")
    def _one_scaling(self) -> DeploymentArgs:
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no limit) or a positive integer")
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self


class ModelArgs(EngineConfig):
    """One served model: the engine arguments (vLLM's names) plus how it is served."""

    served_model_name: str | None = Field(
        None, description="Name clients use in `model`; defaults to `model`."
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD"] = Field(
        "STRICT_PACK", description="How the ranks of one replica are placed on nodes."
    )
    deployment: DeploymentArgs = Field(default_factory=DeploymentArgs)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    def engine_config(self) -> EngineConfig:
        fields = set(EngineConfig.model_fields)
        return EngineConfig(**self.model_dump(include=fields))


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[ModelArgs] = Field(min_length=1, description="The models this app serves.")
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted bearer keys; empty: no authentication."
    )
    api_keys_env: str | None = Field(
        None,
        description="Name of an environment variable with more keys, comma-separated (e.g. "
        "filled from a Kubernetes Secret, so keys stay out of configs).",
    )
    max_request_body_bytes: int = Field(1 << 20, gt=0, description="Larger request bodies get 413.")
    ingress_max_ongoing_requests: int = Field(
        4096,
        ge=1,
        description="Requests the HTTP ingress holds at once (streams included); keep it above "
        "the models' total capacity, or requests wait before they reach a model.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> AppArgs:
        if any(not key.strip() for key in self.api_keys):
            raise ValueError("api_keys must not hold empty keys (they would let anyone in)")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"served model names must be unique; repeated: {duplicates}")
        return self
