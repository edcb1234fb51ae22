"""The retry scheduler: due members of relay:schedule move to the Celery queue, once each."""

from __future__ import annotations

import threading
import time

import msgspec
import redis

from relay.keys import Keys
from relay.queue import deliver_message, member, read_deliver_message
from tests.support import wait_until
from workers.scheduler import KOMBU_UNACKED, Scheduler

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


# -- short references (relay/queue.py member) --------------------------------------------------


def test_a_reference_falls_due_as_the_celery_message_it_stands_for_noted_by_the_reference(
        redis_client: redis.Redis) -> None:
    now = 1_700_000_000_000
    plain, resent = member("EV/ref 1", "erp", 2), member('EV"ref|2', "crm.v2", 1, "resend")
    redis_client.zadd(KEYS.schedule, {plain: now - 2, resent: now - 1})
    assert Scheduler(redis_client, KEYS).move_due(now) == 2
    queued = [read_deliver_message(redis_client.rpop(KEYS.queue)) for _ in range(2)]
    assert [(a.event_id, a.subscribers, a.attempt, a.batch, a.trigger) for a in queued] == [
        ("EV/ref 1", ["erp"], 2, None, None), ('EV"ref|2', ["crm.v2"], 1, None, "resend")]
    assert set(redis_client.zrange(KEYS.unclaimed, 0, -1)) == {plain, resent}


def test_a_reference_noted_in_unclaimed_is_queued_again_only_when_its_message_is_lost(
        redis_client: redis.Redis) -> None:
    now = 1_700_000_000_000
    scheduler = Scheduler(redis_client, KEYS, redeliver_after=60)
    refs = {name: member(f"EV{name}", "s", 2) for name in ("WAIT", "HELD", "LOST")}
    redis_client.zadd(KEYS.schedule, {ref: now - 1 for ref in refs.values()})
    assert scheduler.move_due(now) == 3
    messages = {read_deliver_message(m).event_id: m for m in redis_client.lrange(KEYS.queue, 0, -1)}
    redis_client.delete(KEYS.queue)
    redis_client.lpush(KEYS.queue, messages["EVWAIT"])  # still waiting in the queue
    held = msgspec.json.decode(messages["EVHELD"])["properties"]["delivery_tag"]
    redis_client.hset(KOMBU_UNACKED, held, b"[...]")    # a worker has it; kombu knows
    try:
        assert scheduler.move_due(now + 60_000) == 1
        assert redis_client.lrange(KEYS.queue, 0, -1) == [messages["EVLOST"],
                                                           messages["EVWAIT"]]
    finally:
        redis_client.hdel(KOMBU_UNACKED, held)


def test_a_held_reference_released_as_a_probe_is_queued_as_its_message(
        redis_client: redis.Redis) -> None:
    now = 1_700_000_000_000
    held = member("EVPROBE", "down", 4)
    redis_client.zadd(KEYS.held("down"), {held: now - 10_000})
    redis_client.zadd(KEYS.breakers, {"down": now - 1})
    Scheduler(redis_client, KEYS).move_due(now)
    (queued,) = redis_client.lrange(KEYS.queue, 0, -1)
    args = read_deliver_message(queued)
    assert (args.event_id, args.subscribers, args.attempt) == ("EVPROBE", ["down"], 4)
    assert redis_client.zrange(KEYS.unclaimed, 0, -1) == [held]
