"""The admin API (docs/admin-api.md) against a real hub: a ``relay worker`` subprocess on the
private Redis, the admin app served on a free port, recording sinks.

One hub serves the whole module (starting a worker costs seconds); each test routes its events
to subscribers of its own (by event type), so tests neither see nor disturb each other's
deliveries. The hub uses its own key prefix, so nothing another module left in Redis shows.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.config import load_config
from relay.errors import ConfigError
from relay.keys import Keys
from tests.hub import (
    LiveAdmin,
    Reply,
    Sink,
    call,
    enqueue_event,
    enqueue_events,
    order_event,
    plant_expired_letters,
    worker,
    write_config,
)
from tests.support import ROOT, RedisServer, relay_cmd, wait_until

PREFIX = "admapi:"
TOKEN = "admin-token-for-tests"
FAST = {"initial": "50ms", "max": "100ms"}
ISO_MS = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"


def subscribers(sink: Sink) -> list[dict[str, Any]]:
    """Every test's subscribers; ``t::<group>`` routes an event to one group."""

    def sub(name: str, group: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "url": sink.url(f"/{name}"), "secret": "s",
                "event_types": [f"t::{group}"], **extra}

    return [
        sub("tl-ok", "timeline"),
        # Answers 503 with Retry-After 120: stays "retrying", its next attempt known.
        sub("tl-retry", "timeline", max_attempts=3, backoff={"initial": "1s", "max": "5m"}),
        sub("tl-dead", "timeline", max_attempts=2),
        sub("se-ok", "search"),
        {**sub("ta-ok", "tally"), "url": f"http://ops:hunter2@127.0.0.1:{sink.port}/ta-ok"},
        sub("ta-flaky", "tally", max_attempts=3),
        sub("ta-dead", "tally", max_attempts=2),
        sub("pa", "pause"),
        sub("rp", "replay", max_attempts=1),
        sub("pu", "purge", max_attempts=1),
        sub("rs", "resend"),
        sub("st", "stats"),
        sub("me", "metrics"),
        sub("or-ok", "order"),
        sub("or-dead", "order", max_attempts=1),
        sub("fa-bad", "failing", max_attempts=1),
        sub("rq", "replayq", max_attempts=1),
        sub("pg", "paging"),
        # Its posts last 3 s: a window of three in-flight reports (one a second) on a busy box.
        sub("sl", "slow", timeout="10s"),
    ]


class Hub:
    """The module's hub: config, worker(s), the admin app and the sink."""

    def __init__(self, redis_server: RedisServer, tmp: Path) -> None:
        self.tmp = tmp
        self.sink = Sink().start()
        self.sink.behave("/tl-retry", lambda n: Reply(503, {"Retry-After": "120"}))
        for path in ("/tl-dead", "/ta-dead", "/rp", "/pu", "/or-dead", "/fa-bad", "/rq"):
            self.sink.behave(path, lambda n: Reply(500))
        self.sink.behave_per_event("/ta-flaky", lambda event, n: Reply(500 if n == 1 else 200))
        self.sink.behave("/sl", lambda n: Reply(200, delay=3.0))
        self.path = write_config(tmp / "relay.yaml", redis_server.url, subscribers(self.sink),
                                 delivery={"timeout": "2s", "max_attempts": 5, "backoff": FAST},
                                 redis={"prefix": PREFIX}, admin={"token": TOKEN})
        self.config = load_config(self.path)
        self.redis = redis_server.client()
        self.keys = Keys.of(self.config)
        self._workers: dict[int, contextlib.ExitStack] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Hub:
        self.start_worker()
        self.admin = self._stack.enter_context(LiveAdmin(self.config))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        for stack in list(self._workers.values()):
            stack.close()
        self.sink.stop()
        self.redis.close()

    def start_worker(self) -> subprocess.Popen[bytes]:
        stack = contextlib.ExitStack()
        proc = stack.enter_context(worker(self.path, self.tmp / f"worker{len(self._workers)}.log"))
        self._workers[proc.pid] = stack
        return proc

    def stop_worker(self, pid: int) -> None:
        self._workers.pop(pid).close()

    @property
    def worker_pids(self) -> list[int]:
        return list(self._workers)

    def api(self, method: str, path: str, body: Any = None, token: str | None = TOKEN
            ) -> tuple[int, Any]:
        status, _, data = call(self.admin.url + path, method, body, token)
        return status, data

    def get(self, path: str) -> Any:
        status, data = self.api("GET", path)
        assert status == 200, (path, status, data)
        return data

    def send(self, event_id: str, group: str, orders: tuple[str, ...] = ("20-X",)) -> str:
        return enqueue_event(self.redis, order_event(event_id, f"t::{group}", orders), PREFIX)

    def event(self, event_id: str) -> dict[str, Any]:
        return self.get(f"/api/events/{event_id}")

    def lanes(self, event_id: str) -> dict[str, dict[str, Any]]:
        return {d["subscriber"]: d for d in self.event(event_id)["deliveries"]}

    def wait_states(self, event_id: str, want: dict[str, str], timeout: float = 15) -> dict:
        def settled() -> dict | None:
            lanes = self.lanes(event_id)
            got = {name: lane["state"] for name, lane in lanes.items()}
            return lanes if got == want else None

        return wait_until(settled, timeout, 0.05, what=f"{event_id} states {want}")

    def subscriber(self, name: str) -> dict[str, Any]:
        return next(s for s in self.get("/api/subscribers") if s["name"] == name)

    def dlq(self, query: str) -> dict[str, Any]:
        return self.get(f"/api/dlq?{query}")


@pytest.fixture(scope="module")
def hub(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    with Hub(redis_server, tmp_path_factory.mktemp("admin-api")) as h:
        yield h


def attempts(lane: dict[str, Any]) -> list[tuple[int, int | None]]:
    return [(a["attempt"], a["status"]) for a in lane["attempts"]]


# -- events ------------------------------------------------------------------------------------


def test_event_timeline_shows_each_subscribers_state_and_attempts(hub: Hub) -> None:
    hub.send("EV-TL-1", "timeline", ("20-TL001",))
    lanes = hub.wait_states("EV-TL-1", {"tl-ok": "delivered", "tl-retry": "retrying",
                                        "tl-dead": "dead"})
    detail = hub.event("EV-TL-1")
    assert detail["eventId"] == "EV-TL-1"
    assert detail["topic"] == "resellers/orders"
    assert detail["eventTypes"] == ["t::timeline"]
    assert detail["orderNumbers"] == ["20-TL001"]
    assert detail["receivedAt"] is not None
    assert msgspec.json.decode(order_event("EV-TL-1", "t::timeline", ("20-TL001",))) \
        == detail["body"]
    assert detail["bodyExpired"] is False
    assert [d["subscriber"] for d in detail["deliveries"]] == ["tl-ok", "tl-retry", "tl-dead"]

    ok, retry, dead = lanes["tl-ok"], lanes["tl-retry"], lanes["tl-dead"]
    assert attempts(ok) == [(1, 200)]
    assert ok["configured"] is True and ok["nextAttemptAt"] is None and ok["deadReason"] is None
    assert ok["attempts"][0]["error"] is None and ok["attempts"][0]["latencyMs"] >= 0

    assert attempts(retry) == [(1, 503)]
    assert retry["deadReason"] is None
    # The next attempt is when the subscriber's Retry-After said (120 s after the attempt).
    from relay.timefmt import parse_time

    gap = parse_time(retry["nextAttemptAt"]) - parse_time(retry["attempts"][0]["at"])
    assert 119 <= gap <= 121, retry

    assert attempts(dead) == [(1, 500), (2, 500)]
    assert dead["deadReason"] == "2 attempts failed"
    assert dead["nextAttemptAt"] is None
    for lane in (ok, retry, dead):
        for a in lane["attempts"]:
            assert a["at"].endswith("Z") and len(a["at"]) == len("2026-12-02T16:24:59.123Z")

    status, missing = hub.api("GET", "/api/events/EV-NEVER-SENT")
    assert status == 404 and "EV-NEVER-SENT" in missing["error"]


def test_events_are_found_by_order_number_filtered_and_paged_with_the_cursor(hub: Hub) -> None:
    since = time.time() - 0.01
    for event_id, orders in (("EV-SE-1", ("20-SE001",)), ("EV-SE-2", ("20-SE001", "20-SE002")),
                             ("EV-SE-3", ("20-SE002",))):
        hub.send(event_id, "search", orders)
        time.sleep(0.01)  # distinct receive times: "newest first" is then one order
    until = time.time()
    for event_id in ("EV-SE-1", "EV-SE-2", "EV-SE-3"):
        hub.wait_states(event_id, {"se-ok": "delivered"})

    def ids(query: str) -> tuple[list[str], str | None]:
        page = hub.get(f"/api/events?{query}")
        return [e["eventId"] for e in page["events"]], page["next"]

    assert ids("order=20-SE001") == (["EV-SE-2", "EV-SE-1"], None)
    assert ids("order=20-SE002") == (["EV-SE-3", "EV-SE-2"], None)
    assert ids("order=20-NOSUCH") == ([], None)
    summary = hub.get("/api/events?order=20-SE002&limit=1")["events"][0]
    assert summary == {"eventId": "EV-SE-3", "topic": "resellers/orders",
                       "eventTypes": ["t::search"], "orderNumbers": ["20-SE002"],
                       "receivedAt": summary["receivedAt"], "states": {"se-ok": "delivered"}}

    # A time window holds exactly this test's three events; two per page, then the rest.
    window = f"since={since:.3f}&until={until:.3f}"
    first, cursor = ids(f"{window}&limit=2")
    assert first == ["EV-SE-3", "EV-SE-2"] and cursor
    second, last = ids(f"{window}&limit=2&cursor={cursor}")
    assert second == ["EV-SE-1"] and last is None

    # subscriber + state, and state alone (the timeline test left one dead, one retrying).
    assert ids("subscriber=se-ok&state=delivered&order=20-SE001")[0] == ["EV-SE-2", "EV-SE-1"]
    assert ids("subscriber=se-ok&state=dead")[0] == []
    hub.send("EV-TL-S", "timeline")
    hub.wait_states("EV-TL-S", {"tl-ok": "delivered", "tl-retry": "retrying", "tl-dead": "dead"})
    assert ids("subscriber=tl-dead&state=dead&limit=1")[0] == ["EV-TL-S"]
    assert "EV-TL-S" in ids("state=retrying")[0]
    assert "EV-SE-1" not in ids("state=retrying")[0]

    status, error = hub.api("GET", "/api/events?state=lost")
    assert status == 400 and "state" in error["error"]
    status, error = hub.api("GET", "/api/events?limit=501")
    assert status == 400 and "limit" in error["error"]
    status, error = hub.api("GET", "/api/events?since=yesterday")
    assert status == 400 and "since" in error["error"]


def test_the_events_cursor_keeps_its_place_while_events_arrive_and_expire(hub: Hub) -> None:
    # Five events stored in one batch share their receive time to the millisecond: the
    # cursor orders them by ID as well.
    ids = enqueue_events(hub.redis, [order_event(f"EV-PG-{n}", "t::paging", ("20-PG001",))
                                     for n in range(5)], PREFIX)
    for event_id in ids:
        hub.wait_states(event_id, {"pg": "delivered"})

    def page(cursor: str = "") -> tuple[list[str], str | None]:
        got = hub.get(f"/api/events?order=20-PG001&limit=2&cursor={quote(cursor)}")
        return [e["eventId"] for e in got["events"]], got["next"]

    first, cursor = page()
    assert len(first) == 2 and cursor
    # Between pages: a newer event arrives, and those already shown expire from the index.
    hub.send("EV-PG-NEW", "paging", ("20-PG001",))
    hub.redis.zrem(hub.keys.order("20-PG001"), *first)
    second, cursor = page(cursor)
    assert cursor
    third, last = page(cursor)
    assert last is None
    assert first + second + third == sorted(ids, reverse=True)  # each once, none skipped
    status, error = hub.api("GET", "/api/events?cursor=nonsense")
    assert status == 400 and "cursor" in error["error"]


def test_an_order_lists_its_events_oldest_first_with_each_subscribers_state(hub: Hub) -> None:
    hub.send("EV-OR-1", "order", ("20-OR001",))
    time.sleep(0.01)
    hub.send("EV-OR-2", "order", ("20-OR002", "20-OR001"))
    for event_id in ("EV-OR-1", "EV-OR-2"):
        hub.wait_states(event_id, {"or-ok": "delivered", "or-dead": "dead"})
    order = hub.get("/api/orders/20-OR001")
    assert order["orderNumber"] == "20-OR001" and order["ordering"] == []
    assert [e["eventId"] for e in order["events"]] == ["EV-OR-1", "EV-OR-2"]
    first = order["events"][0]
    assert first["eventTypes"] == ["t::order"] and first["receivedAt"].endswith("Z")
    assert first["states"] == {"or-ok": "delivered", "or-dead": "dead"}
    assert [e["eventId"] for e in hub.get("/api/orders/20-OR002")["events"]] == ["EV-OR-2"]
    status, missing = hub.api("GET", "/api/orders/20-NOSUCH")
    assert status == 404 and "20-NOSUCH" in missing["error"]


# -- subscribers -------------------------------------------------------------------------------


def test_subscribers_report_last_hour_counts_dead_letters_and_masked_urls(hub: Hub) -> None:
    for n in (1, 2, 3):
        hub.send(f"EV-TA-{n}", "tally")
    for n in (1, 2, 3):
        hub.wait_states(f"EV-TA-{n}", {"ta-ok": "delivered", "ta-flaky": "delivered",
                                       "ta-dead": "dead"})

    def counted() -> dict[str, Any] | None:
        # Each worker process writes its counters once a second (workers/tally.py).
        rows = {s["name"]: s for s in hub.get("/api/subscribers")}
        tallies = [(rows[n]["delivered"], rows[n]["failed"], rows[n]["deadLettered"])
                   for n in ("ta-ok", "ta-flaky", "ta-dead")]
        return rows if tallies == [(3, 0, 0), (3, 3, 0), (0, 6, 3)] else None

    rows = wait_until(counted, 10, what="the counters of 9 outcomes")
    assert set(rows) == {s["name"] for s in subscribers(hub.sink)}

    ok, flaky, dead = rows["ta-ok"], rows["ta-flaky"], rows["ta-dead"]
    assert ok["url"] == f"http://ops:***@127.0.0.1:{hub.sink.port}/ta-ok"
    assert (ok["delivered"], ok["failed"], ok["deadLettered"], ok["deadLetters"]) == (3, 0, 0, 0)
    assert ok["successRate"] == 1.0 and ok["lastError"] is None
    assert ok["lastSuccessAt"] is not None and ok["latencyP50Ms"] is not None
    assert (flaky["delivered"], flaky["failed"], flaky["successRate"]) == (3, 3, 0.5)
    assert flaky["lastError"] == "HTTP 500" and flaky["lastErrorAt"] is not None
    assert (dead["delivered"], dead["failed"], dead["deadLettered"], dead["deadLetters"]) \
        == (0, 6, 3, 3)
    assert dead["successRate"] == 0.0
    for row in (ok, flaky, dead):
        assert row["state"] == "active" and row["configured"] is True
        assert row["pending"] == 0 and row["oldestPendingSeconds"] is None
        assert row["signature"] == "ingram" and row["rateLimit"] is None
    # The timeline test's 503 answers keep one delivery of tl-retry pending.
    assert rows["tl-retry"]["pending"] >= 1 and rows["tl-retry"]["oldestPendingSeconds"] >= 0


def test_attempts_in_flight_are_pending_though_only_their_workers_count_them(hub: Hub) -> None:
    """A fan-out's first attempts, posted at once, have no note in pending:{sub} (a write
    and a delete per delivery): their worker counts them every second, and the admin adds
    them to the noted ones."""
    for n in (1, 2, 3):
        hub.send(f"EV-SL-{n}", "slow")

    def row() -> dict[str, Any]:
        return next(s for s in hub.get("/api/subscribers") if s["name"] == "sl")

    during = wait_until(lambda: (r := row())["pending"] == 3 and r, 10,
                        what="three attempts in flight counted pending")
    assert during["oldestPendingSeconds"] >= 0
    assert hub.redis.zcard(hub.keys.pending("sl")) == 0
    hub.sink.wait_for("/sl", 3)
    for n in (1, 2, 3):
        hub.wait_states(f"EV-SL-{n}", {"sl": "delivered"})
    after = wait_until(lambda: (r := row())["pending"] == 0 and r, 10, what="none pending")
    assert after["oldestPendingSeconds"] is None
    assert hub.redis.zcard(hub.keys.pending("sl")) == 0


def test_pause_holds_deliveries_and_resume_delivers_them(hub: Hub) -> None:
    status, row = hub.api("POST", "/api/subscribers/pa/pause")
    assert status == 200 and row["name"] == "pa" and row["state"] == "paused"
    listed = hub.get("/api/subscribers")
    assert listed[0]["name"] == "pa"  # unhealthy first: the only paused one leads
    assert hub.get("/api/overview")["status"] in ("healthy", "degraded")

    hub.send("EV-PA-1", "pause")
    hub.wait_states("EV-PA-1", {"pa": "paused"})
    wait_until(lambda: hub.redis.zcard(hub.keys.held("pa")) == 1, 10, what="a held attempt")
    time.sleep(0.3)
    assert hub.sink.on("/pa") == []  # nothing posted while paused
    assert hub.lanes("EV-PA-1")["pa"]["attempts"] == []
    # Listings say "paused" too, as the event's page does (and find it by that state).
    found = hub.get("/api/events?subscriber=pa&state=paused")["events"]
    assert [(e["eventId"], e["states"]) for e in found] == [("EV-PA-1", {"pa": "paused"})]

    # Resumed within a second of the worker holding the attempt (while its gate's cached
    # "paused" verdict is still fresh): the released attempt must not be held again.
    status, row = hub.api("POST", "/api/subscribers/pa/resume")
    assert status == 200 and row["state"] == "active"
    hub.sink.wait_for("/pa", 1, timeout=10)
    lane = hub.wait_states("EV-PA-1", {"pa": "delivered"})["pa"]
    assert attempts(lane) == [(1, 200)]  # the held attempt was not counted as one

    status, error = hub.api("POST", "/api/subscribers/nosuch/pause")
    assert status == 404 and "nosuch" in error["error"]
    status, error = hub.api("GET", "/api/subscribers/pa/pause")
    assert status == 405 and "error" in error


# -- dead letters --------------------------------------------------------------------------


def test_replay_dry_run_then_real_with_limit_and_unconfigured_subscriber_refused(
        hub: Hub) -> None:
    events = [hub.send(f"EV-RP-{n}", "replay", (f"20-RP00{n}",)) for n in (1, 2, 3)]
    for event_id in events:
        hub.wait_states(event_id, {"rp": "dead"})
    before = hub.dlq("subscriber=rp")
    assert before["total"] == 3 and before["next"] is None
    letter = next(d for d in before["deadLetters"] if d["eventId"] == "EV-RP-1")
    assert letter == {"eventId": "EV-RP-1", "subscriber": "rp", "configured": True,
                      "reason": "1 attempt failed", "deadAt": letter["deadAt"], "attempts": 1,
                      "lastError": "HTTP 500", "orderNumbers": ["20-RP001"]}
    assert [d["eventId"] for d in hub.dlq("subscriber=rp&limit=2")["deadLetters"]] \
        == ["EV-RP-3", "EV-RP-2"]  # newest first
    assert hub.dlq("subscriber=rp&limit=2")["next"] == "2"
    assert [d["eventId"] for d in hub.dlq("subscriber=rp&limit=2&cursor=2")["deadLetters"]] \
        == ["EV-RP-1"]

    # A subscriber that is not configured: 404, and nothing changes.
    status, error = hub.api("POST", "/api/replay", {"subscriber": "nosuch"})
    assert status == 404 and "not configured" in error["error"]
    assert hub.dlq("subscriber=rp") == before
    assert len(hub.sink.on("/rp")) == 3

    hub.sink.behave("/rp", lambda n: Reply(200))  # the subscriber is fixed
    status, dry = hub.api("POST", "/api/replay", {"subscriber": "rp", "dryRun": True})
    assert status == 200
    assert (dry["matched"], dry["replayed"], dry["remaining"]) == (3, 0, 3)
    time.sleep(0.3)
    assert hub.dlq("subscriber=rp") == before and len(hub.sink.on("/rp")) == 3

    status, one = hub.api("POST", "/api/replay", {"event": "EV-RP-2", "subscriber": "rp"})
    assert (one["matched"], one["replayed"], one["remaining"]) == (1, 1, 0)
    status, step = hub.api("POST", "/api/replay", {"subscriber": "rp", "limit": 1})
    assert (step["matched"], step["replayed"], step["remaining"]) == (2, 1, 1)
    status, rest = hub.api("POST", "/api/replay", {"subscriber": "rp", "limit": 5})
    assert (rest["matched"], rest["replayed"], rest["remaining"]) == (1, 1, 0)

    got = hub.sink.wait_for("/rp", 6, timeout=15)
    assert sorted(r.event_id for r in got[3:]) == events
    for event_id in events:
        lane = hub.wait_states(event_id, {"rp": "delivered"})["rp"]
        assert attempts(lane) == [(1, 500), (1, 200)]  # a fresh first attempt after the history
    assert hub.dlq("subscriber=rp")["total"] == 0

    status, error = hub.api("POST", "/api/replay", {"subscriber": "rp", "limit": 0})
    assert status == 400 and "limit" in error["error"]
    status, error = hub.api("POST", "/api/replay", b"not json")
    assert status == 400 and "JSON" in error["error"]


def test_replay_in_steps_passes_letters_that_cannot_be_replayed_once(hub: Hub) -> None:
    events = [hub.send(f"EV-RQ-{n}", "replayq") for n in (1, 2)]
    for event_id in events:
        hub.wait_states(event_id, {"rq": "dead"})
    expired = plant_expired_letters(hub.redis, PREFIX, "rq", 5)  # newer: listed first
    hub.sink.behave("/rq", lambda n: Reply(200))
    steps, after = [], None
    while True:
        status, step = hub.api("POST", "/api/replay", {"subscriber": "rq", "limit": 3,
                                                       **({"after": after} if after else {})})
        assert status == 200, step
        steps.append((step["replayed"], step["failed"], step["remaining"]))
        after = step["next"]
        if not after:
            break
    # 5 that cannot be replayed (newest), then the 2 that can: each letter is tried once.
    assert steps == [(0, 3, 4), (1, 2, 1), (1, 0, 0)]
    got = hub.sink.wait_for("/rq", 4)
    assert sorted(r.event_id for r in got[2:]) == events
    assert {d["eventId"] for d in hub.dlq("subscriber=rq")["deadLetters"]} == set(expired)
    status, error = hub.api("POST", "/api/replay", {"subscriber": "rq", "after": "x"})
    assert status == 400 and "after" in error["error"]


def test_delete_dlq_dry_run_then_by_event_and_by_subscriber(hub: Hub) -> None:
    events = [hub.send(f"EV-PU-{n}", "purge") for n in (1, 2, 3)]
    for event_id in events:
        hub.wait_states(event_id, {"pu": "dead"})
    assert hub.dlq("subscriber=pu")["total"] == 3

    status, dry = hub.api("DELETE", "/api/dlq", {"subscriber": "pu", "dryRun": True})
    assert status == 200 and dry == {"matched": 3, "deleted": 0}
    assert hub.dlq("subscriber=pu")["total"] == 3

    status, one = hub.api("DELETE", "/api/dlq?subscriber=pu&event=EV-PU-2")  # query string
    assert status == 200 and one == {"matched": 1, "deleted": 1}
    assert {d["eventId"] for d in hub.dlq("subscriber=pu")["deadLetters"]} \
        == {"EV-PU-1", "EV-PU-3"}

    status, rest = hub.api("DELETE", "/api/dlq", {"subscriber": "pu"})
    assert status == 200 and rest == {"matched": 2, "deleted": 2}
    assert hub.dlq("subscriber=pu")["total"] == 0
    for event_id in events:
        assert not hub.redis.exists(hub.keys.letter("pu", event_id))
    time.sleep(0.3)
    assert len(hub.sink.on("/pu")) == 3  # purged, never delivered


def test_resend_delivers_a_delivered_event_again(hub: Hub) -> None:
    hub.send("EV-RS-1", "resend")
    hub.wait_states("EV-RS-1", {"rs": "delivered"})
    hub.sink.wait_for("/rs", 1)

    status, answer = hub.api("POST", "/api/events/EV-RS-1/resend")
    assert status == 200 and answer == {"queued": 1}
    hub.sink.wait_for("/rs", 2)
    status, answer = hub.api("POST", "/api/events/EV-RS-1/resend", {"subscriber": "rs"})
    assert status == 200 and answer == {"queued": 1}
    got = hub.sink.wait_for("/rs", 3)
    assert [r.event_id for r in got] == ["EV-RS-1"] * 3
    assert got[0].body == got[2].body
    wait_until(lambda: attempts(hub.lanes("EV-RS-1")["rs"]) == [(1, 200)] * 3, 10,
               what="three first attempts, all delivered")
    assert hub.lanes("EV-RS-1")["rs"]["state"] == "delivered"

    status, error = hub.api("POST", "/api/events/EV-RS-1/resend", {"subscriber": "nosuch"})
    assert status == 404 and "not configured" in error["error"]
    status, error = hub.api("POST", "/api/events/EV-NEVER-SENT/resend")
    assert status == 404 and "EV-NEVER-SENT" in error["error"]
    time.sleep(0.3)
    assert len(hub.sink.on("/rs")) == 3


# -- stats, metrics ------------------------------------------------------------------------


def test_stats_series_move_with_deliveries(hub: Hub) -> None:
    before = hub.get("/api/stats?minutes=5")
    assert before["minutes"] == 5 and len(before["t"]) == 5
    assert before["t"] == sorted(before["t"]) and before["t"][-1] <= time.time()
    assert before["subscribers"]["st"]["delivered"] == [0] * 5
    hub.send("EV-ST-1", "stats")
    hub.send("EV-ST-2", "stats")
    hub.sink.wait_for("/st", 2)
    wait_until(lambda: sum(hub.get("/api/stats?minutes=5")["subscribers"]["st"]["delivered"])
               == 2, 10, what="two deliveries in the series")
    after = hub.get("/api/stats?minutes=5")
    assert sum(after["accepted"]) >= sum(before["accepted"]) + 2
    assert sum(after["delivered"]) >= sum(before["delivered"]) + 2
    assert after["subscribers"]["st"]["failed"] == [0] * 5
    assert set(after) >= {"t", "accepted", "delivered", "failed", "deadLettered",
                          "backlogAgeSeconds", "subscribers"}
    assert len(hub.get("/api/stats")["t"]) == 60  # default: the last hour
    status, error = hub.api("GET", "/api/stats?minutes=0")
    assert status == 400 and "minutes" in error["error"]


def test_the_hub_is_degraded_while_a_subscriber_fails_every_attempt(hub: Hub) -> None:
    hub.send("EV-FA-1", "failing")
    hub.wait_states("EV-FA-1", {"fa-bad": "dead"})
    # The failures are counted within a second (workers/tally.py).
    overview = wait_until(lambda: "fa-bad" in (o := hub.get("/api/overview"))[
        "failingSubscribers"] and o, 10, what="fa-bad counted as failing")
    assert "fa-bad: every attempt failed in the last 5 min" in overview["reasons"]
    assert "fa-bad" in overview["failingSubscribers"]
    assert "tl-ok" not in overview["failingSubscribers"]  # it delivered
    assert "pa" not in overview["failingSubscribers"]  # no attempt at all


def test_metrics_count_deliveries_made_by_two_worker_processes(hub: Hub) -> None:
    """Two workers, one after the other: the first one's deliveries, counted in Redis, are
    still in the scrape after it has stopped; the second one's are added to them."""
    (first,) = hub.worker_pids  # the module's worker
    for n in (1, 2, 3):
        hub.send(f"EV-ME-{n}", "metrics")
    hub.sink.wait_for("/me", 3)
    second = hub.start_worker()
    hub.stop_worker(first)
    assert hub.worker_pids == [second.pid]
    for n in (4, 5):
        hub.send(f"EV-ME-{n}", "metrics")  # only the second worker is running now
    hub.sink.wait_for("/me", 5)
    wait_until(lambda: all(hub.lanes(f"EV-ME-{n}")["me"]["state"] == "delivered"
                           for n in range(1, 6)), 10, what="five delivery records")

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, headers, text = call(hub.admin.url + "/metrics", token=TOKEN)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    # Each worker process writes its counters once a second (workers/tally.py).
    delivered = ("relay_deliveries_total", (("outcome", "delivered"), ("subscriber", "me")))
    samples = wait_until(lambda: (got := scrape()).get(delivered) == 5 and got, 10,
                         what="five deliveries counted")

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("relay_deliveries_total", subscriber="me", outcome="delivered") \
        == len(hub.sink.on("/me")) == 5
    assert value("relay_deliveries_total", subscriber="me", outcome="failed") == 0
    assert value("relay_deliveries_total", subscriber="tl-dead", outcome="dead_lettered") >= 1
    assert value("relay_delivery_duration_seconds_bucket", subscriber="me", le="+Inf") == 5
    assert value("relay_delivery_duration_seconds_count", subscriber="me") == 5
    assert value("relay_subscriber_state", subscriber="me", state="active") == 1
    assert value("relay_subscriber_state", subscriber="me", state="paused") == 0
    assert value("relay_dead_letters", subscriber="tl-dead") >= 1
    assert value("relay_events_accepted_total") >= 5
    assert value("relay_workers_seen") >= 1
    for name in ("relay_queue_messages", "relay_retries_scheduled",
                 "relay_backlog_oldest_seconds"):
        assert (name, ()) in samples


# -- auth, errors, config ------------------------------------------------------------------


def test_token_auth_on_every_route_but_healthz_and_the_console_files(hub: Hub) -> None:
    url = hub.admin.url
    for token in (None, "wrong-token"):
        status, headers, error = call(url + "/api/overview", token=token)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert "token" in error["error"]
    assert call(url + "/metrics")[0] == 401
    assert call(url + "/api/replay", "POST", {"dryRun": True})[0] == 401
    status, _, overview = call(url + "/api/overview", token=TOKEN)
    assert status == 200 and overview["redis"]["reachable"] is True
    assert overview["workers"] and overview["status"] in ("healthy", "degraded")
    status, _, health = call(url + "/healthz")
    assert status == 200 and health == {"status": "ok"}
    status, headers, page = call(url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert 'type="module" src="static/js/main.js"' in page
    # ES modules, served without the token, as JavaScript (a module with another type is
    # refused by the browser).
    for module in ("main", "api", "dom", "charts", "overview", "events", "event", "order", "dlq"):
        status, headers, _ = call(url + f"/static/js/{module}.js")
        assert status == 200 and "javascript" in headers["Content-Type"], (module, headers)


def test_a_token_is_required_when_admin_host_is_not_loopback(tmp_path: Path) -> None:
    exposed = write_config(tmp_path / "exposed.yaml", "redis://127.0.0.1:1/0", [],
                           admin={"host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="admin.token"):
        load_config(exposed)
    out = subprocess.run(relay_cmd("--config", str(exposed), "check-config"), cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "admin.token" in out.stderr
    assert load_config(write_config(tmp_path / "ok.yaml", "redis://127.0.0.1:1/0", [],
                                    admin={"host": "0.0.0.0", "token": "t"})).admin.token == "t"
    # The config may be loopback-only while the command line binds elsewhere: refused too.
    loopback = write_config(tmp_path / "loop.yaml", "redis://127.0.0.1:1/0", [])
    out = subprocess.run(relay_cmd("--config", str(loopback), "admin", "--host", "0.0.0.0"),
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "admin.token is required" in out.stdout + out.stderr


def test_unknown_routes_and_wrong_methods_answer_json_errors(hub: Hub) -> None:
    status, headers, error = call(hub.admin.url + "/api/nope", token=TOKEN)
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert error == {"error": "no route GET /api/nope"}
    status, headers, error = call(hub.admin.url + "/api/subscribers", "PUT", {}, token=TOKEN)
    assert status == 405 and headers["Content-Type"].startswith("application/json")
    assert "not allowed" in error["error"] and "GET" in headers["Allow"]
    status, _, error = call(hub.admin.url + "/api/events/EV-TL-1", "DELETE", token=TOKEN)
    assert status == 405 and "error" in error


# -- retention -----------------------------------------------------------------------------


def test_dead_letters_expire_with_redis_retention(
        redis_server: RedisServer, tmp_path: Path, sink: Sink) -> None:
    """A hub of its own (another prefix): retention 3 s, a subscriber whose retry horizon
    fits in it (one attempt, 1 s timeout)."""
    prefix = "admret:"
    sink.behave("/short", lambda n: Reply(500))
    path = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "short", "url": sink.url("/short"), "secret": "s", "max_attempts": 1,
         "timeout": "1s"}], delivery={"timeout": "1s", "max_attempts": 1, "backoff": FAST},
        redis={"prefix": prefix, "retention": "3s"}, worker={"pool": "solo"},
        ingress={"dedupe_window": "3s"})
    config = load_config(path)
    client = redis_server.client()
    keys = Keys.of(config)
    with worker(path, tmp_path / "worker.log"), LiveAdmin(config) as admin:
        enqueue_event(client, order_event("EV-EXP-1", "t::any"), prefix)

        def dlq_total() -> int:
            status, _, page = call(admin.url + "/api/dlq")
            assert status == 200
            return int(page["total"])

        wait_until(lambda: dlq_total() == 1, 10, what="a dead letter")
        dead_at = time.time()
        assert client.exists(keys.letter("short", "EV-EXP-1"))
        assert 0 < client.ttl(keys.letter("short", "EV-EXP-1")) <= 3
        wait_until(lambda: dlq_total() == 0, 6, 0.1, what="the dead letter to expire")
        assert time.time() - dead_at >= 1.5  # expired with retention, not at once
        # The index entry and the letter expire together, give or take the milliseconds
        # between the worker's clock and the admin's.
        wait_until(lambda: not client.exists(keys.letter("short", "EV-EXP-1")), 1, 0.01,
                   what="the letter itself expired")
        assert not client.exists(keys.log("EV-EXP-1", "short"))
        assert client.zcard(keys.dead("short")) == 0  # the index entry went with it
        status, _, subs = call(admin.url + "/api/subscribers")
        assert subs[0]["name"] == "short" and subs[0]["deadLetters"] == 0
    client.close()

