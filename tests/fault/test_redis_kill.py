"""Redis SIGKILLed (and restarted from its fsynced AOF) while the ingress is under load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fault.helpers import Load, account, backlog, bodies, wait_delivered, wait_quiet
from tests.hub import ingress, worker, write_config

pytestmark = pytest.mark.fault

EVENTS = 800
RATE = 200          # events/s offered: the load lasts ~4 s
CONCURRENCY = 16
KILL_AT = (1.0, 2.8)  # s into the load: two kill-and-restart cycles
DOWN_FOR = 1.0        # s each time


def test_redis_sigkill_under_load_every_2xx_is_delivered(tmp_path: Path, redis_server,
                                                         redis_client, sink, report) -> None:
    config = write_config(
        tmp_path / "relay.yaml", redis_server.url,
        [{"name": "all", "url": sink.url("/all"), "secret": "s-all"},
         {"name": "orders", "url": sink.url("/orders"), "secret": "s-orders",
          "topics": ["resellers/orders"]},
         {"name": "stock", "url": sink.url("/stock"), "secret": "s-stock",
          "event_types": ["IM::STOCK_UPDATE"]}],
        delivery={"timeout": "2s", "max_attempts": 10,
                  "backoff": {"initial": "100ms", "max": "1s"}},
        worker={"concurrency": 1, "lease_grace": "2s", "visibility_timeout": "10s"})
    events = bodies("RKILL", EVENTS,
                    topic_of=lambda i: "resellers/catalog" if i % 4 == 0 else "resellers/orders")

    def routes(event_id: str) -> list[str]:
        catalog = int(event_id[-5:]) % 4 == 0
        return ["/all", "/stock"] if catalog else ["/all", "/orders"]

    with ingress(config, tmp_path / "ingress.log") as url, \
            worker(config, tmp_path / "worker.log"):
        load = Load(url, concurrency=CONCURRENCY, rate=RATE).start(events)
        began = time.monotonic()
        outages = []
        for at in KILL_AT:
            time.sleep(max(0.0, began + at - time.monotonic()))
            redis_server.kill()
            killed = time.monotonic()
            time.sleep(DOWN_FOR)
            redis_server.start()
            outages.append((killed, time.monotonic()))
        load.join(60)
        first_pass = load.statuses()
        accepted_first = set(load.accepted)
        refused_first = set(load.refused)

        # The sender re-sends what was not accepted, as Ingram would on a 503.
        rounds = 0
        while load.refused and rounds < 20:
            rounds += 1
            time.sleep(0.25)
            load.run({e: events[e] for e in sorted(load.refused)})
        answers = [a for answer_list in load.answers.values() for a in answer_list]
        # Per outage: how long the ingress refused, and how soon after the restart it accepted.
        refusing_s, first_2xx_s = [], []
        for i, (killed, restarted) in enumerate(outages):
            until = outages[i + 1][0] if i + 1 < len(outages) else float("inf")
            refused = [a.at for a in answers
                       if killed <= a.at < until and not 200 <= a.status < 300]
            accepted = [a.at for a in answers if restarted <= a.at < until
                        and 200 <= a.status < 300]
            refusing_s.append(round(max(refused, default=killed) - killed, 2))
            first_2xx_s.append(round(min(accepted, default=restarted) - restarted, 3))
        expected = {(p, e) for e in load.accepted for p in routes(e)}
        waited = wait_delivered(sink, expected, timeout=90)
        left = wait_quiet(redis_client, timeout=30)
        time.sleep(0.5)

    acct = account(sink, expected)
    report(fault="redis SIGKILL + restart under ingress load", events=EVENTS,
           offered_rate=RATE, kills=len(KILL_AT), down_s_each=DOWN_FOR,
           first_pass_statuses=dict(first_pass), accepted_first_pass=len(accepted_first),
           refused_first_pass=len(refused_first), resend_rounds=rounds,
           never_accepted=len(load.refused),
           ingress_refusing_s=refusing_s, first_2xx_after_restart_s=first_2xx_s,
           **acct.figures(), all_delivered_s_after_resend=round(waited, 2), backlog_left=left)
    assert set(first_pass) <= {202, 200, 503}, first_pass
    assert load.unavailable_without_retry_after() == 0
    assert not load.refused, f"{len(load.refused)} events never accepted after Redis returned"
    assert not acct.lost, f"{len(acct.lost)} accepted deliveries lost, e.g. {acct.lost[:5]}"
    assert not acct.unexpected, acct.unexpected[:5]
    assert not any(backlog(redis_client).values())
