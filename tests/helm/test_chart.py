"""The Helm chart renders, lints and validates offline (helm-python-sdk, kubernetes-validate),
and its Serve config is the one schema the deployments use."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from helm_python import HelmValuesError
from helm_python.chart import Chart, lint

from deployments.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "nibble"
KUBE_VERSION = "1.30.0"
VALUES = {
    "default": {},
    "tp2-two-models": yaml.safe_load((ROOT / "tests/helm/values-tp2-two-models.yaml").read_text()),
}


def render(values: dict) -> list[dict]:
    manifests = Chart.load(CHART).render(values, name="nibble", namespace="llm")
    return [
        doc
        for path, text in manifests.items()
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", VALUES)
def test_lints_without_errors(name):
    result = lint(CHART, VALUES[name], strict=True)
    assert result["errors"] == [], result
    assert all(m["severity"] < 2 for m in result["messages"]), result["messages"]


@pytest.mark.parametrize("name", VALUES)
def test_kubernetes_manifests_validate(name):
    docs = render(VALUES[name])
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds
    for doc in docs:
        if doc["apiVersion"] in ("v1", "networking.k8s.io/v1"):
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    (service,) = by_kind(docs, "RayService")
    # The endpoint's Service, which KubeRay creates from the RayService (its selector its own).
    serve_service = {"apiVersion": "v1", "kind": "Service", **service["spec"]["serveService"]}
    kubernetes_validate.validate(serve_service, KUBE_VERSION, strict=True)
    # The Ray pods: their templates are Kubernetes pod templates, validated as such.
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": group["template"],
        }
        kubernetes_validate.validate(template, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", VALUES)
def test_serve_config_is_the_deployments_schema(name):
    docs = render(VALUES[name])
    (service,) = by_kind(docs, "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["import_path"] == "deployments.app:build_app"
    args = AppArgs.model_validate(application["args"])
    expected = (
        VALUES[name].get("models") or yaml.safe_load((CHART / "values.yaml").read_text())["models"]
    )
    assert [m.name for m in args.models] == [
        m.get("served_model_name", m["model"]) for m in expected
    ]
    # On the GPU workers even before they are up (not on the head's CPUs), unless a model
    # names its device.
    assert [m.device for m in args.models] == [m.get("device", "cuda") for m in expected]


def test_gpu_workers_secrets_and_security():
    docs = render(VALUES["tp2-two-models"])
    (service,) = by_kind(docs, "RayService")
    cluster = service["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 6)
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"  # the largest TP size
    env = {e["name"]: e for e in container["env"]}
    assert env["NIBBLE_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "nibble-api-keys"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "hf-token"
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    # KubeRay submits the Serve config through the dashboard, so it listens on the pod IP (no
    # loopback override) behind Ray's token authentication, which KubeRay turns on.
    assert "dashboard-host" not in head["rayStartParams"]
    ports = {
        p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["dashboard"] == 8265 and ports["serve"] == 8000
    assert cluster["authOptions"] == {"mode": "token"}
    # The Ingress reaches the serving pods through the Service KubeRay keeps on the active
    # cluster's ready proxies, not through a selector of the chart's own.
    (ingress,) = by_kind(docs, "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "llm.example.com"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["spec"]["serveService"]["metadata"]["name"],
                       "port": {"name": "serve"}}  # fmt: skip
    assert service["spec"]["serveService"]["spec"]["ports"][0]["targetPort"] == 8000
    assert not by_kind(docs, "Service")


def test_ray_auth_can_name_a_secret_or_be_turned_off():
    cluster = lambda values: by_kind(render(values), "RayService")[0]["spec"]["rayClusterConfig"]  # noqa: E731
    assert cluster({"rayAuth": {"secretName": "ray-token"}})["authOptions"] == {
        "mode": "token", "secretName": "ray-token",
    }  # fmt: skip
    assert "authOptions" not in cluster({"rayAuth": {"mode": "disabled"}})


def test_worker_resources_and_names_render_for_any_values():
    """GPU counts merge into requests and limits even when those are emptied; a pod smaller than
    a replica's ranks is refused; a long release name still gives a RayService name KubeRay
    accepts (at most 47 characters)."""
    docs = render({"gpuWorkers": {"resources": {"requests": None, "limits": {"cpu": "4"}}}})
    (service,) = by_kind(docs, "RayService")
    container = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]
    assert container["resources"] == {
        "requests": {"nvidia.com/gpu": "1"},  # null drops the defaults; a map merges into them
        "limits": {"cpu": "4", "memory": "128Gi", "nvidia.com/gpu": "1"},
    }  # fmt: skip
    (default,) = by_kind(render({}), "RayService")
    resources = default["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"][
        "containers"
    ][0]["resources"]
    assert resources == {  # each map its own (a shared one once gave the limits the requests)
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "1"},
        "limits": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "1"},
    }
    tp2 = {"models": [{"model": "m", "tensor_parallel_size": 2}]}
    with pytest.raises(Exception, match="gpusPerWorker .1. is less than the largest"):
        render({**tp2, "gpuWorkers": {"gpusPerWorker": 1}})
    assert render({**tp2, "gpuWorkers": {"gpusPerWorker": 4}})
    long = Chart.load(CHART).render({}, name="a" * 46, namespace="llm")
    (service,) = [
        doc
        for path, text in long.items()
        if path.endswith("rayservice.yaml")
        for doc in yaml.safe_load_all(text)
    ]
    assert len(service["metadata"]["name"]) <= 47


def test_monitoring_ships_the_same_files():
    docs = render({})
    (rule,) = by_kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((CHART / "prometheus/alerts.yaml").read_text())
    dashboards = {k: v for cm in by_kind(docs, "ConfigMap") for k, v in cm["data"].items()}
    for path in (CHART / "dashboards").glob("*.json"):
        assert json.loads(dashboards[path.name]) == json.loads(path.read_text())
    assert all(
        cm["metadata"]["labels"]["grafana_dashboard"] == "1" for cm in by_kind(docs, "ConfigMap")
    )
    monitors = by_kind(docs, "PodMonitor")
    assert sorted(m["spec"]["selector"]["matchLabels"]["nibble.io/role"] for m in monitors) == [
        "head",
        "worker",
    ]
    assert all(m["spec"]["podMetricsEndpoints"][0]["port"] == "metrics" for m in monitors)
    off = render(
        {
            "monitoring": {
                "podMonitor": {"enabled": False},
                "prometheusRule": {"enabled": False},
                "dashboards": {"enabled": False},
            }
        }
    )
    assert (
        not by_kind(off, "PodMonitor")
        and not by_kind(off, "PrometheusRule")
        and not by_kind(off, "ConfigMap")
    )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"gpuWorkers": {"replicas": -1, "minReplicas": 0, "maxReplicas": 1}},
            "/gpuWorkers/replicas",
        ),
        ({"models": []}, "/models"),
        ({"models": [{"served_model_name": "x"}]}, "model"),
        ({"models": [{"model": "m", "tensor_parallel_size": 0}]}, "tensor_parallel_size"),
        ({"modelCache": {"type": "nfs", "mountPath": "/models"}}, "/modelCache/type"),
    ],
)
def test_broken_values_fail_the_schema_clearly(values, message):
    with pytest.raises(HelmValuesError, match=message):
        Chart.load(CHART).validate_schema(values)


NODE_MODULES = ROOT / ".venv" / "npm" / "node_modules"  # installed by .ci/setup


@pytest.mark.parametrize("name", VALUES)
def test_prometheus_operator_resources_validate(name):
    """PodMonitors and the PrometheusRule against the Prometheus operator's CRD schemas (the
    @kubernetes-models/prometheus-operator package from npm)."""
    docs = [d for d in render(VALUES[name]) if d["kind"] in ("PodMonitor", "PrometheusRule")]
    assert len(docs) == 3
    out = subprocess.run(
        ["node", str(ROOT / "tests/helm/validate_crds.js"), str(NODE_MODULES)],
        input=json.dumps(docs), capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    broken = json.loads(json.dumps(docs[0]))
    broken["spec"]["podMetricsEndpoints"] = [{"port": 8080}]  # must be the port's name
    out = subprocess.run(
        ["node", str(ROOT / "tests/helm/validate_crds.js"), str(NODE_MODULES)],
        input=json.dumps([broken]), capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and "port must be string" in out.stdout
