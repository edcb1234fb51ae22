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
  machine), its attempts wait for that worker instead.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import redis
from redis.exceptions import RedisError

from relay import clock
from relay.connections import text
from relay.health import RELEASE_HELD_FN
from relay.keys import Keys
from relay.queue import read_deliver_message

log = logging.getLogger("relay.worker")

INTERVAL = 5.0
#: Matches workers/engine.py: a name noted within this long is known somewhere.
KNOWN_FRESH_MS = 15_000
#: Worker entries older than this are pruned from ``workers``.
FORGET_WORKERS_MS = 3_600_000
HEARTBEAT_FILE_ENV = "RELAY_WORKER_HEARTBEAT"

RELEASE = RELEASE_HELD_FN + "return release_held(KEYS[1], KEYS[2], ARGV[1])"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Heartbeat:
    def __init__(self, client: redis.Redis, keys: Keys, subscribers: list[str]) -> None:
        self._client = client
        self._keys = keys
        self.subscribers = subscribers
        self._id = worker_id()
        self._file = os.environ.get(HEARTBEAT_FILE_ENV)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._release = client.register_script(RELEASE)

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
            for waiting in (self._keys.held(name), self._keys.parked(name)):
                released += int(self._release(keys=[waiting, self._keys.schedule], args=[now]))
        for member, _ in self._client.zscan_iter(self._keys.schedule):
            try:
                names = read_deliver_message(member).subscribers
            except Exception:  # not a relay message: not ours to judge
                continue
            if names and set(names) <= gone:
                self._client.zadd(self._keys.schedule, {member: now}, xx=True)
                released += 1
        self._client.hdel(self._keys.known, *removed)
        log.warning("subscribers removed from every worker's config: their pending attempts "
                    "are dead-lettered as they come due", extra={"subscribers": removed,
                                                                "attempts": released})
        return removed

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
