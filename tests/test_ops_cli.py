"""The operator's CLI against a real hub: ``relay events``, ``relay status``, ``relay
subscribers``, ``relay dlq`` as subprocesses, a ``relay worker`` subprocess on the private Redis,
recording sinks.

One hub serves the module (its own key prefix); each test routes its events to subscribers
of its own by event type, so tests do not see each other's deliveries or dead letters.
"""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from relay.config import load_config
from relay.keys import Keys
from relay.ops.cli import REPLAY_CHUNK
from tests.hub import (
    Reply,
    Sink,
    enqueue_event,
    enqueue_events,
    order_event,
    plant_expired_letters,
    worker,
    write_config,
)
from tests.support import ROOT, RedisServer, relay_cmd, wait_until

PREFIX = "opscli:"
FAST = {"initial": "50ms", "max": "100ms"}
BULK = 205  # more than the 200 from which `relay dlq replay` shows a progress bar
#: What cli-dead answers (HTTP 500): a blank line, a long first line, then more.
CLI_DEAD_PAGE = (b"\n  ORA-01555: snapshot too old: rollback segment number 12 with name "
                 b"_SYSSMU12$ too small while posting order 20-CLI001\n<html>stack</html>\n")


class Hub:
    def __init__(self, redis_server: RedisServer, tmp: Path) -> None:
        self.tmp = tmp
        self.sink = Sink().start()
        sink = self.sink

        def sub(name: str, group: str, **extra: Any) -> dict[str, Any]:
            return {"name": name, "url": sink.url(f"/{name}"), "secret": "s",
                    "event_types": [f"t::{group}"], **extra}

        subs = [sub("cli-ok", "show"), sub("cli-dead", "show", max_attempts=2),
                sub("cli-pause", "pause"),
                sub("dl-a", "dlq", max_attempts=1), sub("dl-b", "dlq", max_attempts=1),
                sub("bulk", "bulk", max_attempts=1),
                sub("gone", "gone", max_attempts=1),
                sub("stuck", "stuck", max_attempts=1),
                sub("rs", "resend")]
        for path in ("/dl-a", "/dl-b", "/bulk", "/gone", "/stuck"):
            sink.behave(path, lambda n: Reply(500))
        sink.behave("/cli-dead", lambda n: Reply(500, body=CLI_DEAD_PAGE))
        self.config = write_config(tmp / "relay.yaml", redis_server.url, subs,
                                   delivery={"timeout": "2s", "max_attempts": 3, "backoff": FAST},
                                   redis={"prefix": PREFIX})
        # The same hub after `gone` was removed from the config.
        doc = yaml.safe_load(self.config.read_text())
        doc["subscribers"] = [s for s in doc["subscribers"] if s["name"] != "gone"]
        self.without_gone = tmp / "without-gone.yaml"
        self.without_gone.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.keys = Keys.of(load_config(self.config))
        self.redis = redis_server.client()

    def relay(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``relay ARGS --config FILE`` (``--config`` after the command)."""
        return subprocess.run(relay_cmd(*args, "--config", str(config or self.config)),
                              cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)

    def send(self, event_id: str, group: str, orders: tuple[str, ...] = ("20-X",)) -> str:
        return enqueue_event(self.redis, order_event(event_id, f"t::{group}", orders), PREFIX)

    def state(self, event_id: str, sub: str) -> str:
        """The delivery record's letter: d(elivered), x (dead), r(etry), or '' if none."""
        value = self.redis.hget(self.keys.deliveries(event_id), sub)
        return value[:1].decode() if value else ""

    def wait_state(self, event_id: str, sub: str, want: str, timeout: float = 15) -> None:
        wait_until(lambda: self.state(event_id, sub) == want, timeout, 0.03,
                   what=f"{event_id} -> {sub}: {want}")

    def dead(self, sub: str) -> int:
        return int(self.redis.zcard(self.keys.dead(sub)))


@pytest.fixture(scope="module")
def hub(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(redis_server, tmp_path_factory.mktemp("ops-cli"))
    try:
        with worker(h.config, h.tmp / "worker.log"):
            yield h
    finally:
        h.sink.stop()
        h.redis.close()


def rows(out: str) -> list[list[str]]:
    """A table's rows (after its header), split on whitespace."""
    return [line.split() for line in out.strip().splitlines()[1:]]


# -- events --------------------------------------------------------------------------------


def test_events_show_prints_the_timeline_and_json_and_list_finds_by_order(hub: Hub) -> None:
    hub.send("EV-CLI-1", "show", ("20-CLI001",))
    hub.wait_state("EV-CLI-1", "cli-ok", "d")
    hub.wait_state("EV-CLI-1", "cli-dead", "x")

    out = hub.relay("events", "show", "EV-CLI-1")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "event EV-CLI-1"
    assert lines[2].split() == ["topic", "resellers/orders"]
    assert lines[3].split() == ["types", "t::show"]
    assert lines[4].split() == ["orders", "20-CLI001"]
    ok = lines.index("  -> cli-ok: delivered")
    assert lines[ok + 1].split()[0] == "#1" and "HTTP 200" in lines[ok + 1]
    dead = lines.index("  -> cli-dead: dead: 2 attempts failed")
    attempts = lines[dead + 1:dead + 5]
    assert [line.split()[0] for line in attempts[0::2]] == ["#1", "#2"]
    assert all("HTTP 500" in line and line.endswith(" ms") for line in attempts[0::2])
    # Under each failed attempt: the first line of the answer's body, cut to the terminal.
    first = "ORA-01555: snapshot too old: rollback segment number 12 with name _SYSSMU12$ too"
    assert all(line.startswith("          " + first[:40]) for line in attempts[1::2])
    narrow = subprocess.run(relay_cmd("events", "show", "EV-CLI-1", "--config", str(hub.config)),
                            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
                            env={**os.environ, "COLUMNS": "60"})
    cut = [line for line in narrow.stdout.splitlines() if "ORA-01555" in line]
    assert cut and all(line == "          " + first[:49] + "…" for line in cut), cut

    out = hub.relay("events", "show", "EV-CLI-1", "--json")
    assert out.returncode == 0, out.stderr
    detail = msgspec.json.decode(out.stdout)
    assert detail["eventId"] == "EV-CLI-1" and detail["orderNumbers"] == ["20-CLI001"]
    assert {d["subscriber"]: (d["state"], [(a["attempt"], a["status"]) for a in d["attempts"]])
            for d in detail["deliveries"]} == {"cli-ok": ("delivered", [(1, 200)]),
                                               "cli-dead": ("dead", [(1, 500), (2, 500)])}

    out = hub.relay("events", "show", "EV-NEVER-SENT")
    assert out.returncode == 1 and out.stderr.startswith("error: no event 'EV-NEVER-SENT'")

    time.sleep(0.01)
    hub.send("EV-CLI-2", "show", ("20-CLI001", "20-CLI002"))
    hub.wait_state("EV-CLI-2", "cli-ok", "d")
    out = hub.relay("events", "list", "--order", "20-CLI001")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:5] == ["EVENT", "RECEIVED", "(UTC)", "TOPIC", "ORDERS"]
    listed = rows(out.stdout)
    assert [r[0] for r in listed] == ["EV-CLI-2", "EV-CLI-1"]  # newest first
    assert listed[1][-2:] == ["cli-ok=delivered,", "cli-dead=dead"]
    assert listed[0][4] == "20-CLI001,20-CLI002"
    out = hub.relay("events", "list", "--order", "20-CLI002")
    assert [r[0] for r in rows(out.stdout)] == ["EV-CLI-2"]
    out = hub.relay("events", "list", "--subscriber", "cli-dead", "--state", "dead", "--limit", "1")
    assert [r[0] for r in rows(out.stdout)] in (["EV-CLI-2"], ["EV-CLI-1"])
    assert hub.relay("events", "list", "--order", "20-NOSUCH").stdout.strip() == "no events"


def test_orders_show_lists_an_orders_events_oldest_first_with_each_subscribers_state(
        hub: Hub) -> None:
    hub.send("EV-ORD-1", "show", ("20-ORD001",))
    time.sleep(0.01)
    hub.send("EV-ORD-2", "show", ("20-ORD001", "20-ORD002"))
    for event_id in ("EV-ORD-1", "EV-ORD-2"):
        hub.wait_state(event_id, "cli-ok", "d")
        hub.wait_state(event_id, "cli-dead", "x")
    out = hub.relay("orders", "show", "20-ORD001")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "order 20-ORD001: 2 event(s)"
    assert lines[1].split() == ["EVENT", "RECEIVED", "(UTC)", "TYPES", "CLI-OK", "CLI-DEAD"]
    assert [line.split()[0] for line in lines[2:]] == ["EV-ORD-1", "EV-ORD-2"]  # oldest first
    assert all(line.split()[-2:] == ["delivered", "dead"] for line in lines[2:])

    out = hub.relay("orders", "show", "20-ORD001", "--json")
    order = msgspec.json.decode(out.stdout)
    assert order["orderNumber"] == "20-ORD001" and order["ordering"] == []
    assert [(e["eventId"], e["states"]) for e in order["events"]] == [
        ("EV-ORD-1", {"cli-ok": "delivered", "cli-dead": "dead"}),
        ("EV-ORD-2", {"cli-ok": "delivered", "cli-dead": "dead"})]

    out = hub.relay("orders", "show", "20-NOSUCH")
    assert out.returncode == 1 and out.stderr.startswith("error: no event for order '20-NOSUCH'")


def test_events_resend_delivers_again_to_every_or_one_subscriber(hub: Hub) -> None:
    hub.send("EV-CLI-RS", "resend")
    hub.sink.wait_for("/rs", 1)
    hub.wait_state("EV-CLI-RS", "rs", "d")
    out = hub.relay("events", "resend", "EV-CLI-RS")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "queued EV-CLI-RS for 1 subscriber(s)"
    hub.sink.wait_for("/rs", 2)
    out = hub.relay("events", "resend", "EV-CLI-RS", "--subscriber", "rs")
    assert out.returncode == 0 and out.stdout.strip() == "queued EV-CLI-RS for 1 subscriber(s)"
    assert [r.event_id for r in hub.sink.wait_for("/rs", 3)] == ["EV-CLI-RS"] * 3

    out = hub.relay("events", "resend", "EV-CLI-RS", "--subscriber", "nosuch")
    assert out.returncode == 2 and "'nosuch' is not configured" in out.stderr
    out = hub.relay("events", "resend", "EV-NEVER-SENT")
    assert out.returncode == 2 and "EV-NEVER-SENT" in out.stderr
    time.sleep(0.3)
    assert len(hub.sink.on("/rs")) == 3


# -- status, pause, resume -----------------------------------------------------------------


def test_status_table_and_subscribers_pause_resume(hub: Hub) -> None:
    out = hub.relay("subscribers", "pause", "cli-pause")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "paused cli-pause"

    out = hub.relay("status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("hub: ")
    assert lines[1].startswith("workers seen in the last minute: 1;")
    assert lines[2].split()[:4] == ["SUBSCRIBER", "STATE", "OK", "1H"]
    table = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(table) == {"cli-ok", "cli-dead", "cli-pause", "dl-a", "dl-b", "bulk", "gone",
                          "stuck", "rs"}
    assert lines[3].split()[:2] == ["cli-pause", "paused"]  # unhealthy first
    assert table["cli-ok"][1] == "active"

    hub.send("EV-CLI-P", "pause")
    wait_until(lambda: hub.redis.zcard(hub.keys.held("cli-pause")) == 1, 10,
               what="the attempt held")
    time.sleep(0.3)
    assert hub.sink.on("/cli-pause") == []

    out = hub.relay("subscribers", "resume", "cli-pause")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "resumed cli-pause; 1 held attempt(s) released"
    hub.sink.wait_for("/cli-pause", 1)
    hub.wait_state("EV-CLI-P", "cli-pause", "d")

    def status_row() -> list[str]:
        out = hub.relay("status")
        return next(line.split() for line in out.stdout.splitlines()
                    if line.startswith("cli-pause "))

    # The delivery is counted within a second (workers/tally.py).
    row = wait_until(lambda: (r := status_row())[2] == "1" and r, 10, what="the count")
    assert row[1:5] == ["active", "1", "0", "100.0%"]

    for action in ("pause", "resume"):
        out = hub.relay("subscribers", action, "nosuch")
        assert out.returncode == 2 and "'nosuch' is not configured" in out.stderr


# -- dead letters ----------------------------------------------------------------------------


def test_dlq_list_replay_purge_with_filters_and_dry_runs(hub: Hub) -> None:
    for event_id in ("EV-DL-1", "EV-DL-2"):
        hub.send(event_id, "dlq")
    wait_until(lambda: hub.dead("dl-a") == 2 and hub.dead("dl-b") == 2, 15, what="4 letters")
    mid = f"{time.time():.3f}"
    time.sleep(0.02)
    hub.send("EV-DL-3", "dlq")
    wait_until(lambda: hub.dead("dl-a") == 3 and hub.dead("dl-b") == 3, 15, what="6 letters")

    # --config after the group's name (and not after the command's) works too.
    out = subprocess.run(relay_cmd("dlq", "--config", str(hub.config), "list", "--event",
                                   "EV-DL-1"),
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert sorted(r[:2] for r in rows(out.stdout)) == [["EV-DL-1", "dl-a"], ["EV-DL-1", "dl-b"]]

    def listed(*filters: str) -> list[tuple[str, str]]:
        out = hub.relay("dlq", "list", *filters)
        assert out.returncode == 0, out.stderr
        return sorted((r[0], r[1]) for r in rows(out.stdout))

    assert listed("--subscriber", "dl-a") == [("EV-DL-1", "dl-a"), ("EV-DL-2", "dl-a"),
                                              ("EV-DL-3", "dl-a")]
    row = rows(hub.relay("dlq", "list", "--subscriber", "dl-a", "--event", "EV-DL-3").stdout)
    assert row == [["EV-DL-3", "dl-a", "1", "HTTP", "500", *row[0][5:7], "1", "attempt",
                    "failed"]]
    assert listed("--since", mid, "--subscriber", "dl-b") == [("EV-DL-3", "dl-b")]
    assert listed("--until", mid, "--subscriber", "dl-b") == [("EV-DL-1", "dl-b"),
                                                              ("EV-DL-2", "dl-b")]
    out = hub.relay("dlq", "list", "--since", "last tuesday")
    assert out.returncode == 2 and "--since/--until" in out.stderr

    out = hub.relay("dlq", "replay", "--subscriber", "dl-a", "--dry-run")
    assert out.returncode == 0 and out.stdout.strip() == "3 dead letter(s) would be replayed"
    time.sleep(0.3)
    assert hub.dead("dl-a") == 3 and len(hub.sink.on("/dl-a")) == 3  # the dry run changed nothing

    hub.sink.behave("/dl-a", lambda n: Reply(200))
    out = hub.relay("dlq", "replay", "--subscriber", "dl-a", "--until", mid)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "replayed 2 dead letter(s)"
    assert out.stderr == ""  # a short replay shows no progress bar
    got = hub.sink.wait_for("/dl-a", 5)
    assert sorted(r.event_id for r in got[3:]) == ["EV-DL-1", "EV-DL-2"]
    hub.wait_state("EV-DL-2", "dl-a", "d")
    assert listed("--subscriber", "dl-a") == [("EV-DL-3", "dl-a")]

    out = hub.relay("dlq", "purge", "--event", "EV-DL-3", "--dry-run")
    assert out.returncode == 0 and out.stdout.strip() == "2 dead letter(s) would be deleted"
    assert hub.dead("dl-a") == 1 and hub.dead("dl-b") == 3
    out = hub.relay("dlq", "purge", "--subscriber", "dl-b", "--since", mid)
    assert out.returncode == 0 and out.stdout.strip() == "deleted 1 dead letter(s)"
    out = hub.relay("dlq", "purge", "--subscriber", "dl-b")
    assert out.returncode == 0 and out.stdout.strip() == "deleted 2 dead letter(s)"
    assert not hub.redis.exists(hub.keys.letter("dl-b", "EV-DL-1"))
    assert listed("--event", "EV-DL-3") == [("EV-DL-3", "dl-a")]
    assert len(hub.sink.on("/dl-b")) == 3  # purged letters are not delivered


def test_dlq_replay_of_many_letters_shows_a_progress_bar(hub: Hub) -> None:
    ids = enqueue_events(hub.redis, [order_event(f"EV-BULK-{n:03d}", "t::bulk")
                                     for n in range(BULK)], PREFIX)
    wait_until(lambda: hub.dead("bulk") == BULK, 30, 0.1, what=f"{BULK} dead letters")
    hub.sink.behave("/bulk", lambda n: Reply(200))

    # stderr on a terminal, as an operator sees it (off a terminal click prints the label only).
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(relay_cmd("dlq", "replay", "--subscriber", "bulk", "--config",
                                        str(hub.config)),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=follower, text=True,
                              timeout=60, check=False)
        os.close(follower)
        bar = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: every writer has gone
                break
            if not chunk:
                break
            bar += chunk
    finally:
        os.close(leader)
    assert proc.returncode == 0, bar
    assert proc.stdout.strip() == f"replayed {BULK} dead letter(s)"
    text = bar.decode(errors="replace")
    assert "replaying" in text and "100%" in text, text
    # The bar is drawn as it fills, chunk by chunk: some steps between 0 % and 100 %.
    steps = [int(p) for p in re.findall(r"(\d+)%", text)]
    assert steps[0] == 0 and steps[-1] == 100 and any(0 < p < 100 for p in steps), text
    got = hub.sink.wait_for("/bulk", 2 * BULK, timeout=30)
    assert sorted(r.event_id for r in got[BULK:]) == sorted(ids)
    assert hub.dead("bulk") == 0


def test_dlq_replay_goes_on_past_letters_that_cannot_be_replayed(hub: Hub) -> None:
    # Two letters that can be replayed, behind (older than) more letters than one replay
    # step takes whose event has expired: every step must move on, not stop at the first
    # step that replays nothing.
    events = [hub.send(f"EV-STUCK-{n}", "stuck") for n in (1, 2)]
    wait_until(lambda: hub.dead("stuck") == 2, 15, what="2 dead letters for stuck")
    expired = plant_expired_letters(hub.redis, PREFIX, "stuck", REPLAY_CHUNK + 20)
    hub.sink.behave("/stuck", lambda n: Reply(200))
    out = hub.relay("dlq", "replay", "--subscriber", "stuck")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"replayed 2 dead letter(s); {len(expired)} could not be "
                                  "(their event has expired)")
    got = hub.sink.wait_for("/stuck", 4)
    assert sorted(r.event_id for r in got[2:]) == events
    assert hub.dead("stuck") == len(expired)


def test_dlq_for_a_subscriber_not_configured(hub: Hub) -> None:
    out = hub.relay("dlq", "list", "--subscriber", "nosuch")
    assert out.returncode == 2
    assert out.stderr.strip() == "note: subscriber 'nosuch' is not configured"

    hub.send("EV-GONE-1", "gone")
    wait_until(lambda: hub.dead("gone") == 1, 15, what="a dead letter for gone")
    # Then `gone` is removed from the config: its letters are still listed, with a note.
    out = hub.relay("dlq", "list", "--subscriber", "gone", config=hub.without_gone)
    assert out.returncode == 0, out.stderr
    assert "not configured (these dead letters are from before it was removed)" in out.stderr
    assert rows(out.stdout)[0][:3] == ["EV-GONE-1", "gone", "(removed)"]

    before = hub.relay("dlq", "list", config=hub.without_gone).stdout
    for config, name in ((hub.config, "nosuch"), (hub.without_gone, "gone")):
        out = hub.relay("dlq", "replay", "--subscriber", name, config=config)
        assert out.returncode == 2, out.stdout
        assert f"subscriber {name!r} is not configured; nothing replayed" in out.stderr
        assert out.stdout == ""
    out = hub.relay("dlq", "replay", "--event", "EV-GONE-1", config=hub.without_gone)
    assert out.returncode == 0
    assert out.stdout.strip() == ("replayed 0 dead letter(s); 1 of subscribers no longer "
                                  "configured left as they are")
    time.sleep(0.3)
    assert hub.relay("dlq", "list", config=hub.without_gone).stdout == before  # nothing changed
    assert hub.redis.exists(hub.keys.letter("gone", "EV-GONE-1"))
    assert len(hub.sink.on("/gone")) == 1
