"""Dashboards, README and metrics.py name the same metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

from deployments.dashboards import DASHBOARDS, OUT_DIR, render
from deployments.metrics import SPECS

ROOT = Path(__file__).resolve().parents[2]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def readme_metric_names() -> set[str]:
    text = (ROOT / "README.md").read_text()
    return set(re.findall(r"^\| `(ray_nibble_\w+)` \|", text, flags=re.MULTILINE))


def dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for filename in DASHBOARDS
        for panel in json.loads((OUT_DIR / filename).read_text())["panels"]
        for target in panel.get("targets", [])
    ]


def test_committed_dashboards_are_current():
    for filename, build in DASHBOARDS.items():
        assert (OUT_DIR / filename).read_text() == render(build), (
            f"rerun python -m deployments.dashboards ({filename})"
        )


def test_readme_table_lists_every_metric():
    assert readme_metric_names() == {s.prometheus_name for s in SPECS}


def test_every_dashboard_name_is_in_the_table():
    table = readme_metric_names()
    used = {
        name.removesuffix(suffix) if name.endswith(HISTOGRAM_SUFFIXES) else name
        for expr in dashboard_exprs()
        for name in re.findall(r"\bray_nibble_\w+", expr)
        for suffix in [next((s for s in HISTOGRAM_SUFFIXES if name.endswith(s)), "")]
    }
    assert used and used <= table, used - table
