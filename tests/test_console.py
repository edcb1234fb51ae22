"""The admin console in a real headless browser (Debian's ``chromium``, driven by Playwright)
against a real hub: a ``relay worker`` and a ``relay admin`` subprocess on the private Redis,
with an admin token, and recording sinks.

With ``RELAY_SCREENSHOTS=1`` it also saves docs/console-overview.png, docs/console-event.png
and docs/console-dead-letters.png (the README shows them); normal runs leave them alone.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relay.config import load_config
from relay.keys import Keys
from tests.hub import STANDARD_SECRET, Reply, Sink, call, enqueue_events, worker, write_config
from tests.support import (
    ROOT,
    SAMPLES,
    RedisServer,
    free_port,
    process,
    relay_cmd,
    wait_http,
    wait_until,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "console-test-token"
PREFIX = "console:"
SCREENSHOTS = os.environ.get("RELAY_SCREENSHOTS") == "1"
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="/usr/bin/chromium is missing (apt-get install -y "
                                       "chromium; .ci/run installs it)")


def sample(name: str, event_id: str, order: str) -> bytes:
    """A sample Ingram event with its own eventId and order number."""
    doc = json.loads((SAMPLES / name).read_text())
    doc["eventId"] = event_id
    for resource in doc["resource"]:
        resource["orderNumber"] = order
    return msgspec.json.encode(doc)


SHIPPED = [(f"N01CIB9VVFYKR9J{n:03d}", f"20-RD{128 + n}") for n in range(6)]
INVOICED = ("P7QK2M4R8T1V3X5Z9B", "40-XK551")


class Hub:
    def __init__(self, redis_server: RedisServer, tmp: Path) -> None:
        self.tmp = tmp
        self.sink = Sink().start()
        self.sink.behave("/erp", lambda n: Reply(200, delay=random.uniform(0.004, 0.04)))
        self.sink.behave("/crm", lambda n: Reply(503))
        self.sink.behave("/billing", lambda n: Reply(500))
        url = self.sink.url
        subs = [
            {"name": "erp", "url": url("/erp"), "secret": "erp-secret"},
            {"name": "warehouse", "url": url("/warehouse"), "secret": STANDARD_SECRET,
             "signature": "standard", "event_types": ["im::order_*"]},
            {"name": "crm", "url": url("/crm"), "secret": "crm-secret", "max_attempts": 2},
            {"name": "billing", "url": url("/billing"), "secret": "billing-secret",
             "event_types": ["im::order_invoiced"], "max_attempts": 2},
            {"name": "analytics", "url": url("/analytics"), "secret": "analytics-secret",
             "rate_limit": "50/s"},
        ]
        self.admin_port = free_port()
        self.config = write_config(tmp / "relay.yaml", redis_server.url, subs,
                                   delivery={"timeout": "2s", "max_attempts": 3,
                                             "backoff": {"initial": "50ms", "max": "100ms"}},
                                   redis={"prefix": PREFIX},
                                   admin={"port": self.admin_port, "token": TOKEN})
        self.keys = Keys.of(load_config(self.config))
        self.redis = redis_server.client()
        self.url = f"http://127.0.0.1:{self.admin_port}/"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, _, data = call(self.url + path, method, body, TOKEN)
        assert status == 200, (path, status, data)
        return data

    def state(self, event_id: str, sub: str) -> str:
        value = self.redis.hget(self.keys.deliveries(event_id), sub)
        return value[:1].decode() if value else ""


@pytest.fixture(scope="module")
def hub(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(redis_server, tmp_path_factory.mktemp("console"))
    try:
        with worker(h.config, h.tmp / "worker.log"), \
                process(relay_cmd("--config", str(h.config), "admin"),
                        log_path=h.tmp / "admin.log"):
            wait_http(h.url + "healthz")
            yield h
    finally:
        h.sink.stop()
        h.redis.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def shot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=str(DOCS / name), full_page=True)


def test_console_overview_event_timeline_and_dead_letter_replay(hub: Hub, browser: Any) -> None:
    from playwright.sync_api import expect

    # Traffic: events of six orders shipped and one invoiced; crm answers 503 (its letters go
    # dead), billing 500 (one dead letter), analytics is paused (its deliveries wait).
    hub.api("POST", "api/subscribers/analytics/pause")
    bodies = [sample("order_shipped.json", e, o) for e, o in SHIPPED]
    bodies.append(sample("order_invoiced_docs_variant.json", *INVOICED))
    ids = enqueue_events(hub.redis, bodies, PREFIX)
    invoiced = INVOICED[0]
    wait_until(lambda: all(hub.state(e, "crm") == "x" and hub.state(e, "erp") == "d"
                           for e in ids) and hub.state(invoiced, "billing") == "x",
               20, 0.05, what="every event delivered to erp and dead for crm")

    page = browser.new_page(viewport={"width": 1360, "height": 900})
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(hub.url)

    # The token, once: the first API call's 401 opens the form.
    page.get_by_test_id("token-input").fill(TOKEN)
    page.get_by_test_id("token-submit").click()
    expect(page.locator("#token-dialog")).not_to_be_visible()

    rows = page.get_by_test_id("subscriber-row")
    expect(rows).to_have_count(5)
    expect(page.locator('[data-testid="subscriber-row"][data-name="analytics"]')) \
        .to_have_attribute("data-state", "paused")
    expect(rows.first).to_have_attribute("data-name", "analytics")  # unhealthy first
    crm = page.locator('[data-testid="subscriber-row"][data-name="crm"]')
    expect(crm.get_by_test_id("state-badge")).to_have_text("active")
    expect(crm.locator("td.c-error")).to_have_text("HTTP 503")
    expect(page.get_by_test_id("hub-status")).not_to_have_attribute("data-status", "unknown")
    expect(page.locator("#stat-dead")).to_have_text(str(len(ids) + 1))

    # The chart: a canvas with something drawn on it, and data (no "nothing to show" line).
    chart = page.get_by_test_id("chart-deliveries")
    expect(chart.locator("canvas")).to_have_count(1)
    expect(chart.locator(".chart-empty")).to_be_hidden()
    painted = page.evaluate("""() => {
        const c = document.querySelector('[data-testid="chart-deliveries"] canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
        return {width: c.width, height: c.height, painted: n};
    }""")
    assert painted["width"] > 300 and painted["painted"] > 1000, painted
    shot(page, "console-overview.png")

    # Search an event ID: its timeline, a lane per subscriber with its attempts.
    page.get_by_test_id("search-input").fill(invoiced)
    page.get_by_test_id("search-input").press("Enter")
    view = page.get_by_test_id("event-view")
    expect(view).to_be_visible()
    assert page.evaluate("location.hash") == f"#/event/{invoiced}"
    lanes = view.get_by_test_id("event-lane")
    expect(lanes).to_have_count(5)

    def lane(name: str) -> Any:
        return view.locator(f'[data-testid="event-lane"][data-subscriber="{name}"]')

    expected = {"erp": ("delivered", 1), "warehouse": ("delivered", 1), "crm": ("dead", 2),
                "billing": ("dead", 2), "analytics": ("paused", 0)}
    for name, (state, count) in expected.items():
        expect(lane(name)).to_have_attribute("data-state", state)
        expect(lane(name).get_by_test_id("attempt-row")).to_have_count(count)
    expect(lane("crm").get_by_test_id("attempt-row").nth(1)).to_contain_text("503")
    expect(lane("crm")).to_contain_text("2 attempts failed")
    expect(lane("billing").get_by_test_id("resend-button")).to_be_enabled()
    expect(page.get_by_test_id("event-body")).to_contain_text("40-XK551")
    shot(page, "console-event.png")

    # Dead letters: every letter listed; then billing's only letter, replayed once billing
    # is fixed: the dry run's count first, then the replay.
    page.get_by_test_id("dlq-tab").click()
    expect(page.get_by_test_id("dlq-row")).to_have_count(len(ids) + 1)
    expect(page.locator("#dlq-total")).to_have_text(f"{len(ids) + 1} dead letters")
    shot(page, "console-dead-letters.png")

    hub.sink.behave("/billing", lambda n: Reply(200))
    page.get_by_test_id("dlq-subscriber").select_option("billing")
    letters = page.get_by_test_id("dlq-row")
    expect(letters).to_have_count(1)
    expect(letters.first).to_have_attribute("data-event", invoiced)
    page.get_by_test_id("replay-button").click()
    expect(page.locator("#replay-text")).to_have_text("1 dead letter matches; replay it?")
    # A dry run only: the letter is still there, nothing was posted.
    assert hub.redis.exists(hub.keys.letter("billing", invoiced))
    assert len(hub.sink.on("/billing")) == 2
    confirm = page.get_by_test_id("replay-confirm")
    expect(confirm).to_have_text("Replay 1")
    confirm.click()
    expect(page.locator("#replay-text")).to_have_text("Replayed 1 dead letter.")
    expect(page.get_by_test_id("dlq-row")).to_have_count(0)

    got = hub.sink.wait_for("/billing", 3, timeout=15)
    assert got[-1].event_id == invoiced
    wait_until(lambda: hub.state(invoiced, "billing") == "d", 10, what="billing delivered")
    page.goto(hub.url + f"#/event/{invoiced}")
    expect(lane("billing")).to_have_attribute("data-state", "delivered")
    expect(lane("billing").get_by_test_id("attempt-row")).to_have_count(3)
    expect(page.locator("#token-dialog")).not_to_be_visible()  # the token was asked once
    assert errors == []
    page.close()
