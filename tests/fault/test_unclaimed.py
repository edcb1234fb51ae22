"""The net under kombu's pop-then-record window: a queued message no worker took is queued
again, but only when it is really lost (not waiting in the queue, not held by kombu)."""

from __future__ import annotations

import msgspec
import pytest
import redis

from relay.queue import deliver_message
from tests.fault.helpers import KEYS
from workers.scheduler import KOMBU_UNACKED, SEARCHABLE_QUEUE, Scheduler

pytestmark = pytest.mark.fault

NOW = 1_700_000_000_000


def message(event_id: str) -> bytes:
    return deliver_message(KEYS.queue, event_id, ["s"], 2)


def tag(member: bytes) -> str:
    return str(msgspec.json.decode(member)["properties"]["delivery_tag"])


def test_only_lost_messages_are_queued_again(redis_client: redis.Redis) -> None:
    waiting, held, lost, fresh = (message(e) for e in ("EVWAIT", "EVHELD", "EVLOST", "EVNEW"))
    redis_client.zadd(KEYS.unclaimed, {waiting: NOW - 1, held: NOW - 1, lost: NOW - 1,
                                       fresh: NOW + 1})
    redis_client.lpush(KEYS.queue, waiting)                # still in the queue
    redis_client.hset(KOMBU_UNACKED, tag(held), b"[...]")  # a worker has it; kombu knows
    scheduler = Scheduler(redis_client, KEYS, redeliver_after=60)

    assert scheduler.move_due(NOW) == 1
    assert redis_client.lrange(KEYS.queue, 0, -1) == [lost, waiting]
    # Every overdue one is watched again for another redeliver_after; the fresh one untouched.
    scores = dict(redis_client.zrange(KEYS.unclaimed, 0, -1, withscores=True))
    assert scores == {waiting: NOW + 60_000, held: NOW + 60_000, lost: NOW + 60_000,
                      fresh: NOW + 1}
    assert scheduler.move_due(NOW) == 0


def test_a_moved_retry_is_watched_until_a_worker_takes_it(redis_client: redis.Redis) -> None:
    retry = message("EVRETRY")
    redis_client.zadd(KEYS.schedule, {retry: NOW - 1})
    scheduler = Scheduler(redis_client, KEYS, redeliver_after=10)
    assert scheduler.move_due(NOW) == 1
    assert redis_client.zscore(KEYS.unclaimed, retry) == NOW + 10_000
    # A worker popped it and died before kombu recorded it: nowhere but in unclaimed.
    assert redis_client.rpop(KEYS.queue) == retry
    assert scheduler.move_due(NOW + 9_999) == 0
    assert scheduler.move_due(NOW + 10_000) == 1
    assert redis_client.lrange(KEYS.queue, 0, -1) == [retry]


def test_behind_a_long_backlog_overdue_notes_wait_instead_of_scanning_the_queue(
        redis_client: redis.Redis) -> None:
    backlog = [message(f"EVQ{i:05d}") for i in range(SEARCHABLE_QUEUE + 1)]
    redis_client.lpush(KEYS.queue, *backlog)
    overdue = backlog[:50]  # waiting in the queue, their notes overdue
    redis_client.zadd(KEYS.unclaimed, {m: NOW - 1 for m in overdue})
    scheduler = Scheduler(redis_client, KEYS, redeliver_after=60)

    assert scheduler.move_due(NOW) == 0
    assert redis_client.llen(KEYS.queue) == len(backlog)  # nothing queued twice
    scores = {s for _, s in redis_client.zrange(KEYS.unclaimed, 0, -1, withscores=True)}
    assert scores == {NOW + 60_000}  # looked at again later

    # Once the backlog is short enough to search, a note whose message is gone is queued again.
    redis_client.delete(KEYS.queue)
    assert scheduler.move_due(NOW + 60_000) == len(overdue)
