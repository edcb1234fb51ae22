"""Celery task messages, written straight into the broker's Redis list.

Why not ``celery.send_task``: it is synchronous (~0.8 ms a call, measured on the target
machine) and would block the ingress's event loop; and it cannot be part of the same Redis
round trip as the write that stores the event. Writing the message ourselves lets the ingress
store an event, mark it seen and enqueue its fan-out in *one* atomic script, and lets the
scheduler move due retries into the queue atomically (``workers/scheduler.py``).

The format is Celery's task protocol 2 as carried by kombu's Redis transport: a JSON object
LPUSHed onto the list named after the queue (kombu BRPOPs it, so the list is FIFO). The body is
the JSON ``[args, kwargs, embed]`` with no ``body_encoding`` (kombu then uses it as is, which
saves a base64 pass). A test starts a real Celery worker on these messages
(``tests/test_delivery.py``) so a change in Celery that breaks the format fails loudly.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import msgspec

DELIVER_TASK = "relay.deliver"

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_encode = msgspec.json.encode
_ID_NAMESPACE = uuid.UUID("5c1d3f4e-0d5e-4b8e-9a57-6d2f0b9b7a10")


def deliver_message(queue: str, event_id: str, subscribers: list[str] | None,
                    attempt: int) -> bytes:
    """A message that runs ``relay.deliver(event_id, subscribers, attempt)``.

    ``subscribers`` None means "every subscriber whose filters match" (the first fan-out);
    a list names the subscribers to try (a retry, a replay, or a lease that expired).

    The same arguments always give the same bytes (the task id is derived from them), so a
    worker can name, from its task's arguments alone, the member it must remove from
    ``unclaimed`` (see ``relay/keys.py``) and a lease written twice is one member, not two.
    """
    args = [event_id, subscribers, attempt]
    task_id = str(uuid.uuid5(_ID_NAMESPACE, f"{queue}\n{_encode(args).decode()}"))
    return task_message(queue, DELIVER_TASK, args, task_id, origin="relay")


def task_message(queue: str, task: str, args: list[Any], task_id: str | None = None,
                 origin: str = _ORIGIN) -> bytes:
    task_id = task_id or str(uuid.uuid4())
    body = _encode([args, {}, _EMBED]).decode()
    return _encode({
        "body": body,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": task_id, "parent_id": None,
            "argsrepr": repr(args), "kwargsrepr": "{}", "origin": origin,
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": task_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "delivery_tag": task_id,
        },
    })


class DeliverArgs(msgspec.Struct, array_like=True):
    event_id: str
    subscribers: list[str] | None
    attempt: int


def read_deliver_message(message: bytes) -> DeliverArgs:
    """The arguments of a message built by ``deliver_message`` (for listings and tests)."""
    outer = msgspec.json.decode(message)
    args = msgspec.json.decode(outer["body"])[0]
    return msgspec.convert(args, DeliverArgs)
