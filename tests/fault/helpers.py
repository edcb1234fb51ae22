"""Shared fault helpers: a bounded load generator, loss/duplicate accounting, figures report.

Everything talks to 127.0.0.1 only and is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from relay.keys import Keys
from relay.signatures import sign_ingram
from tests.hub import INGRESS_SECRET, Sink, event_body

REPORT_ENV = "RELAY_FAULT_REPORT"
KEYS = Keys()


# --- figures -------------------------------------------------------------------------------


class FigureReport:
    """Each ``record(**figures)`` prints one JSON line and appends it to
    ``<tmp_path>/fault-report.jsonl`` and, if set, to the file named by ``$RELAY_FAULT_REPORT``.
    """

    def __init__(self, test: str, tmp_path: Path) -> None:
        self.test = test
        self.path = tmp_path / "fault-report.jsonl"

    def record(self, **figures: Any) -> dict[str, Any]:
        entry = {"test": self.test, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures}
        line = json.dumps(entry, sort_keys=False, default=str)
        print(f"\nFAULT-FIGURES {line}")
        targets = [self.path]
        if os.environ.get(REPORT_ENV):
            targets.append(Path(os.environ[REPORT_ENV]))
        for target in targets:
            with open(target, "a", encoding="utf-8") as out:
                out.write(line + "\n")
        return entry


# --- load generator ------------------------------------------------------------------------


@dataclass
class Answer:
    at: float           # monotonic time the answer arrived
    status: int         # 0: no HTTP answer (connection error, timeout)
    retry_after: str | None


@dataclass
class Load:
    """Posts signed events to ``url`` with bounded concurrency, optionally paced.

    ``answers[event_id]`` lists every answer that event got (a re-send appends).
    """

    url: str
    concurrency: int = 16
    rate: float | None = None           # events per second overall; None: as fast as answered
    timeout: float = 10.0
    secret: str = INGRESS_SECRET
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)   # wall time of the first send
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def run(self, bodies: dict[str, bytes]) -> Load:
        """Post every body (blocking)."""
        asyncio.run(self._run(bodies))
        return self

    def start(self, bodies: dict[str, bytes]) -> Load:
        """Post every body from a background thread; ``join()`` waits for the end."""
        def target() -> None:
            try:
                self.run(bodies)
            except BaseException as exc:  # noqa: BLE001 - re-raised by join()
                self._error = exc

        self._thread = threading.Thread(target=target, name="fault-load", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float = 120.0) -> Load:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "load generator did not finish in time"
        if self._error is not None:
            raise self._error
        return self

    async def _run(self, bodies: dict[str, bytes]) -> None:
        queue: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
        for i, (event_id, body) in enumerate(bodies.items()):
            queue.put_nowait((i, event_id, body))
        started = time.monotonic()
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def poster() -> None:
                while True:
                    try:
                        i, event_id, body = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    if self.rate:
                        pause = started + i / self.rate - time.monotonic()
                        if pause > 0:
                            await asyncio.sleep(pause)
                    await self._post(session, event_id, body)

            await asyncio.gather(*(poster() for _ in range(self.concurrency)))

    async def _post(self, session: aiohttp.ClientSession, event_id: str, body: bytes) -> None:
        headers = {"Content-Type": "application/json",
                   "X-Hub-Signature": sign_ingram(self.secret, event_id)}
        self.sent_at.setdefault(event_id, time.time())
        try:
            async with session.post(self.url, data=body, headers=headers) as resp:
                await resp.read()
                answer = Answer(time.monotonic(), resp.status, resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, OSError, TimeoutError):
            answer = Answer(time.monotonic(), 0, None)
        self.answers.setdefault(event_id, []).append(answer)

    # -- what came back ---------------------------------------------------------------------

    @property
    def accepted(self) -> set[str]:
        """Events that got a 2xx at least once: each must be delivered."""
        return {e for e, answers in self.answers.items()
                if any(200 <= a.status < 300 for a in answers)}

    @property
    def refused(self) -> set[str]:
        """Events that never got a 2xx (may be re-sent)."""
        return set(self.answers) - self.accepted

    def statuses(self) -> Counter[int]:
        return Counter(a.status for answers in self.answers.values() for a in answers)

    def unavailable_without_retry_after(self) -> int:
        return sum(1 for answers in self.answers.values() for a in answers
                   if a.status == 503 and not a.retry_after)


def bodies(prefix: str, count: int, topic_of: Callable[[int], str] | None = None
           ) -> dict[str, bytes]:
    """``count`` distinct valid envelopes, ids ``{prefix}{i:05d}``."""
    out = {}
    for i in range(count):
        event_id = f"{prefix}{i:05d}"
        topic = topic_of(i) if topic_of else "resellers/orders"
        event_type = "im::order_shipped" if topic == "resellers/orders" else "im::stock_update"
        out[event_id] = event_body(event_id, event_type=event_type, topic=topic)
    return out


def send_orders_in_turn(urls: list[str], orders: dict[str, list[tuple[str, bytes]]],
                        give_up_after: float = 60.0) -> dict[str, list[str]]:
    """As Ingram sends an order's events: one after another, each sent again (after a short
    pause) until it is answered 2xx before the next is sent; the orders concurrently, one
    thread each, each event to the next of ``urls`` in turn. Returns, per order, the event
    ids in the order they were accepted."""
    import urllib.error
    import urllib.request

    accepted: dict[str, list[str]] = {order: [] for order in orders}

    def post(url: str, event_id: str, body: bytes) -> int:
        req = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json",
            "X-Hub-Signature": sign_ingram(INGRESS_SECRET, event_id)})
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def run(order: str, events: list[tuple[str, bytes]]) -> None:
        deadline = time.monotonic() + give_up_after
        turn = 0
        for event_id, body in events:
            while time.monotonic() < deadline:
                status = post(urls[turn % len(urls)], event_id, body)
                turn += 1
                if 200 <= status < 300:
                    accepted[order].append(event_id)
                    break
                time.sleep(0.2)

    threads = [threading.Thread(target=run, args=(o, e), daemon=True) for o, e in orders.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(give_up_after + 30)
    return accepted


def assert_each_order_in_order(sink: Sink, path: str, accepted: dict[str, list[str]]) -> None:
    """Per order: no event reached ``path`` before the one accepted ahead of it had been
    answered (the sink answers 2xx), and none came again after a later one."""
    got = sorted(sink.on(path), key=lambda r: r.arrived)
    for order, expected in accepted.items():
        position = {e: i for i, e in enumerate(expected)}
        receipts = [r for r in got if r.event_id in position]
        answered: dict[str, float] = {}
        for r in receipts:
            earlier = expected[:position[r.event_id]]
            assert all(e in answered and answered[e] <= r.arrived for e in earlier), (
                f"order {order}: {r.event_id} posted before an earlier event was delivered: "
                f"{[x.event_id for x in receipts]}")
            later = expected[position[r.event_id] + 1:]
            assert not any(e in answered for e in later), (
                f"order {order}: {r.event_id} posted again after a later event: "
                f"{[x.event_id for x in receipts]}")
            answered.setdefault(r.event_id, r.at)


# --- loss and duplicate accounting ---------------------------------------------------------


@dataclass
class Accounting:
    expected: int
    delivered: int          # distinct (path, event) pairs received that were expected
    lost: list[tuple[str, str]]
    duplicates: int         # receipts beyond the first of an expected pair
    unexpected: list[tuple[str, str]]   # receipts for a pair that was never expected

    @property
    def duplicate_rate(self) -> float:
        return self.duplicates / self.expected if self.expected else 0.0

    def figures(self) -> dict[str, Any]:
        return {"expected": self.expected, "delivered": self.delivered,
                "lost": len(self.lost), "duplicates": self.duplicates,
                "duplicate_pct": round(100 * self.duplicate_rate, 3),
                "unexpected": len(self.unexpected)}


def receipts(sink: Sink) -> Counter[tuple[str, str]]:
    """How many times each (path, eventId) reached the sink."""
    with sink._lock:  # noqa: SLF001 - a snapshot under the sink's own lock
        received = list(sink.received)
    return Counter((r.path, r.event_id) for r in received)


def account(sink: Sink, expected: Iterable[tuple[str, str]]) -> Accounting:
    """Lost, duplicated and unexpected receipts on the paths that occur in ``expected``."""
    want = set(expected)
    paths = {path for path, _ in want}
    got = Counter({pair: n for pair, n in receipts(sink).items() if pair[0] in paths})
    lost = sorted(want - set(got))
    duplicates = sum(n - 1 for pair, n in got.items() if pair in want and n > 1)
    unexpected = sorted(pair for pair in got if pair not in want)
    return Accounting(len(want), len(want) - len(lost), lost, duplicates, unexpected)


def wait_delivered(sink: Sink, expected: Iterable[tuple[str, str]], timeout: float) -> float:
    """Wait until every expected pair was received (or ``timeout``); returns seconds waited."""
    want = set(expected)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not want - set(receipts(sink)):
            break
        time.sleep(0.1)
    return time.monotonic() - start


def backlog(client: redis.Redis) -> dict[str, int]:
    """Work still owed: the schedule, the Celery queue, queued messages no worker has taken
    yet, Celery's unacknowledged messages."""
    return {"schedule": int(client.zcard(KEYS.schedule)),
            "queue": int(client.llen(KEYS.queue)),
            "unclaimed": int(client.zcard(KEYS.unclaimed)),
            "unacked": int(client.hlen("unacked"))}


def wait_quiet(client: redis.Redis, timeout: float) -> dict[str, int]:
    """Wait until nothing is owed (see ``backlog``); returns the last backlog seen."""
    deadline = time.monotonic() + timeout
    while True:
        left = backlog(client)
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def latency_figures(latencies: list[float]) -> dict[str, float]:
    return {"n": len(latencies),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * percentile(latencies, 95), 1),
            "max_ms": round(1000 * max(latencies), 1)}


# --- processes -----------------------------------------------------------------------------


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process started by ``tests.support.process`` and all its children."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def attempt_log(client: redis.Redis, event_id: str, subscriber: str) -> list[Any]:
    """The attempt records of one delivery, oldest first (relay/models.py's Attempt)."""
    import msgspec

    from relay.models import Attempt

    raw = client.lrange(KEYS.log(event_id, subscriber), 0, -1)
    return [msgspec.msgpack.decode(r, type=Attempt) for r in reversed(raw)]


# --- the ingress in this process -----------------------------------------------------------


