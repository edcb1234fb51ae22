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

import functools
import hashlib
import re
from typing import Any

import msgspec

DELIVER_TASK = "relay.deliver"

_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_encode = msgspec.json.encode
_SLOT = re.compile(rb'"@@(\w+)@@"')


def deliver_message(queue: str, event_id: str | list[str], subscribers: list[str] | None,
                    attempt: int, batch: str | None = None, trigger: str | None = None
                    ) -> bytes:
    """A message that runs ``relay.deliver(event_id, subscribers, attempt[, batch[, trigger]])``.

    ``subscribers`` None means "every subscriber whose filters match" (the first fan-out);
    a list names the subscribers to try (a retry, a replay, or a lease that expired).
    The ingress sends one message per group-committed batch: ``event_id`` is then the list of
    the batch's events and ``batch`` its token, which the ``seen`` marker of each event the
    batch stored holds (a duplicate in the batch holds an older token and is skipped).

    The same arguments always give the same bytes (the task id is derived from them), so a
    worker can name, from its task's arguments alone, the member it must remove from
    ``unclaimed`` (see ``relay/keys.py``) and a lease written twice is one member, not two.

    ``trigger`` (``resend``, ``replay``) names what an operator asked for; the attempt made
    from this message records it (its retries, built without one, record ``auto``). Given only
    when set, after ``batch`` (null then), so every other message keeps its exact bytes.
    """
    args: list[Any] = [event_id, subscribers, attempt]
    if batch is not None or trigger is not None:
        args.append(batch)
    if trigger is not None:
        args.append(trigger)
    return task_message(queue, DELIVER_TASK, args)


def task_message(queue: str, task: str, args: list[Any]) -> bytes:
    """Celery's protocol-2 message for ``task(*args)``, with an id derived from its arguments.

    Built by splicing into a per-(queue, task) template: on the ingress's hot path this is
    several times cheaper than encoding the nested message anew for every event.
    """
    args_json = _encode(args)
    task_id = hashlib.blake2b(queue.encode() + b"\n" + task.encode() + b"\n" + args_json,
                              digest_size=16).hexdigest()
    values = {
        "body": _encode("[" + args_json.decode() + ",{}," + _EMBED_JSON + "]"),
        "id": b'"' + task_id.encode() + b'"',
        "argsrepr": _encode(args_json.decode()),
    }
    return b"".join(values[piece] if i % 2 else piece  # type: ignore[index]
                    for i, piece in enumerate(_template(queue, task)))


_EMBED_JSON = _encode(_EMBED).decode()


@functools.lru_cache(maxsize=32)
def _template(queue: str, task: str) -> tuple[Any, ...]:
    """The message with slots: literal bytes at even indexes, slot names at odd ones."""
    message = _encode({
        "body": "@@body@@",
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py", "task": task, "id": "@@id@@", "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": "@@id@@", "parent_id": None,
            "argsrepr": "@@argsrepr@@", "kwargsrepr": "{}", "origin": "relay",
            "ignore_result": True,
        },
        "properties": {
            "correlation_id": "@@id@@",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "delivery_tag": "@@id@@",
        },
    })
    parts = _SLOT.split(message)
    return tuple(p.decode() if i % 2 else p for i, p in enumerate(parts))


# -- short references ---------------------------------------------------------------------
#
# The schedule, ``held:{sub}``, ``parked:{sub}`` and ``ordready`` claims hold one member per
# pending attempt of one (event, subscriber): a lease for every attempt in flight, written
# before the post and removed after it. As a full Celery message that member was ~770 bytes,
# hashed and compared by Redis twice per delivery and built (a blake2b, three JSON encodings)
# by the worker for each; as a reference it is ``{attempt}|{trigger}|{subscriber}|{eventId}``
# (a subscriber name has no ``|``; an eventId may, last). Only what puts a member on the
# queue turns it into a message: the scheduler's script (``MESSAGE_FN``, in Lua), and its
# note in ``unclaimed`` is the reference. Members that are full messages (written before
# references, still queued or held across an upgrade) work as they are: anything that does
# not parse as a reference is a message.


def member(event_id: str, subscriber: str, attempt: int, trigger: str | None = None) -> bytes:
    """The reference that stands for ``deliver_message(queue, event_id, [subscriber],
    attempt, trigger=trigger)`` in the schedule, ``held:`` and ``parked:``."""
    return f"{attempt}|{trigger or ''}|{subscriber}|{event_id}".encode()


def is_member_ref(value: bytes) -> bool:
    return value[:1].isdigit()


def read_member(value: bytes) -> DeliverArgs:
    """The arguments of a schedule, held or parked member: a reference or a full message."""
    if is_member_ref(value):
        attempt, trigger, subscriber, event_id = value.decode().split("|", 3)
        return DeliverArgs(event_id, [subscriber], int(attempt), None, trigger or None)
    return read_deliver_message(value)


def message_spec(queue: str, task: str = DELIVER_TASK) -> list[bytes]:
    """What ``MESSAGE_FN`` needs to build ``task``'s messages for ``queue``, as four script
    arguments: the queue, the task, the message template (literal pieces and slot names
    joined by NUL: JSON never holds one), and the ``embed`` part of the body."""
    pieces = [p.encode() if isinstance(p, str) else p for p in _template(queue, task)]
    return [queue.encode(), task.encode(), b"\0".join(pieces), _EMBED_JSON.encode()]


# Lua, prepended to the scripts that put members on the queue. ``message_of(spec, member)``
# returns the Celery message a member stands for and its delivery tag (the task id), or, for
# a member that is not a reference, the member itself and nil. ``spec``: message_spec's four
# values. The message is Celery's protocol 2 as relay.queue builds it, with a task id derived
# from the arguments (SHA-1 here, not Python's BLAKE2b: the two never need to agree, because
# the worker removes both the reference and its own message from ``unclaimed``).
MESSAGE_FN = """
local function message_of(spec, m)
  local attempt, trigger, sub, id = string.match(m, '^(%d+)|(%l*)|([%w_.-]+)|(.+)$')
  if not attempt then return m, nil end
  local args = '[' .. cjson.encode(id) .. ',[' .. cjson.encode(sub) .. '],' .. attempt
  if trigger ~= '' then args = args .. ',null,' .. cjson.encode(trigger) end
  -- cjson writes '/' as '\\/' (valid JSON); written plain, the arguments read as Python's.
  args = (string.gsub(args .. ']', '\\\\/', '/'))
  local task_id = string.sub(redis.sha1hex(spec[1] .. '\\n' .. spec[2] .. '\\n' .. args), 1, 32)
  local slots = {body = cjson.encode('[' .. args .. ',{},' .. spec[4] .. ']'),
                 id = '"' .. task_id .. '"', argsrepr = cjson.encode(args)}
  local out, i, n, tpl = {}, 1, 0, spec[3]
  while true do
    local j = string.find(tpl, '\\0', i, true)
    local piece = string.sub(tpl, i, (j or 0) - 1)
    n = n + 1
    out[n] = (n % 2 == 0) and slots[piece] or piece
    if not j then break end
    i = j + 1
  end
  return table.concat(out), task_id
end
"""


class DeliverArgs(msgspec.Struct, array_like=True):
    event_id: str | list[str]
    subscribers: list[str] | None
    attempt: int
    batch: str | None = None
    trigger: str | None = None


def read_deliver_message(message: bytes) -> DeliverArgs:
    """The arguments of a message built by ``deliver_message`` (for listings and tests)."""
    outer = msgspec.json.decode(message)
    args = msgspec.json.decode(outer["body"])[0]
    return msgspec.convert(args, DeliverArgs)
