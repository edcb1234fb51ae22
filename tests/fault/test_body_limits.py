"""Oversized and slow-drip bodies against a ``relay ingress`` process: 413/408, bounded memory,
and the connection closed within a bound."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ingress.app import LINGERING_SECONDS
from relay.signatures import sign_ingram
from tests.fault.helpers import rss_kib
from tests.hub import INGRESS_SECRET, ingress_port, write_config
from tests.support import process, relay_cmd, wait_http

pytestmark = pytest.mark.fault

LIMIT = 65536
READ_TIMEOUT = 1.0
BIG = 32 * 1024 * 1024          # what a hostile sender tries to push
RSS_GROWTH_BOUND_KIB = 24 * 1024  # well under BIG: the body is never buffered whole
HEAD = ("POST /webhooks/ingram HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\n"
        f"X-Hub-Signature: {sign_ingram(INGRESS_SECRET, 'EVBIG')}\r\n")


@pytest.fixture
def live(tmp_path: Path, redis_server, redis_client) -> Iterator[tuple[int, int]]:
    """(port, pid) of a ``relay ingress`` subprocess with a 64 KiB limit and a 1 s read timeout."""
    config = write_config(tmp_path / "relay.yaml", redis_server.url, [],
                          ingress={"max_body_bytes": LIMIT, "read_timeout": f"{READ_TIMEOUT}s"})
    port = ingress_port(config)
    with process(relay_cmd("--config", str(config), "ingress"),
                 log_path=tmp_path / "ingress.log") as proc:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield port, proc.pid


class Pusher:
    """Sends ``head`` then ``chunks`` on one socket from a thread, ``drip`` seconds apart, until
    they run out or the server closes; the caller reads the answer and watches for the close."""

    def __init__(self, port: int, head: bytes, chunks: Iterator[bytes], drip: float = 0.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(head)
        self.sent = 0
        self.stopped_at: float | None = None
        self._chunks = chunks
        self._drip = drip
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for chunk in self._chunks:
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                if self._drip:
                    time.sleep(self._drip)
        except OSError:
            pass
        self.stopped_at = time.monotonic()

    def answer(self, timeout: float) -> tuple[bytes, float]:
        """The status line (first bytes of the answer) and when it came."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096)
        return data, time.monotonic()

    def wait_closed(self, timeout: float) -> float | None:
        """Read until the server closes the connection; when it did (None: still open)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return time.monotonic()
            except TimeoutError:
                return None
            except OSError:
                return time.monotonic()
        return None

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


def chunked(total: int, size: int = 65536) -> Iterator[bytes]:
    piece = b"x" * size
    for _ in range(total // size):
        yield f"{size:x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def plain(total: int, size: int = 65536) -> Iterator[bytes]:
    piece = b"x" * size
    for _ in range(total // size):
        yield piece


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_oversized_body_is_413_without_buffering_it(live, redis_client, framing: str,
                                                     report) -> None:
    port, pid = live
    before = rss_kib(pid)
    # ~4 MB/s: the 32 MB would take 8 s, longer than the server is willing to keep reading.
    if framing == "content-length":
        head = HEAD + f"Content-Length: {BIG}\r\n\r\n"
        pusher = Pusher(port, head.encode(), plain(BIG), drip=0.016)
    else:
        head = HEAD + "Transfer-Encoding: chunked\r\n\r\n"
        pusher = Pusher(port, head.encode(), chunked(BIG), drip=0.016)
    started = time.monotonic()
    try:
        status, answered = pusher.answer(timeout=15)
        closed = pusher.wait_closed(timeout=15)
        peak = rss_kib(pid)
    finally:
        pusher.close()
    figures = {"framing": framing, "status_line": status.split(b"\r\n")[0].decode(),
               "answer_s": round(answered - started, 3),
               "closed_s": None if closed is None else round(closed - started, 3),
               "sent_before_close_kib": pusher.sent // 1024,
               "rss_growth_kib": peak - before, "limit_kib": LIMIT // 1024,
               "attempted_kib": BIG // 1024}
    report(fault="oversized body", **figures)
    assert status.startswith(b"HTTP/1.1 413"), status
    assert peak - before < RSS_GROWTH_BOUND_KIB, figures
    assert closed is not None, "the server kept reading an oversized body"
    assert closed - answered < LINGERING_SECONDS + 1.0, figures
    assert redis_client.dbsize() == 0


def test_slow_drip_body_is_408_and_the_connection_is_closed(live, redis_client,
                                                            report) -> None:
    port, _ = live
    head = HEAD + "Content-Length: 4000\r\n\r\n"
    # One byte every 200 ms: 4000 bytes would take 13 minutes.
    pusher = Pusher(port, head.encode(), iter([b"{"] + [b" "] * 3999), drip=0.2)
    started = time.monotonic()
    try:
        status, answered = pusher.answer(timeout=READ_TIMEOUT + 5)
        closed = pusher.wait_closed(timeout=30)
    finally:
        pusher.close()
    figures = {"status_line": status.split(b"\r\n")[0].decode(),
               "read_timeout_s": READ_TIMEOUT, "answer_s": round(answered - started, 3),
               "closed_s": None if closed is None else round(closed - started, 3),
               "bytes_dripped": pusher.sent}
    report(fault="slow-drip body", **figures)
    assert status.startswith(b"HTTP/1.1 408"), status
    assert answered - started < READ_TIMEOUT + 1.0, figures
    # read_timeout, then at most the ingress's lingering close (LINGERING_SECONDS), then closed.
    assert closed is not None, figures
    assert closed - started < READ_TIMEOUT + LINGERING_SECONDS + 1.0, figures
    assert redis_client.dbsize() == 0
