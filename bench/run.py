"""``python -m bench.run`` (``make bench``): throughput, latency and memory of the hub, in one run.

Each figure is set against a ceiling measured in the same run on the same machine, because
other work on a shared 2-core box makes absolute numbers noisy:

1. ceiling: a bare aiohttp handler (read body, answer 202) under the load generator;
2. ingress: signed, valid, distinct events at saturation, workers stopped; every one must be
   stored and queued in Redis (checked after), for ``appendfsync everysec`` and ``always``;
   then (``replicas``) with a replica attached, ``redis.min_replicas`` 0 against 1;
3. egress ceiling: a raw aiohttp client (no Redis, no Celery) posting to the same sinks;
4. end to end at fan-out 1, 10 and 50: first POST to the ingress to last delivery received;
5. latency ingress-202 -> sink-received, open-loop at half the end-to-end rate found in 4;
6. RSS of the ingress and the worker (every process of each tree), sampled throughout, and a
   long run (``--long N`` deliveries) comparing the first and last quarter of it;
7. ``bigevents``: Ingram's largest events (4,000-SKU stock updates, ~1.7 MB) at fan-out 10:
   how much the worker's RSS grows per event held, delivered at once and through parked
   attempts (a worker must hold one copy of an event, not one per subscriber);
8. (``capture``) what keeping each attempt's request and response costs per delivery, CPU
   and Redis bytes, against the record without them (bench/capture.py);
9. (``ordering``) ordered delivery: ordered against unordered subscribers over distinct
   orders, one order of 200 posted one after another, Redis bytes per waiting event
   (bench/ordering.py).

Everything runs as separate processes on 127.0.0.1 with a private redis-server; nothing here
touches the shared Redis on 6379. ``--smoke`` does all of it with tiny counts in seconds.
Around the ingress and end-to-end runs, Redis's own counters (INFO commandstats and stats) give
the commands, command time and bytes per event and per delivery.
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
from bench.obvious.procs import ObviousDesign
from bench.ordering import Ordering
from bench.procs import (
    ROOT,
    Proc,
    RedisServer,
    RssSampler,
    free_port,
    http_get,
    python_cmd,
    run_loadgen,
    wait_http,
)
from bench.stress import INSTALL as STRESS_INSTALL
from bench.stress import Stress
from relay import loops
from relay.queue import read_deliver_message

FANOUTS = (1, 10, 50)
LATENCY_FANOUTS = (1, 10)
STEADY_FANOUTS = (1, 10)
PHASES = ("ceiling", "ingress", "replicas", "egress", "e2e", "steady", "obvious", "tracing",
          "ordering", "long", "bigevents", "capture")
#: The tracing phase's variants, run in this order in each of its rounds.
TRACING_VARIANTS = ("off", "on", "away")
#: The obvious design is compared with the hub at this fan-out.
OBVIOUS_FANOUT = 10


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
        #: Steady stream of lone events: offered events/s, seconds of each, and the idle
        #: window (no events) measured first, the floor every event/s shares.
        self.steady_rates: tuple[float, ...] = (50.0,) if smoke else (50.0, 200.0)
        self.steady_seconds = 0.6 if smoke else 10.0
        self.steady_idle_seconds = 0.3 if smoke else 5.0
        #: The obvious design (bench/obvious/): events at fan-out 10, warm-up events.
        self.obvious_events = 5 if smoke else 400
        self.obvious_warmup = 2 if smoke else 10
        #: Big events (4,000-SKU stock updates) posted at once, and their SKUs.
        self.big_events = 2 if smoke else 20
        self.big_skus = 400 if smoke else 4000
        #: How long the sinks take per big event in the parked variant (pulled attempts are
        #: held that long, so what they hold shows in the RSS).
        self.big_delay = 0.1 if smoke else 1.0
        #: Tracing off, on and on with the collector away: a steady trickle of lone events
        #: at this fan-out and rate for this long, in rounds that alternate the variants.
        self.tracing_fanout = 2 if smoke else 10
        self.tracing_rate = 20.0 if smoke else 50.0
        self.tracing_seconds = 0.6 if smoke else 8.0
        self.tracing_rounds = 1 if smoke else 3
        #: The CPU window ends this long after the last delivery (the spans' last export).
        self.tracing_tail = 0.2 if smoke else 1.5

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


def matched_latencies(records: list[Any], receipts: list[Any]
                      ) -> tuple[int, list[tuple[float, float]]]:
    """(events answered 202, [(202 time, ms from the 202 to the sink's receipt)] of every
    delivery of those events, in 202 order), from the load generator's records
    ``[eventId, t, status]`` and the sinks' receipts ``[eventId, path, t]`` (same clock)."""
    accepted_at = {eid: t for eid, t, status in records if status == 202}
    pairs = sorted((accepted_at[eid], (t - accepted_at[eid]) * 1000)
                   for eid, _path, t in receipts if eid in accepted_at)
    return len(accepted_at), pairs


def slow_windows(pairs: list[tuple[float, float]], window: float = 0.1, over_ms: float = 50.0,
                 top: int = 8) -> list[list[float]]:
    """Where a latency tail comes from: the ``top`` windows of ``window`` seconds of 202s
    holding the most deliveries slower than ``over_ms``, as [seconds from the first 202,
    deliveries over, the window's max ms]. A few windows: stalls (something held a process
    or Redis); spread thin over the run: queueing."""
    if not pairs:
        return []
    start = pairs[0][0]
    windows: dict[int, list[float]] = {}
    for at, ms in pairs:
        if ms > over_ms:
            w = windows.setdefault(int((at - start) / window), [0.0, 0.0])
            w[0] += 1
            w[1] = max(w[1], ms)
    worst = sorted(windows.items(), key=lambda kv: -kv[1][0])[:top]
    return [[round(k * window, 1), n, round(peak, 1)] for k, (n, peak) in sorted(worst)]


def redis_calls(client: Any) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} so far, from INFO commandstats (commands run inside Lua
    scripts are counted too, under their own names)."""
    out = {}
    for name, stat in client.info("commandstats").items():
        if isinstance(stat, dict) and "calls" in stat:
            out[name.removeprefix("cmdstat_")] = (int(stat["calls"]), int(stat["usec"]))
    return out


#: INFO stats counters of the bytes Redis read and wrote: clients', and the replication
#: stream's (to replicas) apart.
NET_STATS = {"total_net_input_bytes": "net_in_bytes", "total_net_output_bytes": "net_out_bytes",
             "total_net_repl_output_bytes": "repl_out_bytes"}


def redis_snapshot(client: Any) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """``redis_calls``, the network byte counters of INFO stats and ``used_memory``, now."""
    stats = client.info("stats")
    counters = {k: int(stats.get(k, 0)) for k in NET_STATS}
    counters["used_memory"] = int(client.info("memory")["used_memory"])
    return redis_calls(client), counters


def redis_cost(before: Any, after: Any, items: int) -> dict[str, Any] | None:
    """What Redis did between two ``redis_snapshot``s, per item (event or delivery): commands
    (those run inside Lua scripts and MULTI blocks counted too, under their own names, besides
    the EVALSHA or EXEC that ran them), bytes in and out (Redis 7's ``net_out`` includes the
    replication stream, also given apart) and the memory the run left held. Not commandstats'
    ``usec``: a script's time holds that of the commands it ran, which have their own, so a
    sum counts them twice; the redis-server process's CPU time (the sampler's) is the cost."""
    if items <= 0:
        return None
    calls = calls_between(before[0], after[0])
    total = sum(c for c, _ in calls.values())
    out: dict[str, Any] = {
        "items": items,
        "commands": round(total / items, 2),
        "by_command": {name: round(c / items, 2) for name, (c, _) in calls.items()},
    }
    for key, name in NET_STATS.items():
        out[name] = round((after[1][key] - before[1][key]) / items, 1)
    # What the run left in Redis's memory (records kept for redis.retention, dedupe markers,
    # indexes, what is still queued), per item.
    out["memory_bytes"] = round((after[1]["used_memory"] - before[1]["used_memory"]) / items)
    return out


def calls_between(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
                  ) -> dict[str, tuple[int, int]]:
    """Commands run between two ``redis_calls`` snapshots (the bench's own INFO left out)."""
    out = {}
    for name, (calls, usec) in after.items():
        c0, u0 = before.get(name, (0, 0))
        if calls > c0 and name != "info":
            out[name] = (calls - c0, usec - u0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1][0]))


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

    def ingress_saturation(self, fsync: str, round_no: int, ingress: Ingress | None = None,
                           label: str = "", replica: RedisServer | None = None
                           ) -> dict[str, Any]:
        """Distinct events at saturation into ``ingress`` (default: the hub's), workers
        stopped; every one must be stored and queued (and, with ``replica``, be on it too)."""
        assert self.redis is not None and self.ingress is not None
        ingress = ingress or self.ingress
        tag = f"{fsync}{'-' + label if label else ''}"
        self.redis.set_fsync(fsync)
        self.flush()
        url = ingress.url
        if not (self.plan.smoke and label):  # smoke: the extra ingress runs go cold (time)
            self.loadgen("ingress-warm", [url], f"warm-ing-{tag}-{round_no}-",
                         min(2000, self.plan.warmup * 50))
            self.flush()
        n = self.plan.ingress_requests
        with contextlib.closing(self.redis.client()) as c:
            before = redis_snapshot(c)
            r, mark = self.measured(f"ingress-{tag}", [url], f"ing-{tag}-{round_no}-", n)
            if replica is not None:
                # Without min_replicas the last writes may still be on their way (in a short
                # run, all of them: the replication stream then counted 0 bytes): let the
                # replica catch up (WAIT) before counting what was sent and what it holds.
                c.execute_command("WAIT", 1, 10_000)
            after = redis_snapshot(c)
        cpu = self.cpu_used(mark, r)
        if ingress is not self.ingress:  # its process stands in the ingress column
            cpu.pop("ingress", None)
            cpu["ingress"] = cpu.pop(ingress.role, 0.0)
        accepted = r["statuses"].get("202", 0)
        keys = self.keys
        on_replica = None
        if replica is not None:
            with contextlib.closing(replica.client()) as c:
                on_replica = sum(1 for _ in c.scan_iter(match=keys.event("*"), count=5000))
        with contextlib.closing(self.redis.client()) as c:
            stored = sum(1 for _ in c.scan_iter(match=keys.event("*"), count=5000))
            seen = sum(1 for _ in c.scan_iter(match=keys.seen("*"), count=5000))
            # One fan-out message per group-committed batch: count the events they name.
            queued, messages = 0, 0
            for raw in c.lrange(keys.queue, 0, -1):
                ids = read_deliver_message(raw).event_id
                queued += 1 if isinstance(ids, str) else len(ids)
                messages += 1
        complete = accepted == n and stored == n and seen == n and queued == n \
            and on_replica in (None, n)
        if not complete:
            self.failures.append(f"ingress ({tag}): {accepted} accepted, {stored} stored, "
                                 f"{queued} queued of {n} sent"
                                 + (f", {on_replica} on the replica" if replica else "")
                                 + f"; statuses {r['statuses']}")
        self.flush()
        out = {
            "appendfsync": fsync, "requests": n, "accepted": accepted, "stored": stored,
            "queued": queued, "queue_messages": messages, "all_stored": complete,
            "statuses": r["statuses"],
            "errors": r["errors"], "seconds": round(r["t_end"] - r["t_start"], 3),
            "events_per_s": round(rate(accepted, r["t_end"] - r["t_start"]), 1),
            "latency_ms": r["latency_ms"], "cpu_cores": cpu,
            "redis_per_event": redis_cost(before, after, accepted),
        }
        if replica is not None:
            out["on_replica"] = on_replica
        self.say(f"ingress ({tag}), round {round_no + 1}: {out['events_per_s']:.0f} "
                 f"events/s, {stored}/{n} stored"
                 + (f", {on_replica}/{n} on the replica" if replica else ""))
        return out

    def replicas_phase(self) -> None:
        """What ``redis.min_replicas: 1`` costs the ingress: a replica of the bench's Redis is
        started, and the ingress is measured at saturation in alternating rounds without
        (the hub's ingress, min_replicas 0) and with it (a second ingress process on the same
        Redis, min_replicas 1: WAIT 1 after each group-committed write); the replica is
        attached for both, so the ratio is the WAIT's alone. The hub's ingress without any
        replica (the ``ingress`` phase) is set beside them: the replication stream's cost."""
        assert self.redis is not None and self.sinks is not None
        fsync = "everysec" if self.args.fsync == "both" else self.args.fsync
        with contextlib.closing(self.redis.client()) as c:
            # The first sync at once, not after Redis's 5 s wait for more replicas to join.
            c.config_set("repl-diskless-sync-delay", 0)
        replica = RedisServer(fsync, self.log_dir, replica_of=self.redis.port,
                              name="redis-replica")
        self.sampler.watch("redis-replica", replica.proc.pid)
        waiting: Ingress | None = None
        try:
            replica.wait_in_sync(self.redis, 30)
            port = free_port()
            cfg = write_config(self.log_dir / "ingress-min-replicas.yaml", self.redis.url, port,
                               [self.sinks.url(0)], self.worker_settings,
                               self.ingress_settings,
                               redis={"min_replicas": 1, "min_replicas_timeout": "1s"})
            waiting = Ingress(cfg, port, self.log_dir, name="ingress-min-replicas")
            self.sampler.watch(waiting.role, waiting.proc.pid)
            without: list[dict[str, Any]] = []
            with_wait: list[dict[str, Any]] = []
            for n in range(self.plan.rounds):
                without.append(self.ingress_saturation(fsync, n, label="replica",
                                                       replica=replica))
                with_wait.append(self.ingress_saturation(fsync, n, ingress=waiting,
                                                         label="min-replicas-1",
                                                         replica=replica))
        finally:
            self.sampler.sample()
            self.sampler.unwatch("redis-replica")
            if waiting is not None:
                self.sampler.unwatch(waiting.role)
                waiting.stop()
            replica.stop()
            self.flush()
        a = median_round(without, "events_per_s")
        b = median_round(with_wait, "events_per_s")
        alone = (self.results.get("ingress") or {}).get(fsync, {}).get("events_per_s")
        self.results["replicas"] = {
            "appendfsync": fsync, "replica_version": replica.version,
            "min_replicas_timeout_ms": 1000,
            "min_replicas_0": a, "min_replicas_1": b,
            "ratio": round(b["events_per_s"] / a["events_per_s"], 3)
            if a["events_per_s"] else None,
            "no_replica_events_per_s": alone,
        }
        self.say(f"min_replicas 1: {b['events_per_s']:.0f} events/s against "
                 f"{a['events_per_s']:.0f} with min_replicas 0 (a replica attached to both): "
                 f"{self.results['replicas']['ratio']}")

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
        assert self.redis is not None
        with contextlib.closing(self.redis.client()) as c:
            before = redis_snapshot(c)
            r, mark = self.measured(f"e2e-fo{fanout}", [self.ingress.url], f"e2e-fo{fanout}-",
                                    n)
            stats = self.sinks.wait_count(expected, max(60.0, expected / 100))
            after = redis_snapshot(c)
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
            # Everything Redis did from the first POST to the last delivery (the ingress's
            # writes too), per delivery received.
            "redis_per_delivery": redis_cost(before, after, stats["distinct"]),
        }
        self.say(f"fan-out {fanout}: {out['deliveries_per_s']:.0f} deliveries/s "
                 f"({stats['distinct']}/{expected} in {seconds:.2f}s, "
                 f"{out['duplicates']} duplicates)")
        return out

    def redis_forks(self) -> int:
        with contextlib.closing(self.redis.client()) as c:
            return int(c.info("stats").get("total_forks", 0))

    def latency(self, fanout: int, deliveries_per_s: float) -> dict[str, Any]:
        assert self.ingress is not None and self.sinks is not None
        events_per_s = max(1.0, 0.5 * deliveries_per_s / fanout)
        n = max(20, int(events_per_s * self.plan.latency_seconds))
        self.sinks.reset()
        self.sinks.record(True)
        forks_before = self.redis_forks()
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
        accepted, pairs = matched_latencies(r["records"], receipts)
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
            "accepted": accepted, "deliveries": len(lat),
            "expected": n * fanout,
            "p50_ms": round(p50, 2) if p50 is not None else None,
            "p90_ms": round(percentile(lat, 0.9) or 0, 2) if lat else None,
            "p99_ms": round(p99, 2) if p99 is not None else None,
            "max_ms": round(lat[-1], 2) if lat else None,
            "p50_first_last_quarter_ms": [round(x, 2) if x is not None else None
                                          for x in trend],
            "ingress_202_p50_ms": r["latency_ms"]["p50"],
            "ingress_202_p99_ms": r["latency_ms"]["p99"],
            "slow_windows": slow_windows(pairs),
            # AOF rewrites Redis forked meanwhile: the child competes for the same cores,
            # one of a tail's two causes seen on 2 cores (docs/benchmarks.md).
            "redis_forks": self.redis_forks() - forks_before,
        }
        if len(lat) < n * fanout:
            self.failures.append(f"latency fan-out {fanout}: {len(lat)} of {n * fanout} "
                                 f"deliveries matched")
        self.say(f"latency fan-out {fanout} at {events_per_s:.0f} events/s: "
                 f"p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms")
        return out

    def fanout_phase(self, e2e_phase: bool, steady_phase: bool) -> None:
        """One worker per fan-out: end to end at saturation, latency at half that rate
        (``e2e``) and the steady stream of lone events (``steady``), on the same worker."""
        if e2e_phase:
            self.results["e2e"] = {}
            self.results["latency"] = {}
        if steady_phase:
            self.results["steady"] = {"rates": list(self.plan.steady_rates),
                                      "seconds": self.plan.steady_seconds,
                                      "profiled": self.args.profile is not None,
                                      "idle": {}, "runs": []}
        for fanout in FANOUTS:
            steady = steady_phase and fanout in STEADY_FANOUTS
            if not (e2e_phase or steady):
                continue
            name = f"worker-fo{fanout}"
            worker = self.start_worker(name, fanout)
            try:
                if e2e_phase:
                    e2e = self.end_to_end(fanout, worker)
                    self.results["e2e"][str(fanout)] = e2e
                    if fanout in LATENCY_FANOUTS and e2e["deliveries_per_s"] > 0:
                        self.results["latency"][str(fanout)] = self.latency(
                            fanout, e2e["deliveries_per_s"])
                    if self.args.profile and fanout in (1, 10):
                        self.profile_worker(worker, fanout)
                if steady:
                    self.steady(fanout, worker)
            finally:
                self.stop_worker(name, worker)

    # -- the steady stream of lone events ---------------------------------------------------

    def cpu_seconds(self, before: Any, after: Any) -> dict[str, float]:
        """CPU seconds per process tree between two ``sampler.cpu()`` snapshots."""
        return {role: after[1][role] - before[1][role] for role in after[1]
                if role in before[1] and not role.startswith("worker-")}

    def steady(self, fanout: int, worker: Worker) -> None:
        """Lone events, open loop, at each of ``plan.steady_rates`` events/s: what a
        delivery costs the hub (CPU of its own processes, Redis commands) when the stream is
        a trickle, not a flood; first the idle floor (no events at all) over a quiet window.
        With ``--profile`` py-spy samples the worker (every process) and the ingress during
        each rate: the report then splits each process's CPU per delivery into stages."""
        assert self.redis is not None
        out = self.results["steady"]
        time.sleep(0.1 if self.plan.smoke else 1.0)  # what came before has settled
        with contextlib.closing(self.redis.client()) as c:
            calls0, mark0 = redis_calls(c), self.sampler.cpu()
            time.sleep(self.plan.steady_idle_seconds)
            mark1, calls1 = self.sampler.cpu(), redis_calls(c)
        wall = mark1[0] - mark0[0]
        idle = {role: sec / wall for role, sec in self.cpu_seconds(mark0, mark1).items()}
        out["idle"][str(fanout)] = {
            "seconds": round(wall, 2),
            "cores": {role: round(v, 4) for role, v in idle.items()},
            "redis_calls_per_s": {cmd: round(n / wall, 1)
                                  for cmd, (n, _) in calls_between(calls0, calls1).items()},
        }
        self.say(f"steady, fan-out {fanout}, idle: hub "
                 f"{sum(idle.get(k, 0.0) for k in SERVING) * 1000:.1f} ms of CPU per second")
        for events_per_s in self.plan.steady_rates:
            out["runs"].append(self.steady_rate(fanout, events_per_s, worker, idle))

    def steady_rate(self, fanout: int, events_per_s: float, worker: Worker,
                    idle: dict[str, float]) -> dict[str, Any]:
        assert self.ingress is not None and self.sinks is not None and self.redis is not None
        seconds = self.plan.steady_seconds
        n = max(10, int(events_per_s * seconds))
        expected = n * fanout
        tag = f"steady-fo{fanout}-{events_per_s:g}"
        prof_dir = Path(self.args.profile) if self.args.profile else None
        recordings: list[Any] = []
        marks: list[Any] = []

        def start() -> None:
            marks.append(self.sampler.cpu())
            if prof_dir is not None:
                from bench.profile import Recording

                prof_dir.mkdir(parents=True, exist_ok=True)
                recordings.append(Recording(worker.pid, prof_dir / f"{tag}-worker.raw.txt",
                                            seconds, subprocesses=True))
                recordings.append(Recording(self.ingress.proc.pid,  # type: ignore[union-attr]
                                            prof_dir / f"{tag}-ingress.raw.txt", seconds))

        self.sinks.reset()
        self.sinks.record(True)
        try:
            with contextlib.closing(self.redis.client()) as c:
                calls0 = redis_calls(c)
                r = self.loadgen(tag, [self.ingress.url], f"{tag}-", n, mode="open",
                                 rate=events_per_s, record=True, concurrency=64,
                                 deadline=seconds * 3 + 10, on_start=start)
                # On a slow or busy machine a stream the hub cannot keep up with leaves a
                # backlog: it drains here, inside the measured window.
                stats = self.sinks.wait_count(expected, max(60.0, expected / 100))
                end, calls1 = self.sampler.cpu(), redis_calls(c)
            receipts = self.sinks.receipts()
        finally:
            self.sinks.record(False)
            self.sinks.reset()
        for rec in recordings:
            rec.wait()
        wall = end[0] - marks[0][0]
        used = self.cpu_seconds(marks[0], end)
        used["loadgen"] = r["cpu_s"]
        delivered = stats["distinct"]

        def per(sec: float | None) -> float | None:
            return round(sec / delivered * 1e6, 1) if delivered and sec is not None else None

        serving = sum(used.get(k, 0.0) for k in SERVING)
        accepted, pairs = matched_latencies(r["records"], receipts)
        lat = sorted(ms for _, ms in pairs)
        quarter = max(1, len(pairs) // 4)
        trend = [percentile(sorted(ms for _, ms in pairs[:quarter]), 0.5),
                 percentile(sorted(ms for _, ms in pairs[-quarter:]), 0.5)]
        calls = calls_between(calls0, calls1)
        entry: dict[str, Any] = {
            "fanout": fanout, "events_per_s": events_per_s, "events": n,
            "accepted": accepted, "expected": expected, "deliveries": delivered,
            "duplicates": stats["count"] - delivered, "seconds": round(wall, 3),
            "p50_ms": round(percentile(lat, 0.5) or 0, 2) if lat else None,
            "p99_ms": round(percentile(lat, 0.99) or 0, 2) if lat else None,
            "p50_first_last_quarter_ms": [round(x, 2) if x is not None else None
                                          for x in trend],
            # A backlog grew: the hub did not keep up with this stream on this machine.
            "queued": bool(trend[0] is not None and trend[1] is not None
                           and trend[1] > max(100.0, 2 * trend[0])),
            "cpu_cores": {role: round(sec / wall, 3) for role, sec in used.items()},
            "cpu_us_per_delivery": {role: per(used.get(role))
                                    for role in (*SERVING, "worker:main")},
            "hub_cpu_us_per_delivery": per(serving),
            # What the hub burns with no events at all, spread over this window's deliveries.
            "idle_floor_us_per_delivery": per(sum(idle.get(k, 0.0) for k in SERVING) * wall),
            "redis_calls_per_delivery": {cmd: round(c / delivered, 2)
                                         for cmd, (c, _) in calls.items()} if delivered else {},
            "redis_usec_per_delivery": {cmd: round(u / delivered, 1)
                                        for cmd, (_, u) in calls.items()} if delivered else {},
            "profiled": prof_dir is not None,
        }
        if delivered < expected or accepted < n:
            self.failures.append(f"steady fan-out {fanout} at {events_per_s:g} events/s: "
                                 f"{delivered} of {expected} deliveries received, {accepted} "
                                 f"of {n} events accepted")
        if prof_dir is not None:
            self.summarise_steady_profiles(prof_dir, tag)
        self.say(f"steady, fan-out {fanout} at {events_per_s:g} events/s: hub "
                 f"{entry['hub_cpu_us_per_delivery']} us of CPU per delivery (idle floor "
                 f"{entry['idle_floor_us_per_delivery']}), p50 {entry['p50_ms']} ms, "
                 f"p99 {entry['p99_ms']} ms, {delivered}/{expected} delivered"
                 + (" (queued: a backlog grew)" if entry["queued"] else ""))
        return entry

    def summarise_steady_profiles(self, prof_dir: Path, tag: str) -> None:
        from bench.profile import flame_svg, summarise

        prof = self.results.setdefault("profile", {})
        for proc, focus, stages, default in (
                ("worker", WORKER_FOCUS, WORKER_STAGES, WORKER_DEFAULT_STAGE),
                ("ingress", INGRESS_FOCUS, INGRESS_STAGES, INGRESS_DEFAULT_STAGE)):
            raw = prof_dir / f"{tag}-{proc}.raw.txt"
            prof[f"{tag}-{proc}"] = summarise(raw, focus, stages=stages, default_stage=default)
            flame_svg(raw, prof_dir / f"{tag}-{proc}.svg", f"{proc} under a steady stream "
                      f"({tag.removeprefix('steady-').replace('-', ', ')} events/s)")

    # -- tracing on against off ------------------------------------------------------------

    def tracing_phase(self) -> None:
        """What tracing costs: a steady trickle of lone events (open loop) through an ingress
        and a worker of their own, started untraced (``off``), traced to a local OTLP
        collector that accepts and discards (``on``), and traced to a closed port (``away``:
        spans dropped). The variants alternate in each round, so the machine's drift hits
        each alike; each figure is the median of its rounds."""
        assert self.redis is not None
        plan = self.plan
        port = free_port()
        collector = Proc("otlp", python_cmd("-m", "bench.otlp", "--port", str(port)),
                         self.log_dir)
        wait_http(f"http://127.0.0.1:{port}/_stats")
        self.sampler.watch("collector", collector.pid)
        # Spans leave within 1 s (the SDK's default is 5 s), so the window below, which ends
        # 1.5 s after the last delivery, holds their export.
        traced = {"OTEL_SDK_DISABLED": "false", "OTEL_BSP_SCHEDULE_DELAY": "1000"}
        envs = {"off": {"OTEL_SDK_DISABLED": "true"},
                "on": {**traced, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"},
                "away": {**traced,
                         "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}}
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in TRACING_VARIANTS}
        try:
            for round_no in range(plan.tracing_rounds):
                for variant in TRACING_VARIANTS:
                    before = json.loads(http_get(f"http://127.0.0.1:{port}/_stats"))
                    run = self.tracing_run(variant, envs[variant], round_no)
                    after = json.loads(http_get(f"http://127.0.0.1:{port}/_stats"))
                    run["spans_collected"] = after["spans"] - before["spans"]
                    runs[variant].append(run)
        finally:
            self.sampler.unwatch("collector")
            collector.stop()
        self.results["tracing"] = summarise_tracing(plan, runs)
        on, away = (self.results["tracing"]["cost"][v] for v in ("on", "away"))

        def signed(x: float | None) -> str:
            return "?" if x is None else f"{x:+g}"

        self.say(f"tracing on against off: {signed(on['cpu_us_per_delivery'])} us of hub CPU "
                 f"per delivery, p50 {signed(on['p50_ms'])} ms, p99 {signed(on['p99_ms'])} ms; "
                 f"collector away: {signed(away['cpu_us_per_delivery'])} us, p99 "
                 f"{signed(away['p99_ms'])} ms")

    def tracing_run(self, variant: str, env: dict[str, str], round_no: int) -> dict[str, Any]:
        assert self.redis is not None and self.sinks is not None
        plan = self.plan
        fanout, seconds = plan.tracing_fanout, plan.tracing_seconds
        name = f"tracing-{variant}-{round_no}"
        port = free_port()
        cfg = write_config(self.log_dir / f"{name}.yaml", self.redis.url, port,
                           [self.sinks.url(i) for i in range(fanout)], self.worker_settings,
                           self.ingress_settings)
        n = max(10, int(plan.tracing_rate * seconds))
        expected = n * fanout
        marks: list[Any] = []
        ingress = Ingress(cfg, port, self.log_dir, name=f"ingress-{name}", env=env)
        worker: Worker | None = None
        try:
            self.sampler.watch("tracing-ingress", ingress.proc.pid)
            worker = Worker(f"worker-{name}", cfg, self.log_dir, env=env)
            self.sampler.watch("tracing-worker", worker.pid)
            worker.warm_up(ingress, self.sinks, fanout, f"warm-{name}-", plan.warmup)
            time.sleep(0.1 if plan.smoke else 1.0)  # the warm-up's spans are gone
            self.sinks.record(True)
            r = self.loadgen(name, [ingress.url], f"{name}-", n, mode="open",
                             rate=plan.tracing_rate, record=True, concurrency=64,
                             deadline=seconds * 3 + 10,
                             on_start=lambda: marks.append(self.sampler.cpu()))
            stats = self.sinks.wait_count(expected, max(60.0, expected / 100))
            time.sleep(plan.tracing_tail)  # the last spans' export, in the window
            end = self.sampler.cpu()
            receipts = self.sinks.receipts()
        finally:
            self.sinks.record(False)
            self.sinks.reset()
            self.sampler.unwatch("tracing-ingress")
            self.sampler.unwatch("tracing-worker")
            if worker is not None:
                worker.stop()
            ingress.stop()
            self.flush()
        delivered = stats["distinct"]
        used = self.cpu_seconds(marks[0], end)
        hub = {"ingress": used.get("tracing-ingress", 0.0),
               "worker": used.get("tracing-worker", 0.0), "redis": used.get("redis", 0.0)}
        accepted, pairs = matched_latencies(r["records"], receipts)
        lat = sorted(ms for _, ms in pairs)
        if delivered < expected or accepted < n:
            self.failures.append(f"tracing {variant}: {delivered} of {expected} deliveries "
                                 f"received, {accepted} of {n} events accepted")
        return {
            "variant": variant, "round": round_no, "events": n, "accepted": accepted,
            "expected": expected, "deliveries": delivered,
            "duplicates": stats["count"] - delivered,
            "seconds": round(end[0] - marks[0][0], 3),
            "p50_ms": round(percentile(lat, 0.5) or 0, 2) if lat else None,
            "p99_ms": round(percentile(lat, 0.99) or 0, 2) if lat else None,
            "cpu_us_per_delivery": {k: round(v / delivered * 1e6, 1) if delivered else None
                                    for k, v in hub.items()},
            "hub_cpu_us_per_delivery": (round(sum(hub.values()) / delivered * 1e6, 1)
                                        if delivered else None),
            # Spans the variant made, warm-up included: a server span per event and a client
            # span per delivery (the collector's count covers the same).
            "spans_made": (n + plan.warmup) * (1 + fanout) if variant != "off" else 0,
        }

    # -- the obvious design, as a reference ---------------------------------------------------

    def obvious_phase(self) -> None:
        """The obvious design (bench/obvious/) end to end at fan-out 10, measured like the
        hub's fan-out phase: same load generator, sinks, Redis server, pool and concurrency."""
        assert self.redis is not None and self.sinks is not None
        fanout = OBVIOUS_FANOUT
        n = self.plan.obvious_events
        expected = n * fanout
        design = ObviousDesign(f"redis://127.0.0.1:{self.redis.port}/1", self.sinks, fanout,
                               self.args.pool, self.args.concurrency, self.log_dir)
        self.sampler.watch("obvious-ingress", design.ingress.pid)
        self.sampler.watch("obvious-worker", design.worker.pid)
        try:
            design.warm_up(self.sinks, fanout, "warm-obv-", self.plan.obvious_warmup)
            r, mark = self.measured("obvious", [design.url], "obv-", n)
            stats = self.sinks.wait_count(expected, max(120.0, expected / 20))
            cores = self.cpu_used(mark, r)
        finally:
            self.sampler.sample()
            self.sampler.unwatch("obvious-ingress")
            self.sampler.unwatch("obvious-worker")
            design.stop()
            self.sinks.reset()
            self.flush()
        # In the CPU table its processes stand in the hub's columns; the hub's ingress,
        # idle meanwhile, is kept apart.
        cpu = {k: v for k, v in cores.items() if not k.startswith(("ingress", "obvious-"))}
        cpu.update({k.removeprefix("obvious-"): v for k, v in cores.items()
                    if k.startswith("obvious-")})
        cpu["hub_ingress_idle"] = cores.get("ingress", 0.0)
        accepted = r["statuses"].get("202", 0)
        seconds = stats["last"] - r["t_start"]
        complete = stats["distinct"] >= expected and accepted == n
        if not complete:
            self.failures.append(f"obvious design: {stats['distinct']} of {expected} "
                                 f"deliveries received, {accepted} of {n} events accepted")
        self.results["obvious"] = {
            "design": "Celery task per (event, subscriber), requests, retry by countdown, "
                      "no batching (bench/obvious/)",
            "fanout": fanout, "events": n, "accepted": accepted, "expected": expected,
            "received": stats["distinct"], "duplicates": stats["count"] - stats["distinct"],
            "complete": complete, "seconds": round(seconds, 3),
            "deliveries_per_s": round(rate(stats["distinct"], seconds), 1),
            "events_per_s": round(rate(n, seconds), 1),
            "ingest_seconds": round(r["t_end"] - r["t_start"], 3),
            "ingest_events_per_s": round(rate(accepted, r["t_end"] - r["t_start"]), 1),
            "pool": self.args.pool, "concurrency": self.args.concurrency,
            "cpu_cores": cpu,
        }
        o = self.results["obvious"]
        hub = self.results.get("e2e", {}).get(str(fanout), {}).get("deliveries_per_s")
        self.say(f"obvious design, fan-out {fanout}: {o['deliveries_per_s']:.0f} deliveries/s "
                 f"({stats['distinct']}/{expected} in {seconds:.2f}s)"
                 + (f"; the hub's {hub:.0f} is {hub / o['deliveries_per_s']:.1f} x that"
                    if hub and o["deliveries_per_s"] else ""))

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

    def big_events_phase(self) -> None:
        """Ingram's largest events at fan-out 10, posted at once: the worker tree's RSS growth
        against one copy of each body. ``direct``: the default worker (every attempt launched
        from the one fan-out load); ``parked``: ``max_in_flight`` 20, so each subscriber holds
        2 and the rest are parked and pulled back (a load per pulled batch)."""
        assert self.ingress is not None and self.sinks is not None and self.redis is not None
        from bench.events import stock_update

        fanout, n = 10, self.plan.big_events
        bodies = [stock_update(f"big-{i:03d}", skus=self.plan.big_skus) for i in range(n)]
        size = sum(len(b) for b in bodies)
        out: dict[str, Any] = {"fanout": fanout, "events": n, "skus": self.plan.big_skus,
                               "event_bytes": len(bodies[0]), "variants": {}}
        self.say(f"big events: {n} x {len(bodies[0]) / 1e6:.2f} MB at fan-out {fanout}")
        for variant, max_in_flight, delay in (("direct", self.args.max_in_flight, 0.0),
                                              ("parked", 20, self.plan.big_delay)):
            settings = {**self.worker_settings, "max_in_flight": max_in_flight}
            name = f"worker-big-{variant}"
            urls = [self.sinks.url(i) + (f"?delay={delay}" if delay else "")
                    for i in range(fanout)]
            cfg = write_config(self.log_dir / f"{name}.yaml", self.redis.url, self.ingress.port,
                               urls, settings, self.ingress_settings)
            worker = Worker(name, cfg, self.log_dir)
            self.sampler.watch(name, worker.pid)
            try:
                worker.warm_up(self.ingress, self.sinks, fanout, f"warm-{name}-",
                               self.plan.warmup)
                out["variants"][variant] = self._big_run(name, worker, bodies, fanout)
            finally:
                self.sampler.unwatch(name)
                worker.stop()
                self.flush()
            got = out["variants"][variant]
            got["max_in_flight"] = max_in_flight
            got["sink_delay_s"] = delay
            got["copies_held"] = round(got["growth_kb"] * 1024 / size, 2)
            # After the fan-out's own load (every event once), what the lanes hold: parked
            # attempts pulled back, each subscriber holding 2 at a time.
            got["pulled_copies_held"] = round(got["pulled_growth_kb"] * 1024 / len(bodies[0]),
                                              1)
            if got["received"] < n * fanout:
                self.failures.append(f"big events ({variant}): {got['received']} of "
                                     f"{n * fanout} deliveries received")
            self.say(f"big events ({variant}): worker RSS {got['baseline_kb'] / 1024:.0f} MB "
                     f"-> peak {got['peak_kb'] / 1024:.0f} MB (+{got['growth_kb'] / 1024:.0f} "
                     f"MB: {got['copies_held']:.2f} x the {size / 1e6:.0f} MB of bodies)")
        self.results["bigevents"] = out

    def _big_run(self, role: str, worker: Worker, bodies: list[bytes], fanout: int
                 ) -> dict[str, Any]:
        """Post ``bodies`` at once; the worker tree's RSS before, at its peak and after."""
        import concurrent.futures
        import urllib.request

        from bench.events import INGRESS_SECRET, id_of
        from bench.procs import descendants, mem_kb
        from relay.signatures import sign_ingram

        assert self.ingress is not None and self.sinks is not None
        time.sleep(1.0)
        pids = descendants(worker.pid)
        base = {p: mem_kb(p)[0] for p in pids}
        self.sinks.reset()

        url = self.ingress.url

        def post(body: bytes) -> int:
            req = urllib.request.Request(url, data=body, method="POST", headers={
                "Content-Type": "application/json",
                "X-Hub-Signature": sign_ingram(INGRESS_SECRET, id_of(body))})
            with urllib.request.urlopen(req, timeout=60) as resp:
                return int(resp.status)

        t0 = time.time()
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            statuses = list(pool.map(post, bodies))
        t_stored = time.time()
        stats = self.sinks.wait_count(len(bodies) * fanout, 300.0)
        t1 = time.time()
        time.sleep(2.0)
        after = sum(mem_kb(p)[0] for p in pids)
        peak_sum = max(self.sampler.window(role, t0, t1) or [0])
        # The kernel's own peak per process (between samples too), over its RSS before.
        growth = sum(max(0, mem_kb(p)[1] - base[p]) for p in pids)
        # Once every event is stored and fanned out (plus 2 s), lanes hold only what they
        # pulled back: the mean RSS over that window, above the baseline.
        pulled = self.sampler.window(role, t_stored + 2.0, t1)
        return {"accepted": statuses.count(202), "received": stats["distinct"],
                "seconds": round(stats["last"] - t0, 2), "processes": len(pids),
                "baseline_kb": sum(base.values()), "peak_kb": max(peak_sum, sum(base.values())),
                "growth_kb": growth, "after_kb": after,
                "pulled_growth_kb": round(sum(pulled) / len(pulled)) - sum(base.values())
                if pulled else 0}

    # -- profiles ---------------------------------------------------------------------------

    def capture_phase(self) -> None:
        """What keeping each attempt's request and response costs (bench/capture.py)."""
        from bench import capture

        assert self.redis is not None
        self.results["capture"] = capture.measure(self.redis, self.log_dir)
        self.say("attempt capture, per delivery:\n" + capture.text(self.results["capture"]))

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
            if "replicas" in phases:
                self.replicas_phase()
            if "egress" in phases:
                self.egress_ceiling()
            if "e2e" in phases or "steady" in phases:
                self.fanout_phase("e2e" in phases, "steady" in phases)
            if "obvious" in phases:
                self.obvious_phase()
            if "tracing" in phases:
                self.tracing_phase()
            if "ordering" in phases:
                self.results["ordering"] = Ordering(self.log_dir, self.plan.smoke,
                                                    self.worker_settings, self.say).run()
            if "long" in phases:
                self.long_run()
            if "bigevents" in phases:
                self.big_events_phase()
            if "capture" in phases:
                self.capture_phase()
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


#: The hub's own processes: what "CPU per delivery" counts.
SERVING = ("ingress", "worker", "redis")

INGRESS_FOCUS = [
    "WebhookHandler._handle", "parse_envelope", "IngramSigner.verify", "EventStore.accept",
    "_flush_all", "pack_command", "task_message", "uuid", "Timeout.", "RequestHandler.start",
    "RequestHandler.data_received", "_answer", "_SelectorSocketTransport.write", "observe",
    "Logger.",
]
#: What each busy sample of a process was doing: the first stage with a marker in the frames
#: below the dispatching loop (so the order matters: specific stages first).
INGRESS_STAGES = [
    # Before the Redis stage: the batch writer's linger (its timer and wake-up) runs inside
    # _flush_all too.
    ("linger: the batch writer's wait and wake-up (Batcher._gather)", ["Batcher._gather"]),
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
    # First: these threads and tasks use redis-py and asyncio like the rest.
    ("retry scheduler poll (Lua script, main process)", ["Scheduler.run", "Scheduler.move_due"]),
    ("lease keeper (wake-ups, renewals)", ["Engine._keep_leases"]),
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


def summarise_tracing(plan: Plan, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant the median of its rounds; ``cost``: on and away against off."""
    import statistics

    def median(variant: str, key: str, sub: str | None = None) -> float | None:
        values = [(x[key][sub] if sub else x[key]) for x in runs[variant]]
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 2) if values else None

    variants = {}
    for v in TRACING_VARIANTS:
        variants[v] = {
            "hub_cpu_us_per_delivery": median(v, "hub_cpu_us_per_delivery"),
            "cpu_us_per_delivery": {k: median(v, "cpu_us_per_delivery", k)
                                    for k in ("ingress", "worker", "redis")},
            "p50_ms": median(v, "p50_ms"), "p99_ms": median(v, "p99_ms"),
            "delivered": sum(x["deliveries"] for x in runs[v]),
            "expected": sum(x["expected"] for x in runs[v]),
            "spans_made": sum(x["spans_made"] for x in runs[v]),
            "spans_collected": sum(x["spans_collected"] for x in runs[v]),
            "runs": runs[v]}

    def diff(v: str, key: str) -> float | None:
        a, b = variants[v][key], variants["off"][key]
        return round(a - b, 2) if a is not None and b is not None else None

    return {"fanout": plan.tracing_fanout, "events_per_s": plan.tracing_rate,
            "seconds": plan.tracing_seconds, "rounds": plan.tracing_rounds,
            "tail_seconds": plan.tracing_tail,
            "variants": variants,
            "cost": {v: {"cpu_us_per_delivery": diff(v, "hub_cpu_us_per_delivery"),
                         "p50_ms": diff(v, "p50_ms"), "p99_ms": diff(v, "p99_ms")}
                     for v in ("on", "away")}}


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
        # Every process of the run (hub, ceilings, sinks, load generator) runs on it.
        "event_loop": loops.name(),
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
    p.add_argument("--max-in-flight", type=int, default=4000, help="worker.max_in_flight")
    p.add_argument("--linger", default=None, metavar="DURATION",
                   help="ingress.linger, e.g. 0s or 10ms (default: the config's default)")
    p.add_argument("--max-connections", type=int, default=128, help="worker.max_connections")
    p.add_argument("--sinks", type=int, default=1, help="sink processes")
    p.add_argument("--no-aof-rewrite", action="store_true",
                   help="redis-server without automatic AOF rewrites (auto-aof-rewrite-"
                        "percentage 0): on 2 cores a rewrite's child competes with the hub, "
                        "one cause of the latency tail")
    p.add_argument("--phases", default=",".join(PHASES),
                   help="comma-separated subset of " + ",".join(PHASES) + " (steady: lone "
                        "events at a steady rate; obvious: the obvious design at fan-out 10; "
                        "capture: what keeping each attempt's request and response costs)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also profile with py-spy the ingress at saturation, the worker at "
                        "fan-out 1 and 10, and both during each steady stream; flame graphs "
                        "and raw stacks go to DIR")
    p.add_argument("--steady-rates", default=None, metavar="EV/S,...",
                   help="events/s of the steady streams of lone events, at fan-out 1 and 10 "
                        "(default 50,200; smoke 50)")
    p.add_argument("--steady-seconds", type=float, default=None, metavar="S",
                   help="length of each steady stream (default 10, smoke 0.6)")
    p.add_argument("--obvious-events", type=int, default=None, metavar="N",
                   help="events sent to the obvious design at fan-out 10 (default 400, "
                        "smoke 5)")
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
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {','.join(PHASES)}")
    if args.no_aof_rewrite:
        RedisServer.extra_args = ("--auto-aof-rewrite-percentage", "0")
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
    if args.steady_rates:
        plan.steady_rates = tuple(float(x) for x in args.steady_rates.split(",") if x)
    if args.steady_seconds:
        plan.steady_seconds = args.steady_seconds
    if args.obvious_events:
        plan.obvious_events = args.obvious_events
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
