"""The obvious design's worker: one Celery task per (event, subscriber), posted with requests.

``celery -A bench.obvious.app worker -Q obvious`` with ``OBVIOUS_CONFIG`` set (see
``bench/obvious/__init__.py``). No batching, no leases: Celery's defaults plus ``acks_late``,
and retries by ``countdown`` (on the Redis broker Celery holds those in the worker's memory
until due: one of the things the hub does differently, docs/architecture.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

import redis
import requests
from celery import Celery

TASK = "obvious.deliver"


def load_settings() -> dict[str, Any]:
    with open(os.environ["OBVIOUS_CONFIG"]) as fh:
        return dict(json.load(fh))


settings = load_settings()
app = Celery("obvious", broker=settings["redis"], set_as_current=False)
app.conf.update(
    task_default_queue=settings["queue"],
    task_ignore_result=True,
    task_acks_late=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

store = redis.Redis.from_url(settings["redis"])
_session: requests.Session | None = None


def event_key(event_id: str) -> str:
    return f"obvious:event:{event_id}"


def sign(secret: str, event_id: str) -> str:
    """Ingram Micro's ``X-Hub-Signature``: base64(HMAC-SHA512(secret, eventId))."""
    mac = hmac.new(secret.encode(), event_id.encode(), hashlib.sha512).digest()
    return base64.b64encode(mac).decode()


def session() -> requests.Session:
    """One keep-alive session per worker process, made after the fork."""
    global _session
    if _session is None:
        _session = requests.Session()
    return _session


@app.task(name=TASK, bind=True, max_retries=settings.get("max_retries", 7))
def deliver(self: Any, event_id: str, subscriber_index: int) -> None:
    body = store.get(event_key(event_id))
    if body is None:
        return  # expired
    sub = settings["subscribers"][subscriber_index]
    try:
        resp = session().post(sub["url"], data=body, timeout=settings.get("timeout", 10),
                              headers={"Content-Type": "application/json",
                                       "X-Hub-Signature": sign(sub["secret"], event_id)})
        resp.raise_for_status()
    except requests.RequestException as exc:
        raise self.retry(exc=exc, countdown=min(60, 2 ** self.request.retries)) from exc
