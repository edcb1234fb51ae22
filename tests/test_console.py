"""The admin console in a real headless browser (Debian's ``chromium``, driven by Playwright)
against a real hub: a ``relay worker`` and a ``relay admin`` subprocess on the private Redis,
with an admin token, and recording sinks.

Every page is served with the Content-Security-Policy the admin sends (``default-src 'self';
frame-ancestors 'none'``, added here to the console's document) and any script error or CSP
violation fails the test.

The tests share one hub and run in file order: what each leaves (dead letters, a subscriber
fixed) is what the next expects.

With ``RELAY_SCREENSHOTS=1`` it also saves docs/console-overview.png, docs/console-event.png
(a failing subscriber's answer opened), docs/console-order.png and
docs/console-dead-letters.png (the README shows them); normal runs leave them alone.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relay.config import load_config
from relay.keys import Keys
from tests.hub import (
    STANDARD_SECRET,
    Reply,
    Sink,
    call,
    enqueue_events,
    plant_expired_letters,
    worker,
    write_config,
)
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
#: What the admin's pages carry (docs/admin-api.md); the console must work under it.
CSP = "default-src 'self'; frame-ancestors 'none'"

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


def stock(event_id: str) -> bytes:
    doc = json.loads((SAMPLES / "stock_update.json").read_text())
    doc["eventId"] = event_id
    return msgspec.json.encode(doc)


SHIPPED = [(f"N01CIB9VVFYKR9J{n:03d}", f"20-RD{128 + n}") for n in range(6)]
INVOICED = ("P7QK2M4R8T1V3X5Z9B", "40-XK551")
VOIDED = ("V0IDQ8W2E4R6T8Y1U3", "20-RD128")
#: What billing answers while it fails: the ERP's own words, which the console must show.
BILLING_ERROR = msgspec.json.encode({
    "error": "Internal Server Error",
    "detail": "Posting invoice for order 40-XK551 failed: ledger period 2026-12 is closed "
              "(ERP-4471)",
    "requestId": "b7e1c2d4-0f3a-4c5e-9a8b-1d2e3f4a5b6c"})
#: What crm answers: a proxy's 6 KB error page (kept up to 4 KiB).
CRM_PAGE = (b"<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head><body>"
            b"<h1>Service Unavailable</h1><p>The CRM is down for maintenance.</p><!-- "
            + b"padding " * 750 + b"--></body></html>")


class Hub:
    def __init__(self, redis_server: RedisServer, tmp: Path) -> None:
        self.tmp = tmp
        self.sink = Sink().start()
        self.sink.behave("/erp", lambda n: Reply(200, delay=random.uniform(0.004, 0.04)))
        self.crm_fails()
        self.billing_fails()
        url = self.sink.url
        subs = [
            {"name": "erp", "url": url("/erp"), "secret": "erp-secret"},
            {"name": "warehouse", "url": url("/warehouse"), "secret": STANDARD_SECRET,
             "signature": "standard", "event_types": ["im::order_*"]},
            {"name": "crm", "url": url("/crm"), "secret": "crm-secret-do-not-show",
             "max_attempts": 2, "event_types": ["im::order_*"],
             "headers": {"Authorization": "Bearer crm-token-do-not-show"}},
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

    def crm_fails(self) -> None:
        self.sink.behave("/crm", lambda n: Reply(503, {"Content-Type": "text/html"},
                                                 body=CRM_PAGE))

    def billing_fails(self) -> None:
        self.sink.behave("/billing", lambda n: Reply(
            500, {"Content-Type": "application/json", "X-Request-Id": "b7e1c2d4"},
            body=BILLING_ERROR))

    def api(self, method: str, path: str, body: Any = None) -> Any:
        status, _, data = call(self.url + path, method, body, TOKEN)
        assert status == 200, (path, status, data)
        return data

    def state(self, event_id: str, sub: str) -> str:
        value = self.redis.hget(self.keys.deliveries(event_id), sub)
        return value[:1].decode() if value else ""

    def dead(self, sub: str) -> list[str]:
        return sorted(m.decode() for m in self.redis.zrange(self.keys.dead(sub), 0, -1))


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
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=10_000)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_console(hub: Hub, browser: Any, route: str = "", *, token: bool = True,
                 **context: Any) -> Any:
    """A page on the console at ``route`` (a hash) in a context of its own (``context``:
    Playwright's options, e.g. ``timezone_id``), its document served with CSP; with
    ``token``, the tab already holds the admin token. Script errors and CSP violations are
    collected (``page_errors``)."""
    ctx = browser.new_context(viewport={"width": 1360, "height": 900}, **context)
    page = ctx.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text)
            if msg.type == "error" and "Content Security Policy" in msg.text else None)

    def with_csp(route: Any) -> None:
        answer = route.fetch()
        route.fulfill(response=answer,
                      headers={**answer.headers, "content-security-policy": CSP})

    page.route(hub.url, with_csp)  # the console's document (a URL has no hash)
    if token:
        page.add_init_script(f"sessionStorage.setItem('relay.adminToken', {json.dumps(TOKEN)})")
    page.relay_errors = errors
    page.goto(hub.url + route)
    return page


def close(page: Any) -> None:
    assert page_errors(page) == []
    page.context.close()


def page_errors(page: Any) -> list[str]:
    return list(page.relay_errors)


def shot(page: Any, name: str) -> None:
    if SCREENSHOTS:
        page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the page
        page.screenshot(path=str(DOCS / name), full_page=True)


def lane(page: Any, name: str) -> Any:
    return page.locator(f'[data-testid="event-lane"][data-subscriber="{name}"]')


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

    page = open_console(hub, browser, token=False)
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
    # The header's figures say what they count.
    expect(page.locator(".stats dt")).to_have_text(["Events accepted 1 h", "Deliveries 1 h",
                                                    "Failed attempts 1 h", "Dead letters",
                                                    "Oldest backlog"])

    # The charts: canvases with something drawn on them, and data (no "nothing to show").
    for name in ("chart-deliveries", "chart-failures", "chart-backlog"):
        expect(page.get_by_test_id(name).locator("canvas")).to_have_count(1)
    expect(page.get_by_test_id("chart-deliveries").locator(".chart-empty")).to_be_hidden()
    expect(page.get_by_test_id("chart-failures").locator(".chart-empty")).to_be_hidden()
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
    expect(view.get_by_test_id("event-lane")).to_have_count(5)
    expected = {"erp": ("delivered", 1), "warehouse": ("delivered", 1), "crm": ("dead", 2),
                "billing": ("dead", 2), "analytics": ("paused", 0)}
    for name, (state, count) in expected.items():
        expect(lane(page, name)).to_have_attribute("data-state", state)
        expect(lane(page, name).get_by_test_id("attempt-row")).to_have_count(count)
    expect(lane(page, "crm").get_by_test_id("attempt-row").nth(1)).to_contain_text("503")
    expect(lane(page, "crm")).to_contain_text("2 attempts failed")
    expect(lane(page, "billing").get_by_test_id("resend-button")).to_be_enabled()
    expect(page.get_by_test_id("event-body")).to_contain_text("40-XK551")
    # Why billing fails, in its own words: the attempt opens to the ERP's answer.
    attempt = lane(page, "billing").get_by_test_id("attempt-row").nth(1)
    expect(attempt).to_contain_text("ledger period 2026-12 is closed")
    attempt.click()
    detail = lane(page, "billing").get_by_test_id("attempt-detail").nth(1)
    expect(detail).to_be_visible()
    expect(detail.get_by_test_id("response-body")).to_contain_text(
        "Posting invoice for order 40-XK551 failed: ledger period 2026-12 is closed")
    expect(detail.get_by_test_id("response-pane")).to_contain_text("HTTP 500")
    expect(detail.get_by_test_id("request-pane")).to_contain_text(
        f"POST {hub.sink.url('/billing')}")
    page.locator("details.body > summary").click()  # the body folds away
    expect(page.get_by_test_id("event-body")).to_be_hidden()
    shot(page, "console-event.png")

    # Dead letters: every letter listed; then billing's only letter, replayed once billing
    # is fixed: the dry run's count first, then the replay.
    page.get_by_test_id("dlq-tab").click()
    expect(page.get_by_test_id("dlq-row")).to_have_count(len(ids) + 1)
    expect(page.locator("#dlq-total")).to_have_text(f"{len(ids) + 1} dead letters")
    assert page.get_by_test_id("search-input").input_value() == ""  # left the search
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
    billing = lane(page, "billing")
    expect(billing).to_have_attribute("data-state", "delivered")
    expect(billing.get_by_test_id("attempt-row")).to_have_count(3)
    # The replay is a new run, marked as such, numbered from 1 again.
    expect(billing.get_by_test_id("run-head")).to_have_attribute("data-trigger", "replay")
    replayed = billing.get_by_test_id("attempt-row").nth(2)
    expect(replayed).to_have_attribute("data-trigger", "replay")
    expect(replayed).to_have_attribute("data-attempt", "1")
    expect(replayed.get_by_test_id("attempt-tag")).to_have_text("replay")
    expect(page.locator("#token-dialog")).not_to_be_visible()  # the token was asked once
    close(page)


def test_an_attempt_opens_to_its_request_and_response_and_a_resend_is_a_new_run(
        hub: Hub, browser: Any) -> None:
    from playwright.sync_api import expect

    shipped = SHIPPED[0][0]
    page = open_console(hub, browser, f"#/event/{shipped}",
                        permissions=["clipboard-read", "clipboard-write"])
    crm = lane(page, "crm")
    expect(crm.get_by_test_id("attempt-row")).to_have_count(2)
    expect(crm.get_by_test_id("attempt-detail").first).to_be_hidden()
    crm.get_by_test_id("attempt-row").first.click()
    detail = crm.get_by_test_id("attempt-detail").first
    expect(detail).to_be_visible()
    request = detail.get_by_test_id("request-pane")
    expect(request).to_contain_text(f"POST {hub.sink.url('/crm')}")
    expect(request).to_contain_text("X-Hub-Signature: ")
    expect(request).to_contain_text("Authorization: ***")
    response = detail.get_by_test_id("response-pane")
    expect(response).to_contain_text("HTTP 503")
    expect(response).to_contain_text("Content-Type: text/html")
    expect(detail.get_by_test_id("response-body")).to_contain_text("The CRM is down")
    expect(detail.get_by_test_id("truncated")).to_contain_text("Truncated at 4 KiB")
    # Monospace, and copyable as text.
    font = detail.get_by_test_id("response-body").evaluate("e => getComputedStyle(e).fontFamily")
    assert "monospace" in font, font
    detail.get_by_test_id("copy-response").click()
    copied = page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("HTTP 503\n") and "The CRM is down" in copied
    text = page.locator("body").inner_text()
    for secret in ("crm-secret-do-not-show", "crm-token-do-not-show"):
        assert secret not in text

    # Sent again to erp (delivered before): a new run, marked, numbered from 1; the crm
    # attempt opened above stays open while the page follows the new delivery.
    erp = lane(page, "erp")
    erp.get_by_test_id("resend-button").click()
    expect(erp.get_by_test_id("attempt-row")).to_have_count(2)
    expect(erp.get_by_test_id("run-head")).to_have_attribute("data-trigger", "resend")
    expect(erp.get_by_test_id("run-head")).to_contain_text("Sent again by an operator")
    again = erp.get_by_test_id("attempt-row").nth(1)
    expect(again).to_have_attribute("data-attempt", "1")
    expect(again.get_by_test_id("attempt-tag")).to_have_text("resend")
    expect(erp.get_by_test_id("attempt-row").first).to_have_attribute("data-trigger", "auto")
    expect(crm.get_by_test_id("attempt-detail").first).to_be_visible()
    # The keyboard opens an attempt too.
    erp.get_by_test_id("attempt-row").nth(1).focus()
    page.keyboard.press("Enter")
    expect(erp.get_by_test_id("attempt-detail").nth(1)).to_be_visible()
    expect(erp.get_by_test_id("attempt-detail").nth(1)).to_contain_text(
        "Body not kept for a 2xx answer")
    close(page)


def test_the_events_page_filters_and_pages_with_the_cursor(hub: Hub, browser: Any) -> None:
    from playwright.sync_api import expect

    # 55 stock updates (to erp; analytics is paused): more than one page of 50.
    stocks = enqueue_events(hub.redis, [stock(f"STK{n:03d}") for n in range(55)], PREFIX)
    wait_until(lambda: all(hub.state(e, "erp") == "d" for e in stocks), 20, 0.05,
               what="stock updates delivered to erp")
    erp_events = hub.api("GET", "api/events?subscriber=erp&limit=500")["events"]

    page = open_console(hub, browser, "#/events?subscriber=erp")
    rows = page.get_by_test_id("events-row")
    expect(rows).to_have_count(50)
    expect(page.get_by_test_id("events-subscriber")).to_have_value("erp")
    page.get_by_test_id("events-more").click()
    expect(rows).to_have_count(len(erp_events))
    expect(page.get_by_test_id("events-more")).to_be_hidden()
    listed = rows.evaluate_all("rs => rs.map(r => r.dataset.event)")
    assert listed == [e["eventId"] for e in erp_events]  # newest first, each once

    # State and subscriber: crm's dead events.
    page.get_by_test_id("events-subscriber").select_option("crm")
    page.get_by_test_id("events-state").select_option("dead")
    dead = hub.api("GET", "api/events?subscriber=crm&state=dead&limit=500")["events"]
    expect(rows).to_have_count(len(dead))
    assert "state=dead" in page.evaluate("location.hash")
    # An order number.
    page.get_by_test_id("events-subscriber").select_option("")
    page.get_by_test_id("events-state").select_option("")
    page.get_by_test_id("events-order").fill(SHIPPED[2][1])
    page.get_by_test_id("events-order").press("Enter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-event", SHIPPED[2][0])
    # A time range with nothing in it.
    page.goto(hub.url + "#/events?range=custom&until=2001-01-01T00:00:00")
    expect(page.locator("#events-body")).to_contain_text("No events match these filters.")
    # A row opens its event.
    page.goto(hub.url + f"#/events?order={SHIPPED[3][1]}")
    rows.first.click()
    expect(page.get_by_test_id("event-view")).to_be_visible()
    assert page.evaluate("location.hash") == f"#/event/{SHIPPED[3][0]}"
    close(page)


def test_the_order_page_shows_every_event_of_an_order_and_each_subscribers_state(
        hub: Hub, browser: Any) -> None:
    from playwright.sync_api import expect

    shipped, number = SHIPPED[0]
    (voided,) = enqueue_events(hub.redis, [sample("order_voided_spec_variant.json", *VOIDED)],
                               PREFIX)
    wait_until(lambda: hub.state(voided, "erp") == "d" and hub.state(voided, "crm") == "x",
               20, 0.05, what="the voided event delivered to erp, dead for crm")

    page = open_console(hub, browser)
    page.get_by_test_id("search-input").fill(number)
    page.get_by_test_id("search-input").press("Enter")
    view = page.get_by_test_id("order-view")
    expect(view).to_be_visible()
    assert page.evaluate("location.hash") == f"#/order/{number}"
    rows = view.get_by_test_id("order-row")
    expect(rows).to_have_count(2)
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.event)") == [shipped, voided]

    def state(event_id: str, sub: str) -> Any:
        return view.locator(f'[data-testid="order-row"][data-event="{event_id}"] '
                            f'[data-testid="order-state"][data-subscriber="{sub}"]')

    for event_id in (shipped, voided):
        expect(state(event_id, "erp")).to_have_text("delivered")
        expect(state(event_id, "crm")).to_have_text("dead")
        expect(state(event_id, "analytics")).to_have_text("paused")
    expect(state(shipped, "billing")).to_have_count(0)  # not for billing (not invoiced)
    expect(page.get_by_test_id("ordering-banner")).to_have_count(0)  # no ordered subscriber
    assert page.get_by_test_id("search-input").input_value() == number
    rows.nth(1).get_by_role("link", name=voided).click()
    expect(page.get_by_test_id("event-view")).to_be_visible()

    # An order no event carries.
    page.get_by_test_id("search-input").fill("20-NOSUCH")
    page.get_by_test_id("search-input").press("Enter")
    expect(page.locator("#view-order")).to_contain_text("Nothing found for “20-NOSUCH”")
    # Leaving the search clears the box.
    page.get_by_test_id("overview-tab").click()
    expect(page.get_by_test_id("search-input")).to_have_value("")
    close(page)


def test_the_pill_names_a_subscriber_failing_every_attempt_and_times_carry_their_zone(
        hub: Hub, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_console(hub, browser)
    pill = page.get_by_test_id("hub-status")
    expect(pill).to_have_attribute("data-status", "degraded")
    reason = page.get_by_test_id("hub-reason")
    expect(reason).to_have_attribute("title", re.compile(
        r"(^|\n)crm: every attempt failed in the last 5 min($|\n)"))
    expect(reason).to_be_visible()
    expect(page.locator('[data-testid="subscriber-row"][data-name="crm"]')) \
        .to_have_class(re.compile(r"\bfailing\b"))
    expect(page.locator('[data-testid="subscriber-row"][data-name="erp"]')) \
        .not_to_have_class(re.compile(r"\bfailing\b"))
    close(page)

    # Every time says its zone: the browser's own.
    for zone, pattern in (("UTC", r"UTC"), ("Europe/Berlin", r"(CET|CEST|GMT\+[12])")):
        page = open_console(hub, browser, f"#/event/{SHIPPED[1][0]}", timezone_id=zone)
        received = page.locator(".event-head dd").nth(1)
        expect(received).to_have_text(re.compile(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d {pattern} "))
        expect(lane(page, "erp").locator("td.c-time").first).to_contain_text(
            re.compile(rf"\d\d:\d\d:\d\d\.\d{{3}} {pattern}"))
        close(page)


def test_the_token_dialog_can_be_dismissed_and_the_token_forgotten(
        hub: Hub, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_console(hub, browser, token=False)
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    page.get_by_test_id("token-cancel").click()
    expect(dialog).not_to_be_visible()
    expect(page.get_by_test_id("hub-status")).to_have_attribute("data-status", "locked")
    prompt = page.get_by_test_id("token-prompt")
    expect(prompt).to_be_visible()
    page.wait_for_timeout(6000)  # a poll goes by: the dismissed dialog does not come back
    expect(dialog).not_to_be_visible()

    prompt.click()
    expect(dialog).to_be_visible()
    page.get_by_test_id("token-input").fill(TOKEN)
    page.get_by_test_id("token-submit").click()
    expect(page.get_by_test_id("hub-status")).to_have_attribute("data-status", "degraded")
    expect(page.get_by_test_id("subscriber-row")).to_have_count(5)

    forget = page.get_by_test_id("token-forget")
    expect(forget).to_be_visible()
    forget.click()
    assert page.evaluate("sessionStorage.getItem('relay.adminToken')") is None
    expect(dialog).to_be_visible()  # asked again at once
    page.keyboard.press("Escape")  # dismissed again, with Escape
    expect(dialog).not_to_be_visible()
    expect(forget).to_be_hidden()
    close(page)


def test_charts_have_a_range_a_colour_per_subscriber_and_the_last_values_in_the_legend(
        hub: Hub, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_console(hub, browser)
    deliveries = page.get_by_test_id("chart-deliveries")
    expect(deliveries.locator("canvas")).to_have_count(1)
    ranges = page.get_by_test_id("chart-range")
    expect(ranges.locator('button[aria-pressed="true"]')).to_have_text("1 h")

    def legend(chart: Any) -> dict[str, dict[str, str]]:
        return chart.evaluate("""el => Object.fromEntries([...el.querySelectorAll(
            '.u-legend .u-series')].slice(1).map(s => [s.querySelector('.u-label').textContent, {
              colour: getComputedStyle(s.querySelector('.u-marker')).backgroundColor,
              value: s.querySelector('.u-value').textContent}]))""")

    names = {"erp", "warehouse", "crm", "billing", "analytics"}
    shown = legend(deliveries)
    assert set(shown) == names, shown
    colours = {name: v["colour"] for name, v in shown.items()}
    assert len(set(colours.values())) == len(names), colours  # one colour each
    # Off the chart, the legend shows each line's last value (a number, not a dash).
    assert all(v["value"].replace(",", "").isdigit() for v in shown.values()), shown
    # Failures per subscriber, in the same colours.
    failures = legend(page.get_by_test_id("chart-failures"))
    assert {n: v["colour"] for n, v in failures.items()} == colours
    # The cursor over the chart shows that minute; off it, the last values again.
    box = deliveries.locator("canvas").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + box["height"] / 2)
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.move(5, 5)
    assert legend(deliveries) == shown

    ranges.get_by_role("button", name="6 h").click()
    assert page.evaluate("location.hash") == "#/?range=6h"
    expect(ranges.locator('button[aria-pressed="true"]')).to_have_text("6 h")
    expect(page.locator(".chart-range-name").first).to_have_text("last 6 hours · per 5 min")
    expect(deliveries.locator("canvas")).to_have_count(1)
    expect(deliveries.locator(".u-legend")).to_contain_text("erp")
    # Points of five minutes: the chart's sum over the range is the API's.
    stats = hub.api("GET", "api/stats?minutes=360")
    total = sum(stats["subscribers"]["erp"]["delivered"])
    assert total > 0
    ranges.get_by_role("button", name="24 h").click()
    expect(page.locator(".chart-range-name").first).to_have_text("last 24 hours · per 15 min")
    expect(deliveries.locator("canvas")).to_have_count(1)
    assert legend(deliveries).keys() == names
    close(page)


def test_dead_letters_replay_and_delete_per_row_or_selected_and_purge(
        hub: Hub, browser: Any) -> None:
    from playwright.sync_api import expect

    hub.sink.behave("/crm", lambda n: Reply(200))  # crm is fixed: replays are delivered
    letters = hub.dead("crm")
    assert len(letters) >= 6, letters
    page = open_console(hub, browser, "#/dlq?subscriber=crm")
    rows = page.get_by_test_id("dlq-row")
    expect(rows).to_have_count(len(letters))

    def row(event_id: str) -> Any:
        return page.locator(f'[data-testid="dlq-row"][data-event="{event_id}"]')

    mark = len(hub.sink.on("/crm"))

    def posted(event_id: str) -> bool:
        """Posted to crm since the page opened."""
        return any(r.event_id == event_id for r in hub.sink.on("/crm")[mark:])

    # One row: replayed at once.
    first, second, third, fourth, fifth = letters[:5]
    row(first).get_by_test_id("dlq-row-replay").click()
    expect(row(first)).to_have_count(0)
    wait_until(lambda: hub.state(first, "crm") == "d", 15, what="the replayed letter delivered")

    # Two selected, replayed together.
    row(second).get_by_test_id("dlq-select").check()
    row(third).get_by_test_id("dlq-select").check()
    expect(page.get_by_test_id("dlq-replay-selected")).to_have_text("Replay selected (2)")
    page.get_by_test_id("dlq-replay-selected").click()
    expect(page.locator("#replay-text")).to_have_text("Replayed 2 dead letters.")
    expect(rows).to_have_count(len(letters) - 3)
    wait_until(lambda: hub.state(second, "crm") == "d" and hub.state(third, "crm") == "d", 15,
               what="both replayed letters delivered")

    # One row deleted, after a question; then one selected.
    row(fourth).get_by_test_id("dlq-row-delete").click()
    expect(page.locator("#replay-text")).to_contain_text(
        f"Delete the dead letter of {fourth} for crm?")
    page.get_by_test_id("delete-confirm").click()
    expect(page.locator("#replay-text")).to_have_text("Deleted 1 dead letter.")
    expect(row(fourth)).to_have_count(0)
    row(fifth).get_by_test_id("dlq-select").check()
    page.get_by_test_id("dlq-delete-selected").click()
    page.get_by_test_id("delete-confirm").click()
    expect(page.locator("#replay-text")).to_have_text("Deleted 1 dead letter.")
    expect(rows).to_have_count(len(letters) - 5)
    assert not hub.redis.exists(hub.keys.letter("crm", fourth))
    assert not posted(fourth) and not posted(fifth)

    # Select all, then purge everything matching the filter behind its dry-run count.
    page.get_by_test_id("dlq-select-all").check()
    expect(page.get_by_test_id("dlq-delete-selected")).to_have_text(
        f"Delete selected ({len(letters) - 5})")
    page.get_by_test_id("purge-button").click()
    left = len(letters) - 5
    expect(page.locator("#replay-text")).to_have_text(
        f"{left} dead letters match; delete them? This cannot be undone.")
    assert len(hub.dead("crm")) == left  # a dry run only
    page.get_by_test_id("purge-confirm").click()
    expect(page.locator("#replay-text")).to_have_text(f"Deleted {left} dead letters.")
    expect(page.locator("#dlq-body")).to_contain_text("No dead letters match these filters.")
    assert hub.dead("crm") == []
    close(page)


def test_dead_letter_replay_goes_on_past_letters_that_cannot_be_replayed(
        hub: Hub, browser: Any) -> None:
    """Issue 19, 9c: the replay loop stopped at the first batch that replayed nothing, though
    replayable letters remained behind letters whose event had expired."""
    from playwright.sync_api import expect

    hub.billing_fails()
    bodies = [sample("order_invoiced_docs_variant.json", f"INV-REPLAY-{n}", f"40-RP{n}")
              for n in range(3)]
    replayable = enqueue_events(hub.redis, bodies, PREFIX)
    wait_until(lambda: all(hub.state(e, "billing") == "x" for e in replayable), 20, 0.05,
               what="three dead letters for billing")
    hub.sink.behave("/billing", lambda n: Reply(200))  # billing is fixed
    # More letters than one replay step takes, newer than those three, whose event expired.
    expired = plant_expired_letters(hub.redis, PREFIX, "billing", 205)
    total = len(replayable) + len(expired)
    page = open_console(hub, browser, "#/dlq?subscriber=billing")
    expect(page.locator("#dlq-total")).to_have_text(f"{total} dead letters")
    page.get_by_test_id("replay-button").click()
    expect(page.get_by_test_id("replay-confirm")).to_have_text(f"Replay {total}")
    page.get_by_test_id("replay-confirm").click()
    expect(page.locator("#replay-text")).to_have_text(
        f"Replayed {len(replayable)} dead letters; {len(expired)} could not be replayed "
        "(their event has expired).", timeout=30_000)
    wait_until(lambda: all(hub.state(e, "billing") == "d" for e in replayable), 15,
               what="the replayable letters delivered")
    assert hub.dead("billing") == sorted(expired)
    hub.api("DELETE", "api/dlq", {"subscriber": "billing"})
    close(page)


def test_an_ordered_subscribers_blocked_order_shows_why_and_replaying_its_head_moves_it_on(
        redis_server: RedisServer, browser: Any, tmp_path: Path) -> None:
    """erp orders by order number with on_dead: block; the order's first event dead-letters:
    the overview lists the blocked key, the order page says what its events wait behind, and
    replaying the head from the banner delivers the whole order, in order."""
    from playwright.sync_api import expect

    sink = Sink().start()
    failing = {"on": True}
    head, number = "N01CIB9VVFYKR9J900", "20-RD900"
    sink.behave_per_event("/erp", lambda e, n: Reply(500) if e == head and failing["on"]
                          else Reply(200))
    admin_port = free_port()
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [
        {"name": "erp", "url": sink.url("/erp"), "secret": "erp-secret", "max_attempts": 1,
         "ordering": {"by": "order", "on_dead": "block"}},
        {"name": "warehouse", "url": sink.url("/warehouse"), "secret": "wh-secret"}],
        redis={"prefix": "ordconsole:"}, admin={"port": admin_port, "token": TOKEN})
    keys = Keys.of(load_config(config))
    client = redis_server.client()
    site = type("Site", (), {"url": f"http://127.0.0.1:{admin_port}/"})()
    ids = [head, "N01CIB9VVFYKR9J901", "N01CIB9VVFYKR9J902"]
    bodies = [sample("order_shipped.json", ids[0], number),
              sample("order_invoiced_docs_variant.json", ids[1], number),
              sample("order_voided_spec_variant.json", ids[2], number)]
    try:
        with worker(config, tmp_path / "worker.log"), \
                process(relay_cmd("--config", str(config), "admin"),
                        log_path=tmp_path / "admin.log"):
            wait_http(site.url + "healthz")
            enqueue_events(client, bodies, "ordconsole:", config=load_config(config))
            wait_until(lambda: client.zcard(keys.order_blocked("erp")) == 1, 20, 0.05,
                       what="the order blocked by its dead head")

            page = open_console(site, browser)
            card = page.get_by_test_id("ordering-card")
            expect(card).to_be_visible()
            key = card.locator(f'[data-testid="ordering-key"][data-key="{number}"]')
            expect(key).to_have_attribute("data-state", "blocked")
            expect(card.get_by_test_id("ordering-waiting")).to_have_text("2 events waiting")
            key.get_by_role("link", name=number).click()

            view = page.get_by_test_id("order-view")
            banner = page.get_by_test_id("ordering-banner")
            expect(banner).to_have_attribute("data-state", "blocked")
            expect(banner).to_contain_text("erp: waiting behind")
            expect(banner).to_contain_text("2 events waiting")
            for event_id in ids[1:]:
                expect(view.locator(f'[data-testid="order-row"][data-event="{event_id}"] '
                                    '[data-testid="order-state"][data-subscriber="erp"]')
                       ).to_have_text("waiting")
            shot(page, "console-order.png")

            failing["on"] = False
            banner.get_by_test_id("banner-replay").click()
            expect(page.get_by_test_id("ordering-banner")).to_have_count(0, timeout=20_000)
            for event_id in ids:
                expect(view.locator(f'[data-testid="order-row"][data-event="{event_id}"] '
                                    '[data-testid="order-state"][data-subscriber="erp"]')
                       ).to_have_text("delivered", timeout=20_000)
            close(page)
        erp_order = [r.event_id for r in sorted(sink.on("/erp"), key=lambda r: r.arrived)]
        assert erp_order == [head, head, ids[1], ids[2]]
    finally:
        sink.stop()
        client.close()
