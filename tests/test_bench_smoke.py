"""``python -m bench.run --smoke`` runs every phase of the bench, tiny, and writes its report."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

KEYS = {"meta", "plan", "ceiling", "ingress", "egress", "e2e", "latency", "rss", "long",
        "targets", "failures"}


@pytest.mark.timeout(120)
def test_bench_smoke_writes_every_figure(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "latest.json").read_text())
    assert results.keys() >= KEYS
    assert results["failures"] == []
    assert results["ceiling"]["rps"] > 0
    for mode in ("everysec", "always"):
        ingress = results["ingress"][mode]
        assert ingress["all_stored"] and ingress["stored"] == ingress["requests"]
    assert results["egress"]["posts_per_s"] > 0
    assert set(results["e2e"]) == {"1", "10", "50"}
    assert all(e["complete"] for e in results["e2e"].values())
    assert set(results["latency"]) == {"1", "10"}
    assert all(lat["p99_ms"] is not None for lat in results["latency"].values())
    assert results["rss"].keys() >= {"ingress", "worker"}
    assert results["long"]["worker"]["q1_mean_kb"] > 0
    assert results["targets"] and all("pass" in t for t in results["targets"])

    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "ingress, appendfsync everysec" in markdown
    assert "PASS" in markdown or "MISS" in markdown
    assert (tmp_path / "benchmarks-fanout.png").read_bytes().startswith(b"\x89PNG")
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
    # The repository's own report is not touched by a run with --out.
    assert not (tmp_path / "docs").exists()
