"""The Redis key layout, shared by the ingress (writer) and the workers (readers).

Every key starts with the prefix, so one Redis can serve several hubs (``prefix`` differs).

=====================  ======  ==============================================================
key                    type    holds
=====================  ======  ==============================================================
seen:{id}              string  dedupe marker holding the token of the batch that stored the
                               event; expires after ``ingress.dedupe_window``
event:{id}             string  msgpack StoredEvent, expires after ``redis.retention``
done:{id}              hash    subscriber -> unix ms of the 2xx (never deliver twice)
log:{id}:{sub}         list    msgpack Attempt records, newest first, bounded
schedule               zset    pending attempt -> due unix ms (retries *and* in-flight leases)
unclaimed              zset    queued message -> unix ms when it is queued again unless a
                               worker has taken it by then (kombu pops a message and records
                               it as unacknowledged in two steps: a worker killed between
                               them would otherwise lose it)
dlq                    hash    "{sub}\\n{id}" -> msgpack DeadLetter
{queue}                list    Celery (kombu) messages, LPUSHed by ingress and scheduler
=====================  ======  ==============================================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "relay:"
    queue: str = "relay"

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}seen:{event_id}"

    def event(self, event_id: str) -> str:
        return f"{self.prefix}event:{event_id}"

    def done(self, event_id: str) -> str:
        return f"{self.prefix}done:{event_id}"

    def log(self, event_id: str, subscriber: str) -> str:
        return f"{self.prefix}log:{event_id}:{subscriber}"

    @property
    def schedule(self) -> str:
        return f"{self.prefix}schedule"

    @property
    def unclaimed(self) -> str:
        return f"{self.prefix}unclaimed"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}dlq"

    @staticmethod
    def dlq_field(event_id: str, subscriber: str) -> str:
        return f"{subscriber}\n{event_id}"
