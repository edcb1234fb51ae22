"""``--phases capture``: what keeping each attempt's request and response costs per delivery.

A focused measure, in the bench's own process against its private Redis, of the only work the
capture adds: building the attempt record (the request's headers with credentials masked, the
answer's status, headers and body head) and msgpack-encoding it, then keeping it in Redis as
the outcome script does (``LPUSH`` onto ``log:{id}:{sub}``, ``EXPIRE``). The same
deliveries are recorded four ways, in one run:

* ``before``: the record as it was (time, attempt, status, error, latency, probe);
* ``after``: what the hub keeps now: on a 2xx the request and the answer's status and
  headers, no body;
* ``after, 2xx bodies kept``: the same with the 2xx's body (a 60-byte JSON acknowledgement);
* ``after, 2xx bodies kept, 4 KiB``: with a subscriber whose 2xx is a 4 KiB page;

and a failed attempt (HTTP 500 with a 200 KB error page, 4 KiB of it kept) beside them.
Everything else a delivery costs (HTTP, the outcome script's other writes) is the same either
way, and the end-to-end phases measure it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from bench.procs import RedisServer
from relay.config import load_config
from relay.models import Attempt
from workers import http

#: Records built (CPU) and kept (Redis memory) per variant.
BUILD = 20_000
KEEP = 5_000
_encode = msgspec.msgpack.Encoder().encode

_CONFIG = """
redis: {{url: "redis://127.0.0.1:6379/0"}}
ingress: {{secrets: [s]}}
subscribers:
  - name: erp
    url: https://erp.internal.example/hooks/ingram?tenant=acme
    secret: erp-webhook-secret-0123456789
    signature: ingram
    headers: {{Authorization: "Bearer erp-token-abcdef"}}
"""

_ANSWER_HEADERS = (("Content-Type", "application/json"), ("Content-Length", "60"),
                   ("Date", "Thu, 03 Dec 2026 10:00:00 GMT"), ("Server", "nginx"),
                   ("X-Request-Id", "5f0c1d9e-1b2a-4c3d-8e9f-0a1b2c3d4e5f"))
_ACK = b'{"status":"received","id":"N01CIB9VVFYKR9J6ZW","queued":true}'
_PAGE = b"<html><body><h1>Internal Server Error</h1>" + b"x" * 200_000


def _variants(sub: Any, headers: Any) -> dict[str, Any]:
    ok = http.Outcome(200, None, 8.5, None, _ANSWER_HEADERS, _ACK, False)
    page_ok = http.Outcome(200, None, 8.5, None, _ANSWER_HEADERS, _PAGE[:4096], True)
    failed = http.Outcome(500, None, 8.5, None, _ANSWER_HEADERS, _PAGE[:4096], True)

    def before() -> Attempt:
        return Attempt(time.time(), 1, 200, None, 8.5, False)

    def after(outcome: Any, keep_body: bool) -> Any:
        return lambda: Attempt(time.time(), 1, outcome.status, None, 8.5, False, "auto",
                               http.sent_request(sub, headers),
                               http.answer(sub, outcome, keep_body))

    return {"before": before, "after": after(ok, False),
            "after, 2xx bodies kept": after(ok, True),
            "after, 2xx bodies kept, 4 KiB": after(page_ok, True),
            "failed attempt (HTTP 500, 200 KB page)": after(failed, True)}


def measure(redis_server: RedisServer, log_dir: Path) -> dict[str, Any]:
    path = log_dir / "capture.yaml"
    path.write_text(_CONFIG.format())
    sub = load_config(path).subscribers[0]
    body = (Path(__file__).parent.parent / "tests" / "shared" / "samples"
            / "order_shipped.json").read_bytes()
    headers = http.signed_headers(sub.signature, sub.secret, sub.headers,
                                  "N01CIB9VVFYKR9J6ZW", body)
    import redis

    client = redis.Redis(port=redis_server.port)
    out: dict[str, Any] = {}
    try:
        for name, build in _variants(sub, headers).items():
            build()  # caches warm (the redaction is per subscriber)
            start = time.process_time()
            for _ in range(BUILD):
                _encode(build())
            cpu_us = (time.process_time() - start) / BUILD * 1e6
            record = _encode(build())
            client.flushall()
            before = int(client.info("memory")["used_memory"])
            pipe = client.pipeline(transaction=False)
            for i in range(KEEP):
                key = f"bench:log:EV{i:06d}:erp"
                pipe.lpush(key, _encode(build()))
                pipe.expire(key, 14 * 86400)
            pipe.execute()
            kept = int(client.info("memory")["used_memory"]) - before
            out[name] = {"cpu_us": round(cpu_us, 2), "record_bytes": len(record),
                         "redis_bytes": round(kept / KEEP)}
        client.flushall()
    finally:
        client.close()
    base = out["before"]
    for figures in out.values():
        figures["extra_cpu_us"] = round(figures["cpu_us"] - base["cpu_us"], 2)
        figures["extra_redis_bytes"] = figures["redis_bytes"] - base["redis_bytes"]
    return out


def text(results: dict[str, Any]) -> str:
    lines = [f"{'attempt record':42} {'CPU us':>8} {'+CPU us':>8} {'bytes':>6} "
             f"{'Redis B':>8} {'+Redis B':>9}"]
    for name, f in results.items():
        lines.append(f"{name:42} {f['cpu_us']:>8.2f} {f['extra_cpu_us']:>8.2f} "
                     f"{f['record_bytes']:>6} {f['redis_bytes']:>8} {f['extra_redis_bytes']:>9}")
    return "\n".join(lines)
