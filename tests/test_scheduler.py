"""The retry scheduler: due members of relay:schedule move to the Celery queue, once each."""

from __future__ import annotations

import threading
import time

import redis

from relay.keys import Keys
from relay.queue import deliver_message, read_deliver_message
from tests.support import wait_until
from workers.scheduler import Scheduler

KEYS = Keys()


def fill(client: redis.Redis, members: dict[bytes, int]) -> None:
    items = list(members.items())
    for i in range(0, len(items), 5000):
        client.zadd(KEYS.schedule, dict(items[i:i + 5000]))


def test_only_due_members_move_and_the_queue_hands_them_out_earliest_due_first(
        redis_client: redis.Redis) -> None:
    now = 1_700_000_000_000
    due = {deliver_message(KEYS.queue, f"EVDUE{i}", ["s"], 2): now - 1000 + i for i in range(5)}
    later = {deliver_message(KEYS.queue, f"EVLATER{i}", ["s"], 2): now + 1 + i for i in range(3)}
    fill(redis_client, {**due, **later})
    scheduler = Scheduler(redis_client, KEYS)
    assert scheduler.move_due(now) == 5
    assert scheduler.move_due(now) == 0
    assert redis_client.zcard(KEYS.schedule) == 3
    # kombu BRPOPs the list: the right end is the next message out.
    out = [redis_client.rpop(KEYS.queue) for _ in range(5)]
    assert [read_deliver_message(m).event_id for m in out] == [f"EVDUE{i}" for i in range(5)]
    assert redis_client.llen(KEYS.queue) == 0
    assert scheduler.move_due(now + 3) == 3


def test_one_move_takes_at_most_a_batch(redis_client: redis.Redis) -> None:
    fill(redis_client, {f"m{i}".encode(): i for i in range(25)})
    scheduler = Scheduler(redis_client, KEYS, batch=10)
    assert [scheduler.move_due(100) for _ in range(4)] == [10, 10, 5, 0]
    assert redis_client.llen(KEYS.queue) == 25


def test_two_schedulers_moving_concurrently_move_each_member_exactly_once(
        redis_server, redis_client: redis.Redis) -> None:
    n = 20_000
    members = {f"member-{i:06d}".encode(): i for i in range(n)}
    fill(redis_client, members)
    moved = [0, 0]
    start = threading.Barrier(2)

    def drain(slot: int) -> None:
        client = redis_server.client()
        scheduler = Scheduler(client, KEYS, batch=50)
        start.wait()
        while (count := scheduler.move_due(n)) > 0:
            moved[slot] += count
        client.close()

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    print(f"moved per scheduler: {moved}")
    assert sum(moved) == n
    assert min(moved) > 0, "both schedulers should have taken part"
    queued = redis_client.lrange(KEYS.queue, 0, -1)
    assert len(queued) == n
    assert set(queued) == set(members)
    assert redis_client.zcard(KEYS.schedule) == 0


def test_two_running_scheduler_threads_move_members_falling_due_over_time_once_each(
        redis_server, redis_client: redis.Redis) -> None:
    clients = [redis_server.client() for _ in range(2)]
    schedulers = [Scheduler(c, KEYS, interval=0.01, batch=20) for c in clients]
    for s in schedulers:
        s.start()
    try:
        base = int(time.time() * 1000)
        members: dict[bytes, int] = {}
        # 3000 members falling due across ~1 s, added while both schedulers are polling.
        for wave in range(10):
            batch = {f"w{wave}-m{i}".encode(): base + wave * 100 + i % 100 for i in range(300)}
            members.update(batch)
            redis_client.zadd(KEYS.schedule, batch)
            time.sleep(0.05)
        wait_until(lambda: redis_client.llen(KEYS.queue) >= len(members), 15,
                   what="every member queued")
        assert redis_client.zcard(KEYS.schedule) == 0
    finally:
        for s, c in zip(schedulers, clients, strict=True):
            s.stop()
            c.close()
    queued = redis_client.lrange(KEYS.queue, 0, -1)
    assert len(queued) == len(members)
    assert set(queued) == set(members)


def test_member_not_yet_due_stays_in_the_schedule(redis_server, redis_client) -> None:
    client = redis_server.client()
    scheduler = Scheduler(client, KEYS, interval=0.01)
    member = deliver_message(KEYS.queue, "EVFUTURE", ["s"], 3)
    redis_client.zadd(KEYS.schedule, {member: int(time.time() * 1000) + 60_000})
    scheduler.start()
    try:
        time.sleep(0.2)  # ~20 polls
        assert redis_client.llen(KEYS.queue) == 0
        redis_client.zadd(KEYS.schedule, {member: int(time.time() * 1000)})
        wait_until(lambda: redis_client.llen(KEYS.queue) == 1, 5, what="member queued")
    finally:
        scheduler.stop()
        client.close()
    assert read_deliver_message(redis_client.rpop(KEYS.queue)).attempt == 3
