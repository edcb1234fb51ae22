"""``python -m bench.redis_ceiling``: how many events/s one Redis takes, with redis-benchmark.

``redis-benchmark`` (C, one thread) sends the ingress's own store script (EVALSHA of
``relay/ingress/store.py``'s ``STORE_SCRIPT``) to a private redis-server: every call stores
``--batch`` events with distinct random ids (``__rand_int__``), each with a record the size
of a real order-shipped event's and its own order number, and queues one fan-out message, as
a group-committed write of the ingress does; ``--clients`` connections at once (one per
ingress process: each has one write in flight at a time). The redis-server runs as the bench's
(AOF on, ``--fsync``), optionally with a replica attached (``--replica``: the replication
stream's cost on the primary; WAIT is not sent, redis-benchmark sends one command). Its CPU is
read from /proc over the run: near 1.0 core, Redis itself is the limit, not the client.

Each configuration runs ``--rounds`` times; every round is in the JSON written to
``bench/results/redis-ceiling-<UTC time>.json`` (``--out``). Bounded: at most ``--events``
events are stored per run (memory: ~2 KB each), and everything is on 127.0.0.1, never 6379.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from bench.events import event_body
from bench.procs import ROOT, RedisServer, cpu_seconds
from relay.counters import STATS_TTL
from relay.ingress.store import STORE_SCRIPT
from relay.keys import Keys
from relay.models import StoredEvent, parse_envelope
from relay.queue import deliver_message

RANDOM = "__rand_int__"  # redis-benchmark puts a random 12-digit number in its place


def store_command(batch: int, keys: Keys) -> list[str]:
    """The EVALSHA an ingress sends for a batch of ``batch`` events (ids random)."""
    body = event_body("EVT" + RANDOM)
    envelope = parse_envelope(body)
    record = msgspec.msgpack.encode(StoredEvent(
        event_id="EVT" + RANDOM, topic=envelope.topic, event_types=envelope.event_types(),
        received_at=time.time(), body=body, order_numbers=envelope.order_numbers()))
    # Its size, not its bytes: a command line cannot hold every byte msgpack may write.
    filler = "r" * len(record)
    ids = ["EVT" + RANDOM for _ in range(batch)]
    message = deliver_message(keys.queue, ids[0] if batch == 1 else ids, None, 1, RANDOM)
    now_ms = int(time.time() * 1000)
    args = [keys.prefix, "604800", "1209600", RANDOM, message.decode()
            if isinstance(message, bytes) else str(message),
            str(now_ms + 60_000), str(now_ms), str(STATS_TTL)]
    for eid in ids:
        args += [eid, filler, "1", "ORD-" + RANDOM]
    redis_keys = [keys.queue, keys.unclaimed, keys.events, keys.stats(now_ms // 60_000),
                  keys.totals]
    return ["EVALSHA", STORE_SCRIPT.sha, str(len(redis_keys)), *redis_keys, *args]


def run_once(batch: int, clients: int, events: int, fsync: str, replica: bool,
             log_dir: Path) -> dict[str, Any]:
    keys = Keys()
    primary = RedisServer(fsync, log_dir)
    second: RedisServer | None = None
    try:
        with contextlib.closing(primary.client()) as c:
            c.config_set("repl-diskless-sync-delay", 0)
            assert c.script_load(STORE_SCRIPT.text) == STORE_SCRIPT.sha
        if replica:
            second = RedisServer(fsync, log_dir, replica_of=primary.port, name="redis-replica")
            second.wait_in_sync(primary, 30)
        calls = max(clients * 10, events // batch)
        command = store_command(batch, keys)
        cmd = ["redis-benchmark", "-p", str(primary.port), "-c", str(clients), "-n",
               str(calls), "-r", "1000000000", "--csv", *command]
        cpu0, t0 = cpu_seconds(primary.proc.pid), time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        wall = time.monotonic() - t0
        cores = (cpu_seconds(primary.proc.pid) - cpu0) / wall
        if proc.returncode != 0:
            raise RuntimeError(f"redis-benchmark failed: {proc.stderr[-2000:]}")
        rps = _rps(proc.stdout)
        with contextlib.closing(primary.client()) as c:
            stored = sum(1 for _ in c.scan_iter(match=keys.event("*"), count=5000))
            memory = int(c.info("memory")["used_memory"])
        return {
            "batch": batch, "clients": clients, "calls": calls, "appendfsync": fsync,
            "replica": replica, "calls_per_s": round(rps, 1),
            "events_per_s": round(rps * batch, 1), "redis_cores": round(cores, 3),
            "redis_cpu_us_per_event": round(cores * 1e6 / (rps * batch), 2) if rps else None,
            "events_stored": stored, "used_memory_bytes_per_event":
                round(memory / stored) if stored else None,
            "seconds": round(wall, 2),
        }
    finally:
        for server in (second, primary):
            if server is not None:
                server.stop()


def _rps(csv: str) -> float:
    """requests/s from redis-benchmark --csv: the last line is "<the command>","rps", then six
    latency columns (the command itself holds commas and quotes, so count from the right)."""
    with contextlib.suppress(ValueError, IndexError):
        return float(csv.strip().splitlines()[-1].rsplit(",", 7)[1].strip('"'))
    raise RuntimeError(f"no requests/s in redis-benchmark's output: {csv[-500:]!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.redis_ceiling",
                                description=__doc__.split("\n")[0])
    p.add_argument("--batch", default="1,32", help="events per script call, comma-separated")
    p.add_argument("--clients", type=int, default=8, help="connections (ingress processes)")
    p.add_argument("--events", type=int, default=150_000, help="events stored per run at most")
    p.add_argument("--fsync", default="everysec,always", help="appendfsync, comma-separated")
    p.add_argument("--replica", default="no,yes", help="with a replica attached: no,yes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, metavar="FILE")
    args = p.parse_args(argv)
    if shutil.which("redis-benchmark") is None:
        print("error: redis-benchmark is not installed (it comes with redis-server: apt-get "
              "install -y redis-tools)", file=sys.stderr)
        return 2
    version = subprocess.run(["redis-benchmark", "--version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    log_dir = Path(tempfile.mkdtemp(prefix="relay-redis-ceiling-"))
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.redis_ceiling " + " ".join(sys.argv[1:] if argv is None
                                                               else argv),
        "redis_benchmark": version, "nproc": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()], "runs": []}
    try:
        for fsync in args.fsync.split(","):
            for replica in (r == "yes" for r in args.replica.split(",")):
                for batch in (int(b) for b in args.batch.split(",")):
                    rounds = [run_once(batch, args.clients, args.events, fsync, replica,
                                       log_dir) for _ in range(args.rounds)]
                    best = sorted(rounds, key=lambda r: r["events_per_s"])
                    median = best[(len(best) - 1) // 2]
                    results["runs"].append({**median, "rounds_events_per_s":
                                            [r["events_per_s"] for r in rounds],
                                            "rounds_redis_cores":
                                            [r["redis_cores"] for r in rounds]})
                    print(f"appendfsync {fsync}, replica {'yes' if replica else 'no'}, "
                          f"batch {batch}: {median['events_per_s']:,.0f} events/s "
                          f"(rounds {[r['events_per_s'] for r in rounds]}), redis "
                          f"{median['redis_cores']} cores, "
                          f"{median['redis_cpu_us_per_event']} us/event", flush=True)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"redis-ceiling-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
