"""Delivery end to end: ingress -> Redis -> real Celery worker -> real HTTP sinks."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

from relay.keys import Keys
from relay.queue import deliver_message, member
from relay.signatures import IngramSigner, StandardWebhook
from tests.hub import (
    STANDARD_SECRET,
    Reply,
    Sink,
    attempt_log,
    dead_letters,
    delivered,
    enqueue_event,
    enqueue_events,
    event_body,
    ingress,
    post,
    worker,
    write_config,
)
from tests.support import wait_until


def test_each_subscriber_receives_exact_bytes_signed_with_its_own_secret(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "erp secret: with # odd ]chars",
         "signature": "ingram"},
        {"name": "wms", "url": sink.url("/wms"), "secret": STANDARD_SECRET,
         "signature": "standard"},
        {"name": "crm", "url": sink.url("/crm"), "secret": STANDARD_SECRET,
         "signature": "both", "headers": {"Authorization": "Bearer t0k"}},
    ])
    body = event_body("EVSIGNED0001")
    with worker(config, tmp_path / "worker.log"), ingress(config, tmp_path / "ingress.log") as url:
        assert post(url, body)[0] == 202
        erp = sink.wait_for("/erp", 1)[0]
        wms = sink.wait_for("/wms", 1)[0]
        crm = sink.wait_for("/crm", 1)[0]
    for got in (erp, wms, crm):
        assert got.body == body
        assert got.headers["Content-Type"] == "application/json"
    IngramSigner(["erp secret: with # odd ]chars"]).verify("EVSIGNED0001",
                                                          erp.headers["X-Hub-Signature"])
    assert "webhook-signature" not in {k.lower() for k in erp.headers}
    StandardWebhook(STANDARD_SECRET).verify(wms.body, wms.headers)
    assert wms.headers["webhook-id"] == "msg_EVSIGNED0001"
    assert "X-Hub-Signature" not in wms.headers
    StandardWebhook(STANDARD_SECRET).verify(crm.body, crm.headers)
    IngramSigner([STANDARD_SECRET]).verify("EVSIGNED0001", crm.headers["X-Hub-Signature"])
    assert crm.headers["Authorization"] == "Bearer t0k"


def test_timeouts_refused_connections_and_dns_errors_are_retried(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    late = Sink()  # its port is free until it starts: connections are refused meanwhile
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "slow", "url": sink.url("/slow"), "secret": "s", "timeout": "1s"},
        {"name": "refused", "url": late.url("/late"), "secret": "s", "max_attempts": 30},
        {"name": "nodns", "url": "http://nonexistent.invalid/hook", "secret": "s"},
    ], delivery={"timeout": "2s", "max_attempts": 3,
                 "backoff": {"initial": "100ms", "max": "300ms"}})
    # The first request is answered after the subscriber's 1 s timeout; the next at once.
    sink.behave("/slow", lambda n: Reply(200, delay=2.0 if n == 1 else 0.0))
    try:
        with worker(config, tmp_path / "worker.log"):
            enqueue_event(redis_client, event_body("EVNETERR"))
            wait_until(lambda: len(attempt_log(redis_client, "EVNETERR", "refused")) >= 2, 15,
                       what="two refused attempts")
            late.start()
            got = late.wait_for("/late", 1, timeout=15)
            wait_until(lambda: ("EVNETERR", "nodns") in dead_letters(redis_client), 15,
                       what="DNS failures dead-lettered after max_attempts")
            sink.wait_for("/slow", 2, timeout=15)
            wait_until(lambda: delivered(redis_client, 'EVNETERR', "slow")
                       and delivered(redis_client, 'EVNETERR', "refused"), 10,
                       what="done markers")
    finally:
        late.stop()
    assert got[0].body == event_body("EVNETERR")
    refused = attempt_log(redis_client, "EVNETERR", "refused")
    assert {a.error for a in refused[:-1]} == {"connect"}
    assert all(a.status is None for a in refused[:-1])
    assert refused[-1].status == 200
    assert [a.attempt for a in refused] == list(range(1, len(refused) + 1))
    slow = attempt_log(redis_client, "EVNETERR", "slow")
    assert [(a.attempt, a.status, a.error) for a in slow] == [(1, None, "timeout"),
                                                             (2, 200, None)]
    assert 900 <= slow[0].latency_ms < 2000
    nodns = attempt_log(redis_client, "EVNETERR", "nodns")
    assert [(a.attempt, a.error) for a in nodns] == [(1, "dns"), (2, "dns"), (3, "dns")]
    assert dead_letters(redis_client)[("EVNETERR", "nodns")].reason == "3 attempts failed"


def test_redirects_are_not_followed_and_count_as_failures(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "moved", "url": sink.url("/old"), "secret": "s"},
    ], delivery={"timeout": "2s", "max_attempts": 2,
                 "backoff": {"initial": "50ms", "max": "100ms"}})
    sink.behave("/old", lambda n: Reply(302, {"Location": sink.url("/new")}))
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVREDIRECT"))
        wait_until(lambda: dead_letters(redis_client), 15, what="dead letter")
    assert len(sink.on("/old")) == 2
    assert sink.on("/new") == []
    log = attempt_log(redis_client, "EVREDIRECT", "moved")
    assert [(a.attempt, a.status) for a in log] == [(1, 302), (2, 302)]
    assert dead_letters(redis_client)[("EVREDIRECT", "moved")].attempts[-1].describe() \
        == "HTTP 302"
    assert not delivered(redis_client, "EVREDIRECT", "moved")


def test_a_slow_subscriber_does_not_delay_a_fast_one(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    slow = Sink().start()
    try:
        config = write_config(tmp_path / "relay.yaml", redis_server.url, [
            {"name": "slow", "url": slow.url("/slow"), "secret": "s"},
            {"name": "fast", "url": sink.url("/fast"), "secret": "s"},
        ], delivery={"timeout": "10s", "max_attempts": 3,
                     "backoff": {"initial": "1s", "max": "2s"}})
        slow.behave("/slow", lambda n: Reply(200, delay=3.0))
        events = [f"EVFAST{i:02d}" for i in range(20)]
        with worker(config, tmp_path / "worker.log"):
            sent = time.time()
            for event_id in events:
                enqueue_event(redis_client, event_body(event_id))
            fast = sink.wait_for("/fast", len(events), timeout=10)
            fast_done = max(r.at for r in fast) - sent
            slow_when_fast_done = len(slow.on("/slow"))
            print(f"fast subscriber had all {len(events)} after {fast_done:.2f}s; the slow one "
                  f"had answered {slow_when_fast_done}")
            slow.wait_for("/slow", len(events), timeout=20)
        assert fast_done < 3.0
        assert slow_when_fast_done < len(events)
        assert sorted(r.event_id for r in fast) == events
        assert sorted(r.event_id for r in slow.on("/slow")) == events
    finally:
        slow.stop()


def test_a_slow_subscriber_filling_its_share_of_max_in_flight_does_not_delay_a_fast_one(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    slow = Sink().start()
    try:
        config = write_config(tmp_path / "relay.yaml", redis_server.url, [
            {"name": "slow", "url": slow.url("/slow"), "secret": "s"},
            {"name": "fast", "url": sink.url("/fast"), "secret": "s"},
        ], delivery={"timeout": "5s", "max_attempts": 3,
                     "backoff": {"initial": "1s", "max": "2s"}},
            worker={"max_in_flight": 4})
        slow.behave("/slow", lambda n: Reply(200, delay=1.5))
        events = [f"EVHOL{i:02d}" for i in range(8)]
        with worker(config, tmp_path / "worker.log"):
            sent = time.time()
            for event_id in events:
                enqueue_event(redis_client, event_body(event_id))
            fast = sink.wait_for("/fast", len(events), timeout=20)
            fast_done = max(r.at for r in fast) - sent
            slow.wait_for("/slow", len(events), timeout=20)
        print(f"fast subscriber had all {len(events)} after {fast_done:.2f}s")
        assert fast_done < 1.0
        # Parked attempts come back paced, not repeated: each event reached the slow one once.
        assert sorted(r.event_id for r in slow.on("/slow")) == events
    finally:
        slow.stop()


def test_a_subscriber_never_has_more_posts_open_than_its_share_of_max_connections(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "a", "url": sink.url("/a"), "secret": "s"},
        {"name": "b", "url": sink.url("/b"), "secret": "s"},
    ], worker={"max_connections": 6})
    sink.behave("/a", lambda n: Reply(200, delay=0.2))
    sink.behave("/b", lambda n: Reply(200, delay=0.2))
    events = [f"EVLANE{i:02d}" for i in range(15)]
    with worker(config, tmp_path / "worker.log"):
        for event_id in events:
            enqueue_event(redis_client, event_body(event_id))
        got_a = sink.wait_for("/a", len(events), timeout=20)
        got_b = sink.wait_for("/b", len(events), timeout=20)
    # One worker process: 6 connections shared by 2 subscribers, 3 posts each at a time;
    # the rest waited their turn in the process, none was parked or lost.
    assert sink.peak_open == {"/a": 3, "/b": 3}
    assert sorted(r.event_id for r in got_a) == events
    assert sorted(r.event_id for r in got_b) == events


def test_attempts_waiting_in_a_lane_longer_than_a_lease_are_not_posted_twice(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """Each waiting attempt's lease (timeout + grace = 1.5 s) would fall due long before
    its turn (up to ~4 s): the worker renews the leases of what it holds."""
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "slowish", "url": sink.url("/slowish"), "secret": "s"},
    ], delivery={"timeout": "1s", "max_attempts": 5,
                 "backoff": {"initial": "200ms", "max": "1s"}},
        worker={"max_connections": 2, "lease_grace": "500ms", "visibility_timeout": "10s"})
    sink.behave("/slowish", lambda n: Reply(200, delay=0.4))
    events = [f"EVWAIT{i:02d}" for i in range(20)]
    with worker(config, tmp_path / "worker.log"):
        for event_id in events:
            enqueue_event(redis_client, event_body(event_id))
        sink.wait_for("/slowish", len(events), timeout=30)
        wait_until(lambda: redis_client.zcard(Keys().schedule) == 0, 10, what="leases gone")
        time.sleep(1.0)  # a lease that fell due would be posted again by now
    got = Counter(r.event_id for r in sink.on("/slowish"))
    assert got == Counter(events), {e: n for e, n in got.items() if n > 1}
    assert sink.peak_open["/slowish"] == 2
    assert dead_letters(redis_client) == {}


def test_a_saturated_worker_leaves_the_backlog_in_the_queue_instead_of_parking_it(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """Back-pressure: with its lane full but draining fast, a task waits for room; parking
    would put one schedule member per event (each back later as one more Celery message)."""
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "fast", "url": sink.url("/fast"), "secret": "s"},
    ], worker={"concurrency": 1, "max_in_flight": 10, "max_connections": 2})
    sink.behave("/fast", lambda n: Reply(200, delay=0.01))
    events = [f"EVBP{i:03d}" for i in range(120)]
    for event_id in events:
        enqueue_event(redis_client, event_body(event_id))
    peak = 0
    with worker(config, tmp_path / "worker.log"):
        deadline = time.monotonic() + 60
        while len(sink.on("/fast")) < len(events) and time.monotonic() < deadline:
            peak = max(peak, redis_client.zcard(Keys().schedule))
            time.sleep(0.005)
    # The schedule holds this process's leases (at most max_in_flight) and nothing parked.
    assert peak <= 10, peak
    assert Counter(r.event_id for r in sink.on("/fast")) == Counter(events)


def test_worker_sigkilled_mid_fan_out_loses_no_delivery(
        tmp_path: Path, redis_server, redis_client) -> None:
    sinks = [Sink().start() for _ in range(5)]
    try:
        config = write_config(tmp_path / "relay.yaml", redis_server.url, [
            {"name": f"sub{i}", "url": s.url(f"/sub{i}"), "secret": "s"}
            for i, s in enumerate(sinks)
        ], delivery={"timeout": "2s", "max_attempts": 10,
                     "backoff": {"initial": "200ms", "max": "1s"}},
            worker={"lease_grace": "2s", "visibility_timeout": "10s", "max_in_flight": 10})
        for i, s in enumerate(sinks):
            s.behave(f"/sub{i}", lambda n: Reply(200, delay=0.5))
        events = [f"EVKILL{i:02d}" for i in range(30)]
        expected = {(e, f"sub{i}") for e in events for i in range(5)}

        def received() -> list[tuple[str, str]]:
            return [(r.event_id, r.path[1:]) for s in sinks for r in s.received]

        with ingress(config, tmp_path / "ingress.log") as url, \
                worker(config, tmp_path / "worker1.log") as proc:
            for event_id in events:
                assert post(url, event_body(event_id))[0] == 202
            wait_until(lambda: len(received()) >= 20, 20, what="first deliveries")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        at_kill = len(set(received()))
        in_schedule = redis_client.zcard("relay:schedule")
        print(f"SIGKILL after {at_kill} of {len(expected)} deliveries; "
              f"{in_schedule} leases/retries in the schedule")
        assert at_kill < len(expected), "the kill came too late to test anything"
        started = time.monotonic()
        with worker(config, tmp_path / "worker2.log"):
            wait_until(lambda: set(received()) >= expected, 60,
                       what="every (event, subscriber) delivered after the restart")
            took = time.monotonic() - started
            # Everything is recorded as done once the last answer is in.
            wait_until(lambda: all(delivered(redis_client, e, f"sub{i}")
                                   for e in events for i in range(5)), 10, what="done markers")
            time.sleep(0.5)
        got = received()
        counts = Counter(got)
        duplicates = {k: v for k, v in counts.items() if v > 1}
        print(f"all {len(expected)} delivered {took:.1f}s after the restart; "
              f"{len(got) - len(expected)} duplicate deliveries over {len(duplicates)} pairs: "
              f"{sorted(duplicates.items())}")
        assert set(got) == expected
        assert dead_letters(redis_client) == {}
        assert redis_client.zcard("relay:schedule") == 0
    finally:
        for s in sinks:
            s.stop()


def test_redelivered_task_does_not_repeat_deliveries_that_succeeded(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "a", "url": sink.url("/a"), "secret": "s"},
        {"name": "b", "url": sink.url("/b"), "secret": "s"},
    ])
    keys = Keys()
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVDONE"))
        sink.wait_for("/a", 1)
        sink.wait_for("/b", 1)
        wait_until(lambda: all(redis_client.hget(keys.deliveries("EVDONE"), s) for s in "ab"),
                   10, what="done markers")
        # The same fan-out task again (as after a redelivery), and a retry message naming "a"
        # at a later attempt (as a lease falling due after the success would be). Each is
        # noted in ``unclaimed`` as the scheduler notes what it queues: a task drops its note
        # once its attempts are planned, which is how this test knows both have decided
        # (the ack comes earlier, before the planning).
        again = [deliver_message(keys.queue, "EVDONE", None, 1),
                 deliver_message(keys.queue, "EVDONE", ["a"], 2)]
        redis_client.zadd(keys.unclaimed, {m: int(time.time() * 1000) + 600_000 for m in again})
        for message in again:
            redis_client.lpush(keys.queue, message)
        wait_until(lambda: redis_client.zcard(keys.unclaimed) == 0, 10,
                   what="both tasks planned")
        # Control: "b" is made pending again; its delivery shows the worker still delivers.
        redis_client.hdel(keys.deliveries("EVDONE"), "b")
        redis_client.lpush(keys.queue, deliver_message(keys.queue, "EVDONE", ["b"], 1))
        sink.wait_for("/b", 2)
        wait_until(lambda: redis_client.llen(keys.queue) == 0, 10, what="queue drained")
        time.sleep(0.3)
    assert len(sink.on("/a")) == 1
    assert len(sink.on("/b")) == 2
    assert [a.status for a in attempt_log(redis_client, "EVDONE", "a")] == [200]


def test_concurrent_events_and_repeats_are_batched_yet_each_is_delivered_once(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """Concurrent requests share one fan-out message; a repeat of an event in the same or a
    later batch is answered 200 duplicate and is not fanned out again."""
    import threading

    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "s"}])
    events = [f"EVBATCH{i:02d}" for i in range(12)]
    sends = events + events[:4] * 3  # four events sent four times, all at once
    answers: list[int] = []
    with worker(config, tmp_path / "worker.log"), ingress(config, tmp_path / "ingress.log") as url:
        threads = [threading.Thread(target=lambda e=e: answers.append(post(url, event_body(e))[0]))
                   for e in sends]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = sink.wait_for("/erp", len(events))
        time.sleep(1.0)  # would a repeat be fanned out again?
        got = sink.on("/erp")
    assert sorted(answers) == sorted([202] * len(events) + [200] * 12)
    assert sorted(r.event_id for r in got) == events


def test_attempts_scheduled_as_references_or_as_full_messages_are_delivered_once(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """The schedule holds short references (relay/queue.py ``member``), which the scheduler
    turns into Celery messages; a full message scheduled by an earlier version of the hub
    (in flight across an upgrade) is delivered the same way. Each task removes its note from
    ``unclaimed`` in whichever form the scheduler wrote it."""
    keys = Keys()
    for event_id in ("EVREF", "EVOLD"):
        enqueue_event(redis_client, event_body(event_id))
    redis_client.delete(keys.queue, keys.unclaimed)  # their fan-outs: not this test's
    now = int(time.time() * 1000)
    redis_client.zadd(keys.schedule, {member("EVREF", "a", 1): now,
                                      deliver_message(keys.queue, "EVOLD", ["a"], 1): now})
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "a", "url": sink.url("/a"), "secret": "s"}])
    with worker(config, tmp_path / "worker.log"):
        sink.wait_for("/a", 2)
        wait_until(lambda: delivered(redis_client, "EVREF", "a")
                   and delivered(redis_client, "EVOLD", "a")
                   and redis_client.zcard(keys.unclaimed) == 0
                   and redis_client.zcard(keys.schedule) == 0, 10,
                   what="both delivered, nothing left noted or scheduled")
        time.sleep(0.3)
    assert sorted(r.event_id for r in sink.on("/a")) == ["EVOLD", "EVREF"]


def test_a_burst_of_fan_out_tasks_waits_for_room_instead_of_parking(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    """Tasks are handed to the delivery loop before their attempts are planned: a burst of
    them must count what the ones ahead will hold, or each finds the lanes not yet full and
    the process parks most of the burst (each parked attempt then costs a pull and a second
    load)."""
    names = [f"b{i}" for i in range(4)]
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": n, "url": sink.url(f"/{n}"), "secret": "s"} for n in names],
        worker={"concurrency": 1, "max_in_flight": 40, "max_connections": 8})
    for n in names:
        sink.behave(f"/{n}", lambda _: Reply(200, delay=0.02))
    events = []
    for batch in range(12):  # 12 fan-out tasks of 5 events: 20 attempts each
        events += enqueue_events(redis_client, [event_body(f"EVBURST{batch:02d}{i}")
                                                for i in range(5)])
    peak = 0
    with worker(config, tmp_path / "worker.log"):
        deadline = time.monotonic() + 60
        while sum(len(sink.on(f"/{n}")) for n in names) < 4 * len(events) \
                and time.monotonic() < deadline:
            peak = max(peak, sum(redis_client.zcard(Keys().parked(n)) for n in names))
            time.sleep(0.005)
    assert peak == 0, peak
    for n in names:
        assert Counter(r.event_id for r in sink.on(f"/{n}")) == Counter(events)
