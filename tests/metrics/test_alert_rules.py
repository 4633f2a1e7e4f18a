"""The alert rules are valid and fire when they should (promtool, from Debian's prometheus)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_promtool_checks_the_rules():
    out = subprocess.run(
        ["promtool", "check", "rules", "helm/nibble/prometheus/alerts.yaml"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 rules found" in out.stdout


def test_promtool_unit_tests_pass():
    out = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yaml"],
        cwd=ROOT / "tests" / "metrics", capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
