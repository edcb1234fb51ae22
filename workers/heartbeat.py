"""The worker's heartbeat, and what it notices: workers alive, subscribers removed.

Every ``INTERVAL`` seconds the worker's main process:

* records itself in ``workers`` (host:pid -> ms), which the admin reads as "workers seen in
  the last minute", and touches ``$RELAY_WORKER_HEARTBEAT`` if set (a container healthcheck);
* looks for subscribers removed from the config everywhere. Every delivering process notes
  the subscribers it has configured (or still holds attempts for) in ``known``
  (workers/engine.py). A name no live process has noted for ``KNOWN_FRESH_MS`` is removed:
  its held attempts and scheduled retries are made due at once, and the engine dead-letters
  each with reason ``subscriber removed`` as it comes. Never dropped, and never wrongly: while
  any worker still has it configured (a rolling deploy, a reload that has not reached every
  machine), its attempts wait for that worker instead. A removed subscriber's ordered events
  still waiting behind others (relay/ordering.py) are released and made due the same way;
* dissolves the queues of a subscriber whose ordering was turned off: every event waiting in
  them is released to a lane (``ordready:{sub}``), in any order.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import redis
from redis.exceptions import RedisError

from relay import clock, ordering
from relay.connections import text
from relay.health import RELEASE_HELD_FN
from relay.keys import Keys
from relay.queue import member, read_member

log = logging.getLogger("relay.worker")

INTERVAL = 5.0
#: Matches workers/planning.py: a name noted within this long is known somewhere.
KNOWN_FRESH_MS = 15_000
#: Worker entries older than this are pruned from ``workers``.
FORGET_WORKERS_MS = 3_600_000
HEARTBEAT_FILE_ENV = "RELAY_WORKER_HEARTBEAT"

RELEASE = RELEASE_HELD_FN + "return release_held(KEYS[1], KEYS[2], ARGV[1])"
# ARGV: ordready key, schedule key, now ms, then (event id, message) pairs: each id still
# ready becomes its message, due now (one step: never in neither).
MOVE_READY = """
local n = 0
for i = 4, #ARGV, 2 do
  if redis.call('ZREM', ARGV[1], ARGV[i]) == 1 then
    redis.call('ZADD', ARGV[2], ARGV[3], ARGV[i + 1])
    n = n + 1
  end
end
return n
"""


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    def __init__(self, client: redis.Redis, keys: Keys, subscribers: list[str],
                 ordered: list[str] | None = None, retention: float = 14 * 86400) -> None:
        self._client = client
        self._keys = keys
        self.subscribers = subscribers
        #: Of ``subscribers``, those with ordering on in this process's config.
        self.ordered = ordered or []
        self.retention = retention
        self._id = worker_id()
        self._file = os.environ.get(HEARTBEAT_FILE_ENV)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._release = client.register_script(RELEASE)
        self._move_ready = client.register_script(MOVE_READY)

    def beat(self) -> None:
        # This process's scheduler and heartbeat compare times other hosts wrote: keep the
        # offset to Redis's clock fresh (relay/clock.py).
        clock.CLOCK.measure(self._client)
        now = clock.now_ms()
        with self._client.pipeline(transaction=False) as pipe:
            pipe.zadd(self._keys.workers, {self._id: now})
            pipe.zremrangebyscore(self._keys.workers, "-inf", now - FORGET_WORKERS_MS)
            if self.subscribers:
                pipe.hset(self._keys.known, mapping=dict.fromkeys(self.subscribers, now))
            pipe.execute()
        if self._file:
            Path(self._file).touch()
        self.sweep_removed(now)
        self.dissolve_unordered(now)

    def dissolve_unordered(self, now: int) -> list[str]:
        """Release what waits in the queues of subscribers configured here without ordering
        (turned off by a reload or a restart). Removed subscribers are sweep_removed's."""
        had = {text(n) for n in self._client.smembers(self._keys.ordered_subscribers)}
        off = sorted(n for n in had if n in self.subscribers and n not in self.ordered)
        for name in off:
            released = ordering.release_all(self._client, self._keys, name, now, self.retention)
            log.info("ordering turned off: waiting events released",
                     extra={"subscriber": name, "released": released})
        return off

    def sweep_removed(self, now: int) -> list[str]:
        """Make the pending attempts of subscribers no live worker has configured due now."""
        known = self._client.hgetall(self._keys.known)
        removed = [text(name) for name, at in known.items()
                   if text(name) not in self.subscribers
                   and now - int(at) > KNOWN_FRESH_MS]
        if not removed:
            return []
        gone = set(removed)
        released = 0
        for name in removed:
            ordering.release_all(self._client, self._keys, name, now, self.retention)
            released += self._ready_to_schedule(name, now)
            for waiting in (self._keys.held(name), self._keys.parked(name)):
                released += int(self._release(keys=[waiting, self._keys.schedule], args=[now]))
        for entry, _ in self._client.zscan_iter(self._keys.schedule):
            try:
                names = read_member(entry).subscribers
            except Exception:  # not a relay message: not ours to judge
                continue
            if names and set(names) <= gone:
                self._client.zadd(self._keys.schedule, {entry: now}, xx=True)
                released += 1
        self._client.hdel(self._keys.known, *removed)
        log.warning("subscribers removed from every worker's config: their pending attempts "
                    "are dead-lettered as they come due", extra={"subscribers": removed,
                                                                "attempts": released})
        return removed

    def _ready_to_schedule(self, name: str, now: int) -> int:
        """Released ordered events of a removed subscriber: due now in the schedule (one
        message each), where the engine dead-letters them as "subscriber removed"."""
        moved = 0
        ready = self._keys.order_ready(name)
        while ids := [text(i) for i in self._client.zrange(ready, 0, 499)]:
            members = [member(i, name, 1) for i in ids]
            moved += int(self._move_ready(args=[ready, self._keys.schedule, now,
                                                *[x for pair in zip(ids, members, strict=True)
                                                  for x in pair]]))
        return moved

    def run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.beat()
                failing = False
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("heartbeat cannot reach redis; retrying",
                                extra={"error": repr(exc)})
                failing = True
            except Exception:
                log.exception("heartbeat failed; retrying")
            self._stop.wait(INTERVAL)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="relay-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
