"""``python -m bench.run --smoke`` runs every phase of the bench, tiny, and writes its report;
``--stress``'s stress-ng is started and stopped (the bench itself is not run under it here)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

KEYS = {"meta", "plan", "ceiling", "ingress", "replicas", "egress", "e2e", "latency", "steady",
        "obvious", "tracing", "ordering", "rss", "long", "bigevents", "capture", "targets",
        "failures"}


@pytest.mark.timeout(300)
def test_bench_smoke_writes_every_figure(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install -y redis-server)")
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    results = json.loads((tmp_path / "latest.json").read_text())
    assert results.keys() >= KEYS
    assert results["failures"] == []
    assert results["ceiling"]["rps"] > 0
    for mode in ("everysec", "always"):
        ingress = results["ingress"][mode]
        assert ingress["all_stored"] and ingress["stored"] == ingress["requests"]
    # min_replicas 1 against 0, a replica attached to both: every event on the replica too.
    replicas = results["replicas"]
    for side in ("min_replicas_0", "min_replicas_1"):
        run = replicas[side]
        assert run["all_stored"] and run["on_replica"] == run["requests"]
        assert run["redis_per_event"]["repl_out_bytes"] > 0
    assert replicas["ratio"] > 0
    assert "wait" in replicas["min_replicas_1"]["redis_per_event"]["by_command"]
    # Redis's work per event and per delivery, from its own counters.
    assert results["ingress"]["everysec"]["redis_per_event"]["commands"] > 0
    # (memory held is a difference of used_memory: noisy, even negative, on a tiny run)
    assert all(e["redis_per_delivery"]["commands"] > 0
               and e["redis_per_delivery"]["memory_bytes"] is not None
               for e in results["e2e"].values())
    assert results["egress"]["posts_per_s"] > 0
    assert set(results["e2e"]) == {"1", "10", "50"}
    assert all(e["complete"] for e in results["e2e"].values())
    assert set(results["latency"]) == {"1", "10"}
    assert all(lat["p99_ms"] is not None for lat in results["latency"].values())
    # The steady stream of lone events, at fan-out 1 and 10: every delivery, its CPU cost.
    runs = results["steady"]["runs"]
    assert {r["fanout"] for r in runs} == {1, 10}
    for run in runs:
        assert run["deliveries"] == run["expected"] == run["events"] * run["fanout"]
        assert run["hub_cpu_us_per_delivery"] is not None and run["p99_ms"] is not None
        assert run["redis_calls_per_delivery"]
    assert set(results["steady"]["idle"]) == {"1", "10"}
    # The obvious design (bench/obvious/) delivered everything, at fan-out 10.
    obvious = results["obvious"]
    assert obvious["complete"] and obvious["received"] == obvious["events"] * 10
    assert obvious["deliveries_per_s"] > 0 and obvious["cpu_cores"]["worker"] >= 0
    # Tracing off, on (a local collector) and on with the collector away: every delivery made
    # in each; every span reached the collector when it was there, none when it was not.
    tracing = results["tracing"]["variants"]
    assert set(tracing) == {"off", "on", "away"}
    for variant in tracing.values():
        assert variant["delivered"] == variant["expected"] > 0
        assert variant["hub_cpu_us_per_delivery"] is not None and variant["p99_ms"] is not None
    assert tracing["on"]["spans_collected"] == tracing["on"]["spans_made"] > 0
    assert tracing["away"]["spans_collected"] == 0 and tracing["off"]["spans_made"] == 0
    assert results["tracing"]["cost"]["on"]["cpu_us_per_delivery"] is not None
    assert "stress" not in results["meta"]
    assert results["rss"].keys() >= {"ingress", "worker"}
    assert results["long"]["worker"]["q1_mean_kb"] > 0
    assert results["targets"] and all("pass" in t for t in results["targets"])
    # Ordered delivery: both groups delivered; one order in order; bytes per waiting event.
    ordering = results["ordering"]
    assert ordering["throughput"]["ordered_vs_unordered"] is not None
    assert ordering["chain"]["in_order"] and ordering["chain"]["gap_ms"]["p50"] is not None
    assert ordering["chain"]["received"] == ordering["chain"]["events"]
    assert ordering["memory"]["bytes_per_waiting_event"] is not None
    # Big stock updates at fan-out 10, posted at once and through parked attempts.
    big = results["bigevents"]
    assert set(big["variants"]) == {"direct", "parked"}
    for run in big["variants"].values():
        assert run["received"] == big["events"] * 10 and run["growth_kb"] >= 0

    markdown = (tmp_path / "benchmarks.md").read_text()
    assert "ingress, appendfsync everysec" in markdown
    assert "ingress, min_replicas 1" in markdown and "Redis per event and per delivery" in markdown
    assert "obvious design, fan-out 10" in markdown and "hub " in markdown
    assert "Steady stream of lone events" in markdown
    assert "Tracing on against off" in markdown
    assert "PASS" in markdown or "MISS" in markdown
    assert (tmp_path / "benchmarks-fanout.png").read_bytes().startswith(b"\x89PNG")
    assert "PASS" in proc.stdout or "MISS" in proc.stdout
    # The repository's own report is not touched by a run with --out.
    assert not (tmp_path / "docs").exists()


def test_stress_ng_runs_and_stops(tmp_path: Path) -> None:
    from bench.procs import descendants
    from bench.stress import Stress

    if shutil.which("stress-ng") is None:
        pytest.skip("stress-ng is not installed (apt-get install -y stress-ng): --stress needs it")
    stress = Stress(1, 5, tmp_path, timeout_s=30)
    try:
        tree = descendants(stress.pid)
        assert stress.alive()
        assert stress.describe()["command"].startswith("stress-ng --cpu 1 --cpu-load 5 ")
    finally:
        stress.stop()
    assert not stress.alive()

    def stress_ng(pid: int) -> bool:
        try:
            return b"stress-ng" in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False

    assert not [pid for pid in tree if stress_ng(pid)], "stress-ng workers outlived stop()"


def test_stress_without_stress_ng_says_how_to_install(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--stress", "--smoke", "--out",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": str(tmp_path)})
    assert proc.returncode == 2
    assert "apt-get install -y stress-ng" in proc.stderr
    assert not (tmp_path / "latest-stress.json").exists()
