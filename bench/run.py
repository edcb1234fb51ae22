"""``python -m bench.run`` (``make bench``): throughput, latency and memory of the hub, in one run.

Each figure is set against a ceiling measured in the same run on the same machine, because
other work on a shared 2-core box makes absolute numbers noisy:

1. ceiling: a bare aiohttp handler (read body, answer 202) under the load generator;
2. ingress: signed, valid, distinct events at saturation, workers stopped; every one must be
   stored and queued in Redis (checked after), for ``appendfsync everysec`` and ``always``;
3. egress ceiling: a raw aiohttp client (no Redis, no Celery) posting to the same sinks;
4. end to end at fan-out 1, 10 and 50: first POST to the ingress to last delivery received;
5. latency ingress-202 -> sink-received, open-loop at half the end-to-end rate found in 4;
6. RSS of the ingress and the worker (every process of each tree), sampled throughout, and a
   long run (``--long N`` deliveries) comparing the first and last quarter of it.

Everything runs as separate processes on 127.0.0.1 with a private redis-server; nothing here
touches the shared Redis on 6379. ``--smoke`` does all of it with tiny counts in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.hub import Ingress, Sinks, Worker, hub_keys, write_config
from bench.procs import (
    ROOT,
    Proc,
    RedisServer,
    RssSampler,
    free_port,
    python_cmd,
    run_loadgen,
    wait_http,
)
from bench.stress import INSTALL as STRESS_INSTALL
from bench.stress import Stress
from relay.queue import read_deliver_message

FANOUTS = (1, 10, 50)
LATENCY_FANOUTS = (1, 10)


class Plan:
    """How much of everything: the full run, or ``--smoke``."""

    def __init__(self, smoke: bool) -> None:
        self.smoke = smoke
        self.ceiling_requests = 400 if smoke else 60_000
        self.ingress_requests = 300 if smoke else 30_000
        self.egress_posts = 300 if smoke else 30_000
        self.events = {1: 200, 10: 30, 50: 6} if smoke else {1: 10_000, 10: 2_000, 50: 400}
        self.latency_seconds = 1.5 if smoke else 10.0
        self.long_deliveries = 1_000 if smoke else 200_000
        self.warmup = 4 if smoke else 20
        self.deadline = 60.0 if smoke else 300.0
        #: Alternating rounds of the ceiling and the ingress (each figure: the median round).
        self.rounds = 1 if smoke else 3

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def median_round(rounds: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The round with the median ``key``, with every round's ``key`` under ``rounds``."""
    ranked = sorted(rounds, key=lambda r: float(r[key]))
    return {**ranked[(len(ranked) - 1) // 2], "rounds": [r[key] for r in rounds]}


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan, log_dir: Path) -> None:
        self.args = args
        self.plan = plan
        self.log_dir = log_dir
        self.results: dict[str, Any] = {}
        self.sampler = RssSampler(interval=0.25)
        self.redis: RedisServer | None = None
        self.sinks: Sinks | None = None
        self.ingress: Ingress | None = None
        self.worker_settings = {"pool": args.pool, "concurrency": args.concurrency,
                                "max_in_flight": args.max_in_flight,
                                "max_connections": args.max_connections}
        self.ingress_settings = {} if args.linger is None else {"linger": args.linger}
        self.failures: list[str] = []
        self.bare: Proc | None = None
        self.bare_url = ""
        self.keys: Any = None  # relay.keys.Keys of the hub's config, once it is written
        self.stress: Stress | None = None

    # -- helpers ----------------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def loadgen(self, name: str, urls: list[str], prefix: str, count: int, *,
                engine: str | None = None, mode: str = "closed",
                concurrency: int | None = None,
                rate: float | None = None, record: bool = False, processes: int = 1,
                deadline: float | None = None, on_start: Any = None) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "engine": engine or self.args.engine, "mode": mode, "urls": urls,
            "prefix": prefix, "count": count,
            "secret": "bench-ingress-secret", "record": record,
            "concurrency": concurrency or self.args.connections,
            "deadline": deadline or self.plan.deadline,
        }
        if rate:
            spec["rate"] = rate
        return run_loadgen(spec, processes, self.log_dir, name, on_start=on_start)

    def measured(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        """``loadgen`` with a CPU snapshot of every watched process taken as it starts."""
        marks: list[Any] = []
        r = self.loadgen(*args, on_start=lambda: marks.append(self.sampler.cpu()), **kwargs)
        return r, marks[0]

    def cpu_used(self, mark: Any, r: dict[str, Any] | None = None) -> dict[str, float]:
        """Cores used per process tree since ``mark`` (the load generator's own, too)."""
        cores = {k: v for k, v in self.sampler.cores(mark, self.sampler.cpu()).items()
                 if not k.startswith("worker-")}
        if r is not None and r["t_end"] > r["t_start"]:
            cores["loadgen"] = round(r["cpu_s"] / (r["t_end"] - r["t_start"]), 2)
        return cores

    def flush(self) -> None:
        assert self.redis is not None
        with contextlib.closing(self.redis.client()) as c:
            c.flushall()

    def config(self, name: str, fanout: int) -> Path:
        assert self.redis is not None and self.sinks is not None and self.ingress is not None
        return write_config(self.log_dir / f"{name}.yaml", self.redis.url, self.ingress.port,
                            [self.sinks.url(i) for i in range(fanout)], self.worker_settings,
                            self.ingress_settings)

    # -- phases -----------------------------------------------------------------------------

    def start_bare(self) -> None:
        """The ceiling's server, warmed up; kept running to alternate with the ingress."""
        port = free_port()
        self.bare = Proc("bare", python_cmd("-m", "bench.bare", "--port", str(port)),
                         self.log_dir)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        self.sampler.watch("bare", self.bare.pid)
        self.bare_url = f"http://127.0.0.1:{port}/webhooks/ingram"
        self.loadgen("ceiling-warm", [self.bare_url], "warm-ceil-",
                     min(2000, self.plan.warmup * 50))

    def stop_bare(self) -> None:
        if self.bare is not None:
            self.sampler.unwatch("bare")
            self.bare.stop()
            self.bare = None

    def ceiling_round(self, n: int) -> dict[str, Any]:
        r, mark = self.measured("ceiling", [self.bare_url], f"ceil-{n}-",
                                self.plan.ceiling_requests)
        cpu = self.cpu_used(mark, r)
        ok = r["statuses"].get("202", 0)
        out = {
            "requests": r["sent"], "accepted": ok, "errors": r["errors"],
            "seconds": round(r["t_end"] - r["t_start"], 3),
            "rps": round(rate(ok, r["t_end"] - r["t_start"]), 1),
            "latency_ms": r["latency_ms"], "connections": self.args.connections,
            "cpu_cores": cpu,
        }
        self.say(f"ceiling, round {n + 1}: {out['rps']:.0f} req/s")
        return out

    def ingress_saturation(self, fsync: str, round_no: int) -> dict[str, Any]:
        assert self.redis is not None and self.ingress is not None
        self.redis.set_fsync(fsync)
        self.flush()
        url = self.ingress.url
        self.loadgen("ingress-warm", [url], f"warm-ing-{fsync}-{round_no}-",
                     min(2000, self.plan.warmup * 50))
        self.flush()
        n = self.plan.ingress_requests
        r, mark = self.measured(f"ingress-{fsync}", [url], f"ing-{fsync}-{round_no}-", n)
        cpu = self.cpu_used(mark, r)
        accepted = r["statuses"].get("202", 0)
        keys = self.keys
        with contextlib.closing(self.redis.client()) as c:
            stored = sum(1 for _ in c.scan_iter(match=keys.event("*"), count=5000))
            seen = sum(1 for _ in c.scan_iter(match=keys.seen("*"), count=5000))
            # One fan-out message per group-committed batch: count the events they name.
            queued, messages = 0, 0
            for raw in c.lrange(keys.queue, 0, -1):
                ids = read_deliver_message(raw).event_id
                queued += 1 if isinstance(ids, str) else len(ids)
                messages += 1
        complete = accepted == n and stored == n and seen == n and queued == n
        if not complete:
            self.failures.append(f"ingress ({fsync}): {accepted} accepted, {stored} stored, "
                                 f"{queued} queued of {n} sent; statuses {r['statuses']}")
        self.flush()
        out = {
            "appendfsync": fsync, "requests": n, "accepted": accepted, "stored": stored,
            "queued": queued, "queue_messages": messages, "all_stored": complete,
            "statuses": r["statuses"],
            "errors": r["errors"], "seconds": round(r["t_end"] - r["t_start"], 3),
            "events_per_s": round(rate(accepted, r["t_end"] - r["t_start"]), 1),
            "latency_ms": r["latency_ms"], "cpu_cores": cpu,
        }
        self.say(f"ingress ({fsync}), round {round_no + 1}: {out['events_per_s']:.0f} "
                 f"events/s, {stored}/{n} stored")
        return out

    def ceiling_and_ingress(self, ingress: bool) -> None:
        """The ceiling and the ingress (appendfsync everysec) in alternating rounds, each
        figure the median of its rounds: on a shared machine a burst of someone else's work
        then lands on one round of one of them, not on the whole of one side of the ratio."""
        assert self.redis is not None
        ceilings: list[dict[str, Any]] = []
        ingresses: list[dict[str, Any]] = []
        first = "everysec" if self.args.fsync == "both" else self.args.fsync
        for n in range(self.plan.rounds):
            if self.bare is not None:
                ceilings.append(self.ceiling_round(n))
            if ingress:
                ingresses.append(self.ingress_saturation(first, n))
        if ceilings:
            self.results["ceiling"] = median_round(ceilings, "rps")
        if ingress:
            self.results["ingress"] = {first: median_round(ingresses, "events_per_s")}
            if self.args.fsync == "both":
                self.results["ingress"]["always"] = self.ingress_saturation("always", 0)
            self.redis.set_fsync(first)
            if self.args.profile:
                self.profile_ingress()

    def egress_ceiling(self) -> None:
        assert self.sinks is not None
        urls = [self.sinks.url(i) for i in range(10)]
        procs = self.args.concurrency
        self.loadgen("egress-warm", urls, "warm-egress-", min(1000, self.plan.warmup * 50),
                     engine="aiohttp", processes=procs, concurrency=self.args.egress_in_flight)
        self.sinks.reset()
        n = self.plan.egress_posts
        r, mark = self.measured("egress", urls, "egress-", n, engine="aiohttp",
                                processes=procs, concurrency=self.args.egress_in_flight)
        stats = self.sinks.wait_count(n, 10)
        cpu = self.cpu_used(mark, r)
        ok = r["statuses"].get("200", 0)
        self.results["egress"] = {
            "posts": n, "ok": ok, "received": stats["distinct"], "errors": r["errors"],
            "client_processes": procs, "in_flight": self.args.egress_in_flight,
            "seconds": round(r["t_end"] - r["t_start"], 3),
            "posts_per_s": round(rate(ok, r["t_end"] - r["t_start"]), 1),
            "cpu_cores": cpu,
        }
        self.sinks.reset()
        self.say(f"egress ceiling: {self.results['egress']['posts_per_s']:.0f} posts/s")

    def start_worker(self, name: str, fanout: int) -> Worker:
        assert self.ingress is not None and self.sinks is not None
        worker = Worker(name, self.config(name, fanout), self.log_dir)
        self.sampler.watch(name, worker.pid)
        self.sampler.watch("worker", worker.pid)
        try:
            worker.warm_up(self.ingress, self.sinks, fanout, f"warm-{name}-", self.plan.warmup)
        except BaseException:  # a failed warm-up, Ctrl-C: the caller never gets it to stop
            with contextlib.suppress(Exception):
                self.stop_worker(name, worker)
            raise
        return worker

    def stop_worker(self, name: str, worker: Worker) -> None:
        self.sampler.sample()
        self.sampler.unwatch(name)
        self.sampler.unwatch("worker")
        worker.stop()
        self.flush()

    def end_to_end(self, fanout: int, worker: Worker) -> dict[str, Any]:
        assert self.ingress is not None and self.sinks is not None
        n = self.plan.events[fanout]
        expected = n * fanout
        self.sinks.reset()
        r, mark = self.measured(f"e2e-fo{fanout}", [self.ingress.url], f"e2e-fo{fanout}-", n)
        stats = self.sinks.wait_count(expected, max(60.0, expected / 100))
        cpu = self.cpu_used(mark, r)
        accepted = r["statuses"].get("202", 0)
        seconds = stats["last"] - r["t_start"]
        complete = stats["distinct"] >= expected and accepted == n
        if not complete:
            self.failures.append(f"fan-out {fanout}: {stats['distinct']} of {expected} "
                                 f"deliveries received, {accepted} of {n} events accepted")
        out = {
            "fanout": fanout, "events": n, "accepted": accepted, "expected": expected,
            "received": stats["distinct"], "duplicates": stats["count"] - stats["distinct"],
            "complete": complete, "seconds": round(seconds, 3),
            "deliveries_per_s": round(rate(stats["distinct"], seconds), 1),
            "events_per_s": round(rate(n, seconds), 1),
            "ingest_seconds": round(r["t_end"] - r["t_start"], 3),
            "cpu_cores": cpu,
        }
        self.say(f"fan-out {fanout}: {out['deliveries_per_s']:.0f} deliveries/s "
                 f"({stats['distinct']}/{expected} in {seconds:.2f}s, "
                 f"{out['duplicates']} duplicates)")
        return out

    def latency(self, fanout: int, deliveries_per_s: float) -> dict[str, Any]:
        assert self.ingress is not None and self.sinks is not None
        events_per_s = max(1.0, 0.5 * deliveries_per_s / fanout)
        n = max(20, int(events_per_s * self.plan.latency_seconds))
        self.sinks.reset()
        self.sinks.record(True)
        try:
            r = self.loadgen(f"latency-fo{fanout}", [self.ingress.url], f"lat-fo{fanout}-", n,
                             mode="open", rate=events_per_s, record=True,
                             concurrency=256,
                             deadline=self.plan.latency_seconds * 3 + n / events_per_s + 10)
            self.sinks.wait_count(n * fanout, 30)
            receipts = self.sinks.receipts()
        finally:
            self.sinks.record(False)
            self.sinks.reset()
        accepted_at = {eid: t for eid, t, status in r["records"] if status == 202}
        pairs = sorted((accepted_at[eid], (t - accepted_at[eid]) * 1000)
                       for eid, _path, t in receipts if eid in accepted_at)
        lat = sorted(ms for _, ms in pairs)
        # Median latency of the first and last quarter of the sends: a rise means the offered
        # load was above what the hub managed at that moment (a backlog grew), not jitter.
        quarter = max(1, len(pairs) // 4)
        trend = [percentile(sorted(ms for _, ms in pairs[:quarter]), 0.5),
                 percentile(sorted(ms for _, ms in pairs[-quarter:]), 0.5)]
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        out = {
            "fanout": fanout, "events_per_s": round(events_per_s, 1),
            "deliveries_per_s": round(events_per_s * fanout, 1), "events": n,
            "accepted": len(accepted_at), "deliveries": len(lat),
            "expected": n * fanout,
            "p50_ms": round(p50, 2) if p50 is not None else None,
            "p90_ms": round(percentile(lat, 0.9) or 0, 2) if lat else None,
            "p99_ms": round(p99, 2) if p99 is not None else None,
            "max_ms": round(lat[-1], 2) if lat else None,
            "p50_first_last_quarter_ms": [round(x, 2) if x is not None else None
                                          for x in trend],
            "ingress_202_p50_ms": r["latency_ms"]["p50"],
            "ingress_202_p99_ms": r["latency_ms"]["p99"],
        }
        if len(lat) < n * fanout:
            self.failures.append(f"latency fan-out {fanout}: {len(lat)} of {n * fanout} "
                                 f"deliveries matched")
        self.say(f"latency fan-out {fanout} at {events_per_s:.0f} events/s: "
                 f"p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms")
        return out

    def fanout_phase(self) -> None:
        self.results["e2e"] = {}
        self.results["latency"] = {}
        for fanout in FANOUTS:
            name = f"worker-fo{fanout}"
            worker = self.start_worker(name, fanout)
            try:
                e2e = self.end_to_end(fanout, worker)
                self.results["e2e"][str(fanout)] = e2e
                if fanout in LATENCY_FANOUTS and e2e["deliveries_per_s"] > 0:
                    self.results["latency"][str(fanout)] = self.latency(
                        fanout, e2e["deliveries_per_s"])
                if self.args.profile and fanout in (1, 10):
                    self.profile_worker(worker, fanout)
            finally:
                self.stop_worker(name, worker)

    def long_run(self) -> None:
        assert self.ingress is not None and self.sinks is not None
        deliveries = self.args.long if self.args.long is not None else self.plan.long_deliveries
        if deliveries <= 0:
            self.results["long"] = None
            return
        fanout = 10
        events = max(1, deliveries // fanout)
        measured = self.results.get("e2e", {}).get(str(fanout), {}).get("events_per_s")
        if self.args.long_rate:
            events_per_s = self.args.long_rate
        elif self.plan.smoke:
            events_per_s = 50.0  # a couple of seconds, so each quarter holds RSS samples
        else:
            events_per_s = 0.7 * measured if measured else 100.0
        name = "worker-long"
        worker = self.start_worker(name, fanout)
        try:
            self.sinks.reset()
            seconds = events / events_per_s
            self.say(f"long run: {events * fanout} deliveries at {events_per_s:.0f} events/s "
                     f"(fan-out {fanout}, about {seconds:.0f}s)")
            r = self.loadgen("long", [self.ingress.url], "long-", events,
                             mode="open", rate=events_per_s, concurrency=256,
                             deadline=seconds * 2 + 60)
            # A backlog left when sending ends (offered load above capacity) drains here.
            stats = self.sinks.wait_count(events * fanout, max(120.0, events * fanout / 1000))
            t0, t1 = r["t_start"], max(stats["last"], r["t_end"])
            quarter = (t1 - t0) / 4
            out: dict[str, Any] = {
                "fanout": fanout, "events": events, "deliveries": events * fanout,
                "accepted": r["statuses"].get("202", 0), "statuses": r["statuses"],
                "errors": r["errors"], "received": stats["distinct"],
                "duplicates": stats["count"] - stats["distinct"],
                "events_per_s": round(events_per_s, 1), "seconds": round(t1 - t0, 1),
                "send_seconds": round(r["t_end"] - r["t_start"], 1),
                "deliveries_per_s": round(rate(stats["distinct"], t1 - t0), 1),
            }
            for role in (name, "ingress"):
                q1 = self.sampler.window(role, t0, t0 + quarter)
                q4 = self.sampler.window(role, t1 - quarter, t1)
                if q1 and q4:
                    first, last = sum(q1) / len(q1), sum(q4) / len(q4)
                    out[role.replace("worker-long", "worker")] = {
                        "q1_mean_kb": round(first), "q4_mean_kb": round(last),
                        "change": round(last / first - 1, 4), "samples": len(q1) + len(q4),
                        "series_kb": [v for _, v in self.sampler.series[role]
                                      if t0 <= _ <= t1][:: max(1, len(q1) // 10)],
                        "per_process_first_last_kb": sorted(
                            self.sampler.by_pid.get(role, {}).values()),
                    }
            if stats["distinct"] < events * fanout:
                self.failures.append(f"long run: {stats['distinct']} of {events * fanout} "
                                     f"deliveries received ({out['duplicates']} duplicates, "
                                     f"{out['accepted']} of {events} events accepted)")
            self.results["long"] = out
            w = out.get("worker", {})
            self.say(f"long run: worker RSS {w.get('q1_mean_kb', 0) / 1024:.1f} MB -> "
                     f"{w.get('q4_mean_kb', 0) / 1024:.1f} MB ({w.get('change', 0):+.1%})")
        finally:
            self.stop_worker(name, worker)

    # -- profiles ---------------------------------------------------------------------------

    def profile_ingress(self) -> None:
        from bench.profile import Recording, flame_svg, summarise

        assert self.ingress is not None
        seconds = 3 if self.plan.smoke else 15
        n = self.plan.ingress_requests * 3
        out_dir = Path(self.args.profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / "ingress.raw.txt"
        rec: list[Recording] = []

        def start() -> None:
            rec.append(Recording(self.ingress.proc.pid, raw, seconds))  # type: ignore[union-attr]

        self.loadgen("ingress-profile", [self.ingress.url], "prof-ing-", n,
                     deadline=seconds + 2, on_start=start)
        rec[0].wait()
        self.flush()
        self.results.setdefault("profile", {})["ingress"] = summarise(
            raw, INGRESS_FOCUS, stages=INGRESS_STAGES, default_stage=INGRESS_DEFAULT_STAGE)
        flame_svg(raw, out_dir / "ingress.svg", "ingress at saturation")
        self.say(f"ingress profile: {out_dir / 'ingress.svg'}")

    def profile_worker(self, worker: Worker, fanout: int) -> None:
        """py-spy on every process of the worker while it delivers at ``fanout``, saturated."""
        from bench.profile import Recording, flame_svg, summarise

        assert self.ingress is not None and self.sinks is not None
        seconds = 3 if self.plan.smoke else 15
        out_dir = Path(self.args.profile)
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = out_dir / f"worker-fo{fanout}.raw.txt"
        per_s = self.results["e2e"][str(fanout)]["events_per_s"] or 100
        n = int(per_s * seconds * 1.3)
        self.sinks.reset()
        rec: list[Recording] = []

        def start() -> None:
            rec.append(Recording(worker.pid, raw, seconds, subprocesses=True))

        self.loadgen(f"worker-profile-fo{fanout}", [self.ingress.url], f"prof-fo{fanout}-", n,
                     on_start=start)
        rec[0].wait()
        self.sinks.wait_count(n * fanout, 120)
        self.sinks.reset()
        self.results.setdefault("profile", {})[f"worker-fo{fanout}"] = summarise(
            raw, WORKER_FOCUS, stages=WORKER_STAGES, default_stage=WORKER_DEFAULT_STAGE)
        svg = out_dir / f"worker-fo{fanout}.svg"
        flame_svg(raw, svg, f"worker (all processes) at fan-out {fanout}")
        self.say(f"worker profile: {svg}")

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        phases = set(self.args.phases.split(","))
        self.results["meta"] = machine_facts()
        self.results["plan"] = self.plan.as_dict()
        if self.args.stress:
            # First, before anything is measured (the ceilings too), and before the sampler's
            # thread starts (stress-ng is started with a preexec_fn).
            self.stress = Stress(self.args.stress_cpus, self.args.stress_load, self.log_dir)
            self.results["meta"]["stress"] = self.stress.describe()
            self.sampler.watch("stress", self.stress.pid)
            self.say(f"competing load for the whole run: {self.stress.describe()['command']}")
        self.sampler.start()
        try:
            if self.stress is not None:
                time.sleep(1.0)  # its workers running before the first measure
            if "ceiling" in phases:
                self.start_bare()
            fsync = "everysec" if self.args.fsync == "both" else self.args.fsync
            self.redis = RedisServer(fsync, self.log_dir)
            self.results["meta"]["redis"] = {
                "version": self.redis.version, "appendonly": "yes",
                "appendfsync": self.args.fsync if self.args.fsync != "both"
                else "everysec (ingress also measured with always)"}
            self.sinks = Sinks(self.args.sinks, self.log_dir)
            for i, proc in enumerate(self.sinks.procs):
                self.sampler.watch(f"sink{i}", proc.pid)
            self.sampler.watch("redis", self.redis.proc.pid)
            port = free_port()
            cfg = write_config(self.log_dir / "ingress.yaml", self.redis.url, port,
                               [self.sinks.url(0)], self.worker_settings, self.ingress_settings)
            self.ingress = Ingress(cfg, port, self.log_dir)
            self.keys = hub_keys(cfg)
            self.sampler.watch("ingress", self.ingress.proc.pid)
            if "ceiling" in phases or "ingress" in phases:
                self.ceiling_and_ingress("ingress" in phases)
            self.stop_bare()
            if "egress" in phases:
                self.egress_ceiling()
            if "e2e" in phases:
                self.fanout_phase()
            if "long" in phases:
                self.long_run()
        finally:
            stressed_throughout = self.stress is None or self.stress.alive()
            self.sampler.sample()
            self.sampler.stop()
            self.results["rss"] = {
                role: {"peak_kb": self.sampler.peak_sum.get(role, 0),
                       "max_process_hwm_kb": self.sampler.peak_hwm.get(role, 0)}
                for role in sorted(self.sampler.peak_sum)}
            self.stop_bare()
            for thing in (self.ingress, self.sinks, self.redis, self.stress):
                if thing is not None:
                    with contextlib.suppress(Exception):
                        thing.stop()
            if self.stress is not None:
                self.results["meta"]["stress"]["ran_throughout"] = stressed_throughout
                if not stressed_throughout:
                    self.failures.append(f"stress-ng ended before the run did (exit status "
                                         f"{self.stress.proc.returncode}, log "
                                         f"{self.log_dir / 'stress-ng.log'}): the figures "
                                         f"were not all taken under the competing load")
        self.results["failures"] = self.failures
        self.results["targets"] = report.targets(self.results)
        return self.results


INGRESS_FOCUS = [
    "WebhookHandler._handle", "parse_envelope", "IngramSigner.verify", "EventStore.accept",
    "_flush_all", "pack_command", "task_message", "uuid", "Timeout.", "RequestHandler.start",
    "RequestHandler.data_received", "_answer", "_SelectorSocketTransport.write", "observe",
    "Logger.",
]
#: What each busy sample of a process was doing: the first stage with a marker in the frames
#: below the dispatching loop (so the order matters: specific stages first).
INGRESS_STAGES = [
    ("validate the envelope (msgspec)", ["parse_envelope", "Envelope.event_types"]),
    ("verify the signature (HMAC-SHA512)", ["IngramSigner.verify"]),
    ("build the record and Celery message (uuid, JSON, msgpack)",
     ["task_message", "deliver_message", "uuid.py"]),
    ("asyncio.timeout around the body read", ["asyncio/timeouts.py"]),
    ("Redis: pack and send the group commit, read replies", ["_flush_all", "redis/"]),
    ("metrics and logging", ["prometheus_client", "logging/"]),
    ("handler, rest", ["WebhookHandler", "EventStore", "_answer", "relay/batching.py",
                       "relay/keys.py", "relay/models.py", "relay/signatures.py"]),
    ("aiohttp HTTP server (parse, route, respond)", ["aiohttp/", "yarl/", "multidict/"]),
]
INGRESS_DEFAULT_STAGE = "asyncio event loop and socket I/O"
WORKER_STAGES = [
    ("kombu: unacked bookkeeping per message (QoS.append)", ["QoS.append"]),
    ("kombu: ack per message (QoS.ack)", ["QoS.ack"]),
    ("kombu: one BRPOP per message", ["_brpop", "_register_BRPOP"]),
    ("hop between Celery's task thread and the delivery loop",
     ["Engine._call", "_write_to_self", "Condition.notify", "run_coroutine_threadsafe"]),
    ("HTTP post to the subscriber (aiohttp client, signing)",
     ["attempt (workers/http.py)", "aiohttp/"]),
    ("Redis from the delivery loop (load, lease, outcomes)",
     ["redis/asyncio/", "_flush_all", "workers/ledger.py"]),
    ("delivery engine, rest", ["workers/engine.py", "workers/routing.py", "relay/queue.py",
                               "relay/batching.py", "relay/models.py", "relay/signatures.py"]),
    ("Celery task trace in the pool process", ["celery/app/trace.py"]),
    ("billiard: task to the pool process and back", ["billiard/", "asynpool.py"]),
    ("Celery consumer, rest (kombu/celery main loop)", ["kombu/", "celery/", "redis/"]),
]
WORKER_DEFAULT_STAGE = "asyncio event loop and socket I/O"
WORKER_FOCUS = [
    "Engine._start", "Engine._deliver", "attempt (workers/http.py)", "signed_headers",
    "_flush_all", "_send_packed_command", "Ledger.", "deliver_message", "Router.route",
    "trace_task", "Engine._call", "QoS.append", "QoS.ack", "_brpop", "billiard",
    "_SelectorSocketTransport.write", "Logger.",
]


def machine_facts() -> dict[str, Any]:
    def version(pkg: str) -> str:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as v

        try:
            return v(pkg)
        except PackageNotFoundError:
            return "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=5).stdout.strip() or "?"
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "relay", "workers"],
                               cwd=ROOT, capture_output=True, text=True, timeout=5).stdout
        if dirty.strip():
            commit += " (relay/ or workers/ modified in the work tree)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
        "platform": platform.platform(), "aiohttp": version("aiohttp"),
        "celery": version("celery"), "redis_py": version("redis"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "commit": commit,
        "load_generator": "bench.loadgen (raw asyncio HTTP/1.1 keep-alive; aiohttp for paced "
                          "and egress)",
        "wrk": shutil.which("wrk") is not None,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny counts: a few seconds per phase")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write latest.json, benchmarks.md and the chart into DIR instead of "
                        "bench/results/ and docs/ (--smoke: default var/bench-smoke)")
    p.add_argument("--long", type=int, default=None, metavar="N",
                   help="deliveries in the long (memory) run at fan-out 10; 0 skips it "
                        "(default 200000, smoke 1000)")
    p.add_argument("--long-rate", type=float, default=None, metavar="EV/S",
                   help="events/s for the long run (default 0.7 x fan-out 10 e2e rate)")
    p.add_argument("--fsync", choices=["everysec", "always", "both"], default="both",
                   help="Redis appendfsync: both = everysec throughout, ingress measured with "
                        "always too (default)")
    p.add_argument("--connections", type=int, default=64,
                   help="load generator connections for the ceiling and the ingress")
    p.add_argument("--engine", choices=["raw", "aiohttp"], default="raw",
                   help="load generator for everything sent to the ingress: raw asyncio "
                        "HTTP/1.1 (default) or aiohttp.ClientSession (slower: on 2 cores it "
                        "may measure itself rather than the server)")
    p.add_argument("--egress-in-flight", type=int, default=128,
                   help="in-flight posts of the raw egress client (split over its processes)")
    p.add_argument("--concurrency", type=int, default=2, help="worker.concurrency")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                   help="worker.pool")
    p.add_argument("--max-in-flight", type=int, default=1000, help="worker.max_in_flight")
    p.add_argument("--linger", default=None, metavar="DURATION",
                   help="ingress.linger, e.g. 0s or 10ms (default: the config's default)")
    p.add_argument("--max-connections", type=int, default=128, help="worker.max_connections")
    p.add_argument("--sinks", type=int, default=1, help="sink processes")
    p.add_argument("--phases", default="ceiling,ingress,egress,e2e,long",
                   help="comma-separated subset of ceiling,ingress,egress,e2e,long")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile the ingress at saturation and the worker at fan-out 10 "
                        "with py-spy; flame graphs and raw stacks go to DIR")
    p.add_argument("--stress", action="store_true",
                   help="run everything (ceilings included) under stress-ng --cpu N "
                        "--cpu-load P: a slower, busier machine; needs stress-ng "
                        "(apt-get install -y stress-ng); writes latest-stress.json and its own "
                        "section of docs/benchmarks.md")
    p.add_argument("--stress-cpus", type=int, default=2, metavar="N",
                   help="stress-ng CPU workers (default 2)")
    p.add_argument("--stress-load", type=int, default=60, metavar="PERCENT",
                   help="load of each stress-ng CPU worker, 1-100 (default 60)")
    p.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    args = p.parse_args(argv)
    if args.stress and not 1 <= args.stress_load <= 100:
        p.error("--stress-load must be 1-100")
    if args.stress and args.stress_cpus < 1:
        p.error("--stress-cpus must be at least 1")
    return args


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stress and shutil.which("stress-ng") is None:
        print(f"error: --stress needs stress-ng, which is not installed: {STRESS_INSTALL}",
              file=sys.stderr)
        return 2
    plan = Plan(args.smoke)
    # A run under --stress keeps its own results beside the unstressed ones.
    suffix = "-stress" if args.stress else ""
    if args.out or args.smoke:
        out = Path(args.out) if args.out else ROOT / "var" / "bench-smoke"
        paths = {"json": out / f"latest{suffix}.json", "md": out / "benchmarks.md",
                 "png": out / f"benchmarks-fanout{suffix}.png"}
    else:
        paths = {"json": ROOT / "bench" / "results" / f"latest{suffix}.json",
                 "md": ROOT / "docs" / "benchmarks.md",
                 "png": ROOT / "docs" / f"benchmarks-fanout{suffix}.png"}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    bench = Bench(args, plan, log_dir)
    # SIGTERM unwinds like Ctrl-C, so every process the bench started (stress-ng too) stops.
    signal.signal(signal.SIGTERM, _terminated)
    started = time.monotonic()
    try:
        results = bench.run()
    except BaseException:
        print(f"bench failed; process logs in {log_dir}", file=sys.stderr)
        raise
    results["meta"]["bench_seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["command"] = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv)
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    if not (args.out or args.smoke):  # keep every full run next to latest.json
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        (paths["json"].parent / f"run-{stamp}{suffix}.json").write_text(
            paths["json"].read_text())
    chart = report.chart(results, paths["png"])
    report.write_markdown(results, paths["md"], chart)
    print(report.table_text(results))
    print(f"\nwrote {paths['json']}, {paths['md']}" + (f", {chart}" if chart else ""))
    if bench.failures:
        print("\nFAILED checks:\n  " + "\n  ".join(bench.failures), file=sys.stderr)
        print(f"process logs in {log_dir}", file=sys.stderr)
        return 1
    if not args.keep_logs:
        shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
