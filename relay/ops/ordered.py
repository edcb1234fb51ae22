"""What ordered delivery holds back, as operators see it (the admin API and the CLI): the
event a waiting one waits behind, per-subscriber counts, and the keys holding events back.
Read from the layout relay/ordering.py writes (relay/keys.py)."""

from __future__ import annotations

from typing import Any

from relay.keys import Keys
from relay.ordering import bare


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def waiting_for(client: Any, keys: Keys, event_id: str, subscriber: str) -> str | None:
    """The event (event id) a waiting (event, subscriber) waits behind, if it waits."""
    raw = await client.hget(keys.order_keys(event_id), subscriber)
    for key in _text(raw).split("\n") if raw else []:
        head = await client.lindex(keys.order_queue(subscriber, key), 0)
        if head is not None and _text(head) != event_id:
            return _text(head)
    return None


async def counts(client: Any, keys: Keys, names: list[str]) -> dict[str, tuple[int, int]]:
    """Per subscriber: (events waiting behind another, keys blocked by a dead letter)."""
    async with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hget(keys.order_waiting, name)
            pipe.zcard(keys.order_blocked(name))
        raw = await pipe.execute()
    return {name: (max(0, int(raw[2 * i] or 0)), int(raw[2 * i + 1]))
            for i, name in enumerate(names)}


async def holding(client: Any, keys: Keys, subscriber: str, limit: int,
                  head_state: Any, only: list[str] | None = None) -> list[dict[str, Any]]:
    """The keys of ``subscriber`` holding events back, oldest first: each with its head, why
    the head has not gone yet (``head_state(event_id, blocked) -> state``), since when and
    how many wait behind it. ``only``: just these keys (an order page)."""
    if only is None:
        listed = await client.zrange(keys.order_holding(subscriber), 0, max(0, limit - 1),
                                     withscores=True)
    else:
        async with client.pipeline(transaction=False) as pipe:
            for key in only:
                pipe.zscore(keys.order_holding(subscriber), key)
            scores = await pipe.execute()
        listed = [(key, score) for key, score in zip(only, scores, strict=True)
                  if score is not None]
    out = []
    for key_raw, since in listed:
        key = _text(key_raw)
        queue = keys.order_queue(subscriber, key)
        async with client.pipeline(transaction=False) as pipe:
            pipe.lindex(queue, 0)
            pipe.llen(queue)
            pipe.zscore(keys.order_blocked(subscriber), key)
            head, length, blocked = await pipe.execute()
        if head is None:
            continue
        out.append({"key": bare(key), "headEventId": _text(head),
                    "state": await head_state(_text(head), blocked is not None),
                    "since": float(since) / 1000, "waiting": max(0, int(length) - 1)})
    return out
