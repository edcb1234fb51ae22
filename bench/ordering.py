"""The ``ordering`` phase of ``make bench``: what ordered delivery costs, in the same run.

1. **Throughput.** Fan-out 10, 1,000 events of distinct orders, posted as fast as the ingress
   takes them; subscribers s0-s4 have ``ordering: {by: order}``, s5-s9 none. Each group's
   deliveries/s over its own first-to-last receipt: ordered against unordered (target >= 0.8).
2. **A chain.** 200 events of one order, stored while the ordered subscriber is paused, then
   resumed: every event waits for the previous one's 2xx. The sink answers each post after
   ``CHAIN_LATENCY_MS``. Per event, the gap from the previous one's answer to its own arrival
   (target p50 <= 20 ms), and the whole order against 200 x the sink's latency (target <= 1.5).
3. **Memory.** With no worker, N events of one order stored for one ordered subscriber, then
   the same with ordering off: Redis ``used_memory`` per waiting event, beyond an event's own.

Its own Redis, sinks, ingress and worker processes (the run's ``--stress`` load, if any, keeps
running); nothing shared with the other phases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import yaml

from bench.events import INGRESS_SECRET
from bench.hub import Ingress, Sinks, relay_proc
from bench.procs import RedisServer, free_port, http_get, http_post, wait_until
from relay.signatures import sign_ingram

SUBSCRIBERS = 10
ORDERED = 5
CHAIN = 200
CHAIN_LATENCY_MS = 10


def order_body(event_id: str, order: str) -> bytes:
    return msgspec.json.encode({
        "topic": "resellers/orders", "event": "im::updated", "eventId": event_id,
        "eventTimeStamp": "2021-11-01T13:02:06.369Z",
        "resource": [{"eventType": "im::order_shipped", "orderNumber": order,
                      "lines": [{"ingramLineNumber": "001", "lineStatus": "IM::shipped",
                                 "ingramPartNumber": "5CX895", "shippedQuantity": 2}]}]})


async def _post_all(url: str, events: list[tuple[str, str]], concurrency: int) -> int:
    """Post ``(event id, order)`` pairs; with concurrency 1, in order (each 2xx before the
    next is sent: the order of the 202s). Returns how many were accepted."""
    queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    for item in events:
        queue.put_nowait(item)
    accepted = 0
    async with aiohttp.ClientSession() as session:
        async def poster() -> None:
            nonlocal accepted
            while not queue.empty():
                event_id, order = queue.get_nowait()
                headers = {"Content-Type": "application/json",
                           "X-Hub-Signature": sign_ingram(INGRESS_SECRET, event_id)}
                async with session.post(url, data=order_body(event_id, order),
                                        headers=headers) as resp:
                    await resp.read()
                    accepted += int(resp.status == 202)
        await asyncio.gather(*(poster() for _ in range(concurrency)))
    return accepted


def post_all(url: str, events: list[tuple[str, str]], concurrency: int) -> int:
    return asyncio.run(_post_all(url, events, concurrency))


def write_config(path: Path, redis_url: str, port: int, urls: list[str], ordered: int,
                 worker: dict[str, Any]) -> Path:
    doc = {
        "redis": {"url": redis_url, "allow_unsafe": True},
        "ingress": {"secrets": [INGRESS_SECRET], "host": "127.0.0.1", "port": port},
        "delivery": {"timeout": "10s", "max_attempts": 8,
                     "backoff": {"initial": "1s", "max": "10s"}},
        "worker": worker,
        "subscribers": [{"name": f"s{i}", "url": url, "secret": f"bench-subscriber-secret-{i}",
                         **({"ordering": {"by": "order"}} if i < ordered else {})}
                        for i, url in enumerate(urls)],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Ordering:
    def __init__(self, log_dir: Path, smoke: bool, worker: dict[str, Any],
                 say: Any = print) -> None:
        self.log_dir = log_dir
        self.smoke = smoke
        self.worker = worker
        self.say = say
        self.events = 60 if smoke else 1000
        self.chain = 20 if smoke else CHAIN
        self.memory_events = 500 if smoke else 20_000

    def run(self) -> dict[str, Any]:
        redis = RedisServer("everysec", self.log_dir, name="redis-ordering")
        sinks = Sinks(2, self.log_dir)
        try:
            return {"throughput": self.throughput(redis, sinks),
                    "chain": self.chain_phase(redis, sinks),
                    "memory": self.memory(redis, sinks)}
        finally:
            sinks.stop()
            redis.stop()

    def _hub(self, redis: RedisServer, sinks: Sinks, name: str, subscribers: int, ordered: int,
             worker: bool = True) -> tuple[Path, Ingress, Any]:
        port = free_port()
        config = write_config(self.log_dir / f"{name}.yaml", redis.url, port,
                              [sinks.url(i) for i in range(subscribers)], ordered, self.worker)
        ingress = Ingress(config, port, self.log_dir, name=f"{name}-ingress")
        proc = relay_proc(f"{name}-worker", config, "worker", self.log_dir) if worker else None
        if proc is not None:
            # Its heartbeat is written once Celery has started its consumer.
            with contextlib.closing(redis.client()) as c:
                c.delete("relay:workers")
                wait_until(lambda: c.zcard("relay:workers") > 0 and proc.alive(), 60,
                           "worker heartbeat")
        return config, ingress, proc

    def throughput(self, redis: RedisServer, sinks: Sinks) -> dict[str, Any]:
        with contextlib.closing(redis.client()) as c:
            c.flushall()
        config, ingress, worker = self._hub(redis, sinks, "ordering-fo10", SUBSCRIBERS, ORDERED)
        try:
            sinks.reset()
            sinks.record(True)
            events = [(f"ORDT{n:06d}", f"20-T{n:06d}") for n in range(self.events)]
            accepted = post_all(ingress.url, events, 16)
            sinks.wait_count(accepted * SUBSCRIBERS, 120)
            receipts = sinks.receipts()
        finally:
            if worker is not None:
                worker.stop(40)
            ingress.stop()
        groups: dict[str, list[float]] = {"ordered": [], "unordered": []}
        for _, path, at in receipts:
            index = int(path.rsplit("/", 1)[1])
            groups["ordered" if index < ORDERED else "unordered"].append(at)
        out: dict[str, Any] = {"events": self.events, "accepted": accepted,
                               "fanout": SUBSCRIBERS, "ordered_subscribers": ORDERED}
        for name, times in groups.items():
            span = max(times) - min(times) if len(times) > 1 else 0.0
            out[name] = {"deliveries": len(times), "seconds": round(span, 3),
                         "deliveries_per_s": round(len(times) / span, 1) if span else None}
        ordered, unordered = (out[g]["deliveries_per_s"] for g in ("ordered", "unordered"))
        out["ordered_vs_unordered"] = (round(ordered / unordered, 3)
                                       if ordered and unordered else None)
        self.say(f"ordering: fan-out 10, {self.events} distinct orders: ordered "
                 f"{ordered}/s, unordered {unordered}/s ({out['ordered_vs_unordered']} x)")
        return out

    def chain_phase(self, redis: RedisServer, sinks: Sinks) -> dict[str, Any]:
        with contextlib.closing(redis.client()) as c:
            c.flushall()
        config, ingress, worker = self._hub(redis, sinks, "ordering-chain", 1, 1)
        path = "/s/0"
        try:
            sinks.reset()
            for port in sinks.ports:
                http_post(f"http://127.0.0.1:{port}/_delay?path={path}&ms={CHAIN_LATENCY_MS}")
            self._relay(config, "subscribers", "pause", "s0")
            events = [(f"ORDC{n:04d}", "20-CHAIN") for n in range(self.chain)]
            accepted = post_all(ingress.url, events, 1)
            self._relay(config, "subscribers", "resume", "s0")
            sinks.wait_count(accepted, 120)
            time.sleep(0.2)
            answers = []
            for port in sinks.ports:
                answers += json.loads(http_get(f"http://127.0.0.1:{port}/_answers"))
        finally:
            if worker is not None:
                worker.stop(40)
            ingress.stop()
        answers.sort(key=lambda a: a[2])
        order = [a[0] for a in answers]
        in_order = order == [e for e, _ in events][:len(order)]
        gaps = [(answers[i][2] - answers[i - 1][3]) * 1000 for i in range(1, len(answers))]
        whole = answers[-1][3] - answers[0][2] if answers else 0.0
        floor = len(answers) * CHAIN_LATENCY_MS / 1000
        out = {"events": self.chain, "accepted": accepted, "received": len(answers),
               "in_order": in_order, "sink_latency_ms": CHAIN_LATENCY_MS,
               "gap_ms": {"p50": round(statistics.median(gaps), 2) if gaps else None,
                          "p90": round(sorted(gaps)[int(0.9 * (len(gaps) - 1))], 2)
                          if gaps else None,
                          "max": round(max(gaps), 2) if gaps else None},
               "seconds": round(whole, 3), "floor_seconds": round(floor, 3),
               "whole_vs_floor": round(whole / floor, 3) if floor else None}
        self.say(f"ordering: one order of {self.chain}: next posted {out['gap_ms']['p50']} ms "
                 f"(p50) after the previous 2xx; {whole:.2f} s in all, "
                 f"{out['whole_vs_floor']} x {len(answers)} x the sink's latency")
        return out

    def memory(self, redis: RedisServer, sinks: Sinks) -> dict[str, Any]:
        used = {}
        for ordered in (1, 0):
            with contextlib.closing(redis.client()) as c:
                c.flushall()
                before = int(c.info("memory")["used_memory"])
            config, ingress, _ = self._hub(redis, sinks, f"ordering-mem{ordered}", 1, ordered,
                                           worker=False)
            try:
                events = [(f"ORDM{n:07d}", "20-MEM") for n in range(self.memory_events)]
                post_all(ingress.url, events, 16)
            finally:
                ingress.stop()
            with contextlib.closing(redis.client()) as c:
                used["ordered" if ordered else "unordered"] = (
                    int(c.info("memory")["used_memory"]) - before)
        per = (used["ordered"] - used["unordered"]) / self.memory_events
        out = {"events": self.memory_events, "used_bytes": used,
               "bytes_per_waiting_event": round(per, 1)}
        self.say(f"ordering: Redis memory per waiting event: {per:.0f} bytes (beyond the "
                 f"event's own {used['unordered'] / self.memory_events:.0f})")
        return out

    def _relay(self, config: Path, *args: str) -> None:
        import subprocess

        from bench.procs import ROOT, python_cmd

        subprocess.run(python_cmd("-m", "relay.ops.cli", "--config", str(config), *args), cwd=ROOT,
                       check=True, capture_output=True, timeout=60)
