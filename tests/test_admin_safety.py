"""The admin is not any web page's to drive (docs/admin-api.md, "Safe from other web pages").

Against a real ``relay admin`` as ``make run`` starts it (loopback, no token), a real
``relay worker`` and a recording sink: a page of another site cannot pause a subscriber
(a plain HTML form), resend events or replay dead letters (a ``text/plain`` fetch), and a
page whose DNS name was re-pointed at the admin's address (DNS rebinding) reads nothing;
the console's own calls and a shell's ``curl`` are served. The browser test drives Debian's
Chromium with host-resolver rules standing in for the attacker's DNS.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from relay.config import load_config
from relay.keys import Keys
from tests.hub import Reply, Sink, enqueue_event, order_event, worker, write_config
from tests.support import RedisServer, free_port, process, relay_cmd, wait_http, wait_until

PREFIX = "safety:"
MARKER = "20-BODY-ONLY-THE-ADMIN-SHOWS"
EVENT_ID = "SAFETYEVENT0001"
CHROMIUM = Path("/usr/bin/chromium")


class Hub:
    """``relay worker`` and ``relay admin`` (loopback, no token) with two subscribers: erp
    answers 500 (one attempt: its letter goes dead), crm 200."""

    def __init__(self, redis_server: RedisServer, tmp: Path) -> None:
        self.tmp = tmp
        self.sink = Sink().start()
        self.sink.behave("/erp", lambda n: Reply(500))
        self.port = free_port()
        self.path = write_config(tmp / "relay.yaml", redis_server.url, [
            {"name": "erp", "url": self.sink.url("/erp"), "secret": "s", "max_attempts": 1},
            {"name": "crm", "url": self.sink.url("/crm"), "secret": "s"},
        ], redis={"prefix": PREFIX}, admin={"port": self.port})
        self.keys = Keys.of(load_config(self.path))
        self.redis = redis_server.client()
        self.admin_log = tmp / "admin.log"

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        """One request with exactly these headers (``Host`` too, if given)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            got = {k.lower(): v for k, v in resp.getheaders()}
        finally:
            conn.close()
        try:
            return resp.status, got, msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            return resp.status, got, raw.decode(errors="replace")

    def own(self) -> dict[str, str]:
        return {"Host": f"127.0.0.1:{self.port}"}

    def state(self, name: str) -> str:
        status, _, subs = self.request("GET", "/api/subscribers", self.own())
        assert status == 200, subs
        return next(s["state"] for s in subs if s["name"] == name)

    def dead_letters(self) -> int:
        return int(self.redis.zcard(self.keys.dead("erp")))

    def posts(self) -> tuple[int, int]:
        return len(self.sink.on("/erp")), len(self.sink.on("/crm"))

    def refusals(self) -> list[dict[str, Any]]:
        return [e for e in (msgspec.json.decode(line) for line in
                            self.admin_log.read_text().splitlines() if line.startswith("{"))
                if e.get("msg") == "admin request refused"]


@pytest.fixture(scope="module")
def hub(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(redis_server, tmp_path_factory.mktemp("safety"))
    try:
        with worker(h.path, h.tmp / "worker.log"), \
                process(relay_cmd("--config", str(h.path), "admin"), log_path=h.admin_log):
            wait_http(f"http://127.0.0.1:{h.port}/healthz")
            enqueue_event(h.redis, order_event(EVENT_ID, "im::order_shipped", (MARKER,)),
                          PREFIX)
            wait_until(lambda: h.dead_letters() == 1 and h.posts() == (1, 1), 30,
                       what="erp's dead letter and crm's delivery")
            yield h
    finally:
        h.sink.stop()
        h.redis.close()


def unchanged(hub: Hub, posts: tuple[int, int]) -> None:
    """Nothing a refused request could have done happened: erp active, its letter still
    dead, no post resent or replayed (given time for the worker to have made them)."""
    time.sleep(1.5)
    assert hub.state("erp") == "active"
    assert hub.dead_letters() == 1
    assert hub.posts() == posts


# -- refused -----------------------------------------------------------------------------------


def test_a_cross_site_html_form_cannot_pause_a_subscriber(hub: Hub) -> None:
    before = hub.posts()
    form = {**hub.own(), "Origin": "http://evil.example",
            "Content-Type": "application/x-www-form-urlencoded"}
    for body in (b"", b"x=1"):  # a form without fields, and one with
        status, headers, answer = hub.request("POST", "/api/subscribers/erp/pause", form, body)
        assert status == 403, answer
        assert headers["content-type"].startswith("application/json")
        assert "Origin 'http://evil.example'" in answer["error"]
    # A browser that sends no Origin still says where the request came from.
    status, _, answer = hub.request("POST", "/api/subscribers/erp/pause",
                                    {**hub.own(), "Sec-Fetch-Site": "cross-site"}, b"")
    assert status == 403 and "another site" in answer["error"]
    unchanged(hub, before)


def test_a_text_plain_request_cannot_resend_events_or_replay_dead_letters(hub: Hub) -> None:
    before = hub.posts()
    plain = {**hub.own(), "Content-Type": "text/plain"}
    for path, body in ((f"/api/events/{EVENT_ID}/resend", b"{}"),
                       ("/api/replay", b'{"dryRun": false}'),
                       ("/api/dlq", b'{"dryRun": false}')):
        method = "DELETE" if path == "/api/dlq" else "POST"
        # From another site's page: refused for where it comes from.
        status, _, answer = hub.request(method, path,
                                        {**plain, "Origin": "http://evil.example"}, body)
        assert status == 403 and "Origin" in answer["error"], (path, answer)
        # Without an Origin (not a browser), a body must still be JSON.
        status, _, answer = hub.request(method, path, plain, body)
        assert status == 415, (path, answer)
        assert "application/json" in answer["error"] and "text/plain" in answer["error"]
    unchanged(hub, before)


def test_a_host_that_is_not_the_admins_reads_nothing(hub: Hub) -> None:
    """DNS rebinding: the browser sends the attacker's name as Host."""
    for host in (f"rebind.evil.example:{hub.port}", "rebind.evil.example",
                 f"localhost:{hub.port + 1}", f"127.0.0.1.evil.example:{hub.port}", ""):
        for path in (f"/api/events/{EVENT_ID}", "/", "/static/console.js", "/metrics",
                     "/api/no-such-route"):
            status, headers, answer = hub.request("GET", path, {"Host": host})
            assert status == 421, (host, path, status)
            assert headers["content-type"].startswith("application/json")
            assert "does not name this admin" in answer["error"]
            assert MARKER not in str(answer)
    # A refusal is logged, naming what was wrong.
    assert any(e["status"] == 421 and "rebind.evil.example" in e["error"]
               for e in hub.refusals())


def test_healthz_answers_probes_whatever_name_they_use(hub: Hub) -> None:
    """Compose and Kubernetes healthchecks use a container name or a pod IP."""
    for host in ("admin:8081", "10.1.2.3:8081", "relay-admin", ""):
        status, _, answer = hub.request("GET", "/healthz", {"Host": host})
        assert (status, answer) == (200, {"status": "ok"})


# -- served ------------------------------------------------------------------------------------


def test_the_consoles_own_calls_and_a_shells_curl_are_served(hub: Hub) -> None:
    own_origin = f"http://127.0.0.1:{hub.port}"
    for host in (f"127.0.0.1:{hub.port}", f"localhost:{hub.port}", f"[::1]:{hub.port}",
                 f"LOCALHOST:{hub.port}"):
        status, _, answer = hub.request("GET", f"/api/events/{EVENT_ID}", {"Host": host})
        assert status == 200 and answer["eventId"] == EVENT_ID, (host, answer)
    # The console: its own Origin; no body and no Content-Type on pause/resume.
    console = {**hub.own(), "Origin": own_origin}
    status, _, answer = hub.request("POST", "/api/subscribers/crm/pause", console)
    assert status == 200 and answer["state"] == "paused", answer
    # curl: no Origin.
    status, _, answer = hub.request("POST", "/api/subscribers/crm/resume", hub.own())
    assert status == 200 and answer["state"] != "paused", answer
    json_body = {**console, "Content-Type": "application/json; charset=utf-8"}
    status, _, answer = hub.request("POST", "/api/replay", json_body,
                                    b'{"subscriber": "erp", "dryRun": true}')
    assert status == 200 and (answer["matched"], answer["replayed"]) == (1, 0), answer
    status, _, answer = hub.request("DELETE", "/api/dlq?dryRun=true", hub.own())
    assert status == 200 and answer["deleted"] == 0
    # The same Origin by another loopback name (the console opened as localhost).
    status, _, _ = hub.request("POST", "/api/subscribers/crm/resume",
                               {"Host": f"localhost:{hub.port}",
                                "Origin": f"http://localhost:{hub.port}"})
    assert status == 200


def test_console_pages_and_answers_carry_csp_nosniff_and_no_referrer(hub: Hub) -> None:
    for path in ("/", "/static/console.js", "/static/console.css", "/api/overview",
                 "/healthz", "/api/no-such-route"):
        status, headers, _ = hub.request("GET", path, hub.own())
        assert status in (200, 404), (path, status)
        csp = headers.get("content-security-policy", "")
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, (path, csp)
        assert headers.get("x-content-type-options") == "nosniff", path
        assert headers.get("referrer-policy") == "no-referrer", path


def test_allowed_hosts_admit_the_names_listed_and_no_others(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Off loopback (or behind a proxy or a container name) the names come from
    ``admin.allowed_hosts``: ``name`` for any port, ``name:port`` for that port."""
    from tests.hub import LiveAdmin

    path = write_config(tmp_path / "relay.yaml", redis_server.url, [],
                        redis={"prefix": PREFIX},
                        admin={"allowed_hosts": ["relay-admin", "Admin.Example:9443"]})
    with LiveAdmin(load_config(path)) as admin:
        def get(host: str, method: str = "GET", origin: str | None = None) -> int:
            headers = {"Host": host, **({"Origin": origin} if origin else {})}
            conn = http.client.HTTPConnection("127.0.0.1", admin.port, timeout=15)
            route = "/api/overview" if method == "GET" else "/api/subscribers/nope/pause"
            conn.request(method, route, headers=headers)
            status = conn.getresponse().status
            conn.close()
            return status

        for host in ("relay-admin", "relay-admin:8081", "admin.example:9443",
                     f"localhost:{admin.port}"):
            assert get(host) == 200, host
        for host in ("admin.example", "admin.example:443", "other-admin:8081", "[::2]:80"):
            assert get(host) == 421, host
        # A change from a page served under a listed name is the admin's own (404: no such
        # subscriber, past the checks); from any other site it is refused.
        assert get("admin.example:9443", "POST", "https://admin.example:9443") == 404
        assert get("relay-admin:8081", "POST", "http://relay-admin:8081") == 404
        assert get("relay-admin:8081", "POST", "https://evil.example") == 403
        assert get("relay-admin:8081", "POST", "null") == 403


# -- in a real browser -------------------------------------------------------------------------


EVIL_PAGE = """<!doctype html><title>cat pictures</title>
<form id="f" method="post" action="http://127.0.0.1:{port}/api/subscribers/erp/pause"></form>
<script>
(async () => {{
  const plain = {{method: 'POST', mode: 'no-cors', headers: {{'Content-Type': 'text/plain'}}}};
  await fetch('http://127.0.0.1:{port}/api/events/{event}/resend', {{...plain, body: '{{}}'}});
  await fetch('http://127.0.0.1:{port}/api/replay', {{...plain, body: '{{"dryRun": false}}'}});
  document.title = 'sent';
  document.getElementById('f').submit();
}})();
</script>"""


class EvilSite:
    """The attacker's page on its own port (reached as http://evil.example:<port>/)."""

    def __init__(self, html: str) -> None:
        self.port = free_port()
        self._html = html
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> EvilSite:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text=self._html, content_type="text/html")

        async def start() -> None:
            app = web.Application()
            app.router.add_get("/", page)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is missing")
def test_in_a_browser_another_sites_page_changes_nothing_and_a_rebound_name_reads_nothing(
        hub: Hub) -> None:
    from playwright.sync_api import sync_playwright

    before, refused = hub.posts(), len(hub.refusals())
    rules = "MAP evil.example 127.0.0.1, MAP rebind.evil.example 127.0.0.1"
    with EvilSite(EVIL_PAGE.format(port=hub.port, event=EVENT_ID)) as evil, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--host-resolver-rules={rules}"])
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            # A page of another site: a form posts, two text/plain fetches go out.
            page.goto(f"http://evil.example:{evil.port}/")
            page.wait_for_url(f"http://127.0.0.1:{hub.port}/api/subscribers/erp/pause")
            unchanged(hub, before)
            wait_until(lambda: len(hub.refusals()) >= refused + 3, 15,
                       what="the admin refusing the form and both fetches")

            # DNS rebinding: the attacker's name now resolves to the admin's address; the
            # page is "same origin" with whatever answers there.
            answer = page.goto(f"http://rebind.evil.example:{hub.port}/")
            assert answer is not None and answer.status == 421
            read = page.evaluate(f"""async () => {{
                const r = await fetch('/api/events/{EVENT_ID}');
                return [r.status, await r.text()];
            }}""")
            assert read[0] == 421 and MARKER not in read[1], read

            # The console itself, under its Content-Security-Policy: nothing refused by the
            # policy, and its pause button works.
            page = browser.new_page()
            page.add_init_script("window.__csp = []; document.addEventListener("
                                 "'securitypolicyviolation', (e) => window.__csp.push("
                                 "e.violatedDirective + ' ' + e.blockedURI));")
            page.goto(f"http://127.0.0.1:{hub.port}/")
            row = page.locator('[data-testid="subscriber-row"][data-name="crm"]')
            row.get_by_test_id("pause-button").click()
            wait_until(lambda: hub.state("crm") == "paused", 15, what="crm paused")
            row.get_by_test_id("resume-button").click()
            wait_until(lambda: hub.state("crm") != "paused", 15, what="crm resumed")
            assert page.evaluate("window.__csp") == []
        finally:
            browser.close()



def test_an_admin_request_body_nested_a_thousand_deep_is_400_naming_the_limit(hub: Hub) -> None:
    deep = b'{"dryRun": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    status, headers, answer = hub.request("POST", "/api/replay", {
        **hub.own(), "Content-Type": "application/json"}, deep)
    assert status == 400, answer
    assert headers["content-type"].startswith("application/json")
    assert "nested deeper than 32 levels" in answer["error"]
    assert not [e for e in (msgspec.json.decode(line) for line in
                            hub.admin_log.read_text().splitlines() if line.startswith("{"))
                if e.get("level") == "error"]


# -- a reload cannot open a public listener --------------------------------------------------


def test_a_reload_cannot_remove_the_token_of_an_admin_bound_to_a_public_address(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Compose and deploy/ha run ``relay admin --host 0.0.0.0`` with the file's
    ``admin.host: 127.0.0.1``: the token rule holds for the address bound, on reload too."""
    import os
    import signal

    import yaml

    port = free_port()
    path = write_config(tmp_path / "relay.yaml", redis_server.url, [],
                        redis={"prefix": PREFIX},
                        admin={"host": "127.0.0.1", "port": port, "token": "t0ken"})
    log = tmp_path / "admin.log"

    def overview(host: str = f"127.0.0.1:{port}") -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        conn.request("GET", "/api/overview", headers={"Host": host})
        status = conn.getresponse().status
        conn.close()
        return status

    def entries() -> list[dict[str, Any]]:
        return [msgspec.json.decode(line) for line in log.read_text().splitlines()
                if line.startswith("{")]

    def edit(change: Any) -> None:
        doc = yaml.safe_load(path.read_text())
        change(doc["admin"])
        path.write_text(yaml.safe_dump(doc, sort_keys=False))

    with process(relay_cmd("--config", str(path), "admin", "--host", "0.0.0.0"),
                 log_path=log) as proc:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        assert overview() == 401
        edit(lambda admin: admin.update(token=""))
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: any("reload refused" in e["msg"] for e in entries()), 10,
                   what="the reload refused")
        refused = next(e for e in entries() if "reload refused" in e["msg"])
        assert refused["level"] == "error"
        assert "admin.token" in refused["error"] and "0.0.0.0" in refused["error"]
        assert proc.poll() is None
        assert overview() == 401  # the token stays

        # A reload that keeps the token applies (here: a name the admin is reached by).
        edit(lambda admin: admin.update(token="t0ken", allowed_hosts=["relay-admin"]))
        assert overview("relay-admin:8081") == 421
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(lambda: overview("relay-admin:8081") == 401, 10,
                   what="the new name answered (and still asked for the token)")

