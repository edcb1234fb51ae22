"""Dead letters: 410 Gone, max_attempts, and the ``relay dlq list|replay`` commands."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.hub import (
    Reply,
    Sink,
    attempt_log,
    dead_letters,
    delivered,
    enqueue_event,
    event_body,
    worker,
    write_config,
)
from tests.support import ROOT, relay_cmd, wait_until


def relay(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(relay_cmd(*args, "--config", str(config)), cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)


def test_410_gone_stops_at_once_and_dead_letters_after_a_single_request(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "gone", "url": sink.url("/gone"), "secret": "s"},
        {"name": "fine", "url": sink.url("/fine"), "secret": "s"},
    ], delivery={"timeout": "2s", "max_attempts": 5,
                 "backoff": {"initial": "50ms", "max": "100ms"}})
    sink.behave("/gone", lambda n: Reply(410))
    with worker(config, tmp_path / "worker.log"):
        enqueue_event(redis_client, event_body("EVGONE"))
        wait_until(lambda: dead_letters(redis_client), 15, what="a dead letter")
        sink.wait_for("/fine", 1)
        # Retries would come within ~0.3 s (backoff max 100 ms + scheduler poll); wait well
        # past that to be sure none does.
        time.sleep(1.0)
    assert len(sink.on("/gone")) == 1
    letters = dead_letters(redis_client)
    assert set(letters) == {("EVGONE", "gone")}
    letter = letters[("EVGONE", "gone")]
    assert "410" in letter.reason
    assert [(a.attempt, a.status) for a in letter.attempts] == [(1, 410)]
    assert letter.event.body == event_body("EVGONE")
    assert redis_client.zcard("relay:schedule") == 0
    assert not delivered(redis_client, 'EVGONE', "gone")


def test_always_failing_subscriber_gets_exactly_max_attempts_then_a_dead_letter_and_replay(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "alpha", "url": sink.url("/alpha"), "secret": "s"},
        {"name": "beta", "url": sink.url("/beta"), "secret": "s", "max_attempts": 2},
    ], delivery={"timeout": "2s", "max_attempts": 3,
                 "backoff": {"initial": "50ms", "max": "100ms"}})
    sink.behave("/alpha", lambda n: Reply(500))
    sink.behave("/beta", lambda n: Reply(503))
    events = ["EVDLQ-ONE", "EVDLQ-TWO"]
    with worker(config, tmp_path / "worker.log"):
        for event_id in events:
            enqueue_event(redis_client, event_body(event_id))
        wait_until(lambda: len(dead_letters(redis_client)) == 4, 20, what="4 dead letters")
        time.sleep(0.5)  # no attempt may follow the dead letter
        assert len(sink.on("/alpha")) == 3 * 2
        assert len(sink.on("/beta")) == 2 * 2  # the subscriber's own max_attempts
        for event_id in events:
            assert [a.attempt for a in attempt_log(redis_client, event_id, "alpha")] == [1, 2, 3]
            letter = dead_letters(redis_client)[(event_id, "alpha")]
            assert [(a.attempt, a.status) for a in letter.attempts] == \
                [(1, 500), (2, 500), (3, 500)]
            assert letter.reason == "3 attempts failed"
            assert len(dead_letters(redis_client)[(event_id, "beta")].attempts) == 2
        assert redis_client.zcard("relay:schedule") == 0

        listing = relay(config, "dlq", "list")
        assert listing.returncode == 0, listing.stderr
        print(listing.stdout)
        lines = listing.stdout.strip().splitlines()
        header = lines[0].split()
        assert header[:4] == ["EVENT", "SUBSCRIBER", "ATTEMPTS", "LAST"]
        rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
        assert set(rows) == {(e, s) for e in events for s in ("alpha", "beta")}
        for event_id in events:
            assert rows[(event_id, "alpha")][2:5] == ["3", "HTTP", "500"]
            assert rows[(event_id, "beta")][2:5] == ["2", "HTTP", "503"]
        only_beta = relay(config, "dlq", "list", "--subscriber", "beta")
        assert {line.split()[1] for line in only_beta.stdout.strip().splitlines()[1:]} \
            == {"beta"}

        # The subscriber is fixed; replay only its dead letter of one event.
        sink.behave("/alpha", lambda n: Reply(200))
        out = relay(config, "dlq", "replay", "--subscriber", "alpha", "--event", "EVDLQ-ONE")
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("replayed 1"), out.stdout
        wait_until(lambda: len(sink.on("/alpha")) == 7, 15, what="replayed delivery")
        assert sink.on("/alpha")[-1].event_id == "EVDLQ-ONE"
        wait_until(lambda: delivered(redis_client, 'EVDLQ-ONE', "alpha"), 5,
                   what="done marker")
        assert set(dead_letters(redis_client)) == {("EVDLQ-TWO", "alpha"), ("EVDLQ-ONE", "beta"),
                                                   ("EVDLQ-TWO", "beta")}
        # A replay is a fresh first attempt; the log keeps the history before it.
        assert [(a.attempt, a.status) for a in attempt_log(redis_client, "EVDLQ-ONE", "alpha")] \
            == [(1, 500), (2, 500), (3, 500), (1, 200)]

        # --subscriber alone: every remaining dead letter of that subscriber.
        out = relay(config, "dlq", "replay", "--subscriber", "alpha")
        assert out.stdout.startswith("replayed 1"), out.stdout
        wait_until(lambda: len(sink.on("/alpha")) == 8, 15, what="second replayed delivery")
        assert sink.on("/alpha")[-1].event_id == "EVDLQ-TWO"

        # --event alone: every subscriber's dead letter of that event.
        sink.behave("/beta", lambda n: Reply(200))
        out = relay(config, "dlq", "replay", "--event", "EVDLQ-TWO")
        assert out.stdout.startswith("replayed 1"), out.stdout
        wait_until(lambda: len(sink.on("/beta")) == 5, 15, what="replayed beta delivery")
        assert sink.on("/beta")[-1].event_id == "EVDLQ-TWO"

        # Nothing matches any more for these filters.
        out = relay(config, "dlq", "replay", "--subscriber", "alpha")
        assert out.stdout.startswith("replayed 0"), out.stdout
        wait_until(lambda: len(dead_letters(redis_client)) == 1, 5, what="one dead letter left")
        remaining = relay(config, "dlq", "list")
        lines = remaining.stdout.strip().splitlines()
        assert len(lines) == 2 and lines[1].split()[:2] == ["EVDLQ-ONE", "beta"]
    assert len(sink.on("/alpha")) == 8
    assert len(sink.on("/beta")) == 5


def test_dlq_list_says_so_when_there_are_no_dead_letters(
        tmp_path: Path, redis_server, redis_client) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "a", "url": "http://127.0.0.1:9/x", "secret": "s"}])
    out = relay(config, "dlq", "list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no dead letters"
    out = relay(config, "dlq", "replay")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("replayed 0")


def test_last_attempt_lost_with_its_worker_is_dead_lettered_once_its_lease_expires(
        tmp_path: Path, redis_server, redis_client, sink: Sink) -> None:
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "once", "url": sink.url("/once"), "secret": "s", "max_attempts": 1},
    ], delivery={"timeout": "1s", "max_attempts": 3,
                 "backoff": {"initial": "50ms", "max": "100ms"}},
        worker={"lease_grace": "1s", "visibility_timeout": "10s"})
    sink.behave("/once", lambda n: Reply(200, delay=3.0))
    with worker(config, tmp_path / "worker1.log") as proc:
        enqueue_event(redis_client, event_body("EVLOSTLAST"))
        # The lease is written just before the attempt starts.
        wait_until(lambda: redis_client.zcard("relay:schedule") == 1, 10, what="lease")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert dead_letters(redis_client) == {}
    with worker(config, tmp_path / "worker2.log"):
        wait_until(lambda: dead_letters(redis_client), 15, what="dead letter")
    letter = dead_letters(redis_client)[("EVLOSTLAST", "once")]
    assert letter.reason == "no outcome recorded for the last attempt"
    assert letter.event.body == event_body("EVLOSTLAST")
    assert redis_client.zcard("relay:schedule") == 0
    assert len(sink.on("/once")) <= 1  # only the attempt in flight when the worker died
