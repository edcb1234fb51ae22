"""The Redis key layout, shared by the ingress and admin (readers and writers) and the workers.

Every key starts with ``redis.prefix`` (default ``relay:``), the Celery queue included, so hubs
with different prefixes share one Redis without seeing each other's events, retries or dead
letters. (kombu's own bookkeeping, ``unacked`` and ``unacked_index``, is shared: it holds each
message with its queue's name, so a restore puts it back where it came from.)

Per event (each expires after ``redis.retention``):

=========================  ======  ==========================================================
key                        type    holds
=========================  ======  ==========================================================
seen:{id}                  string  dedupe marker: the token of the batch that stored the event;
                                   expires after ``ingress.dedupe_window``
event:{id}                 string  msgpack StoredEvent (the exact bytes received)
deliveries:{id}            hash    subscriber -> ``d<ms>`` delivered, ``r<ms>`` retry due,
                                   ``h<ms>`` held, ``x<ms>`` dead-lettered; for an ordered
                                   subscriber ``o<ms>`` first in line when accepted, ``w<ms>``
                                   waiting behind another event, ``q<ms>`` released to a lane
                                   (the per-event delivery record); and ``#`` (empty), no
                                   subscriber's: written with each success, so that the
                                   success that creates the record, alone, sets its expiry
log:{id}:{sub}             list    msgpack Attempt records, newest first, bounded
letter:{sub}:{id}          string  msgpack DeadLetter (reason, time, the event)
=========================  ======  ==========================================================

Hub-wide:

=========================  ======  ==========================================================
{queue}                    list    Celery (kombu) messages, LPUSHed by ingress and scheduler
schedule                   zset    pending attempt message -> due ms (retries, parked
                                   attempts *and* in-flight leases)
unclaimed                  zset    queued message -> ms when it is queued again unless a
                                   worker took it (kombu pops a message and records it as
                                   unacknowledged in two steps; see workers/scheduler.py)
events                     zset    event id -> received ms (the time index; trimmed)
order:{number}             zset    event id -> received ms, per Ingram order number
dead:{sub}                 zset    event id -> dead-lettered ms (the dead letter index)
deadsubs                   set     subscribers that have (or had) dead letters
pending:{sub}              zset    event id -> received ms, until delivered or dead: every
                                   pending delivery but the first attempts of fan-outs that a
                                   worker process holds (those are in ``inflight``)
inflight                   hash    ``{sub}|{host:pid}`` -> ``count oldest-received-ms at-ms``:
                                   what each worker process holds of those first attempts,
                                   written every second (workers/tally.py)
stats:{minute}             hash    per-minute counters (accepted, per subscriber outcomes and
                                   latency buckets, backlog age)
totals                     hash    the same counters since the start (Prometheus)
health:{sub}               hash    circuit breaker, pause, disable, last error/success
parked:{sub}               zset    attempts waiting for room in a lane of this subscriber
                                   (any worker's lane pulls them, oldest first) -> parked ms
held:{sub}                 zset    attempt messages held while a subscriber is paused,
                                   disabled or its breaker open -> held ms
breakers                   zset    subscriber -> ms when a probe is released from held
rate:{sub}                 string  the rate limiter's theoretical arrival time (GCRA)
known                      hash    subscriber name -> last ms a live worker had it configured
workers                    zset    worker id (host:pid) -> last heartbeat ms
backlog_since              string  ms since when the queue has not been empty
dupmark                    string  written by a store that found only duplicates, so its
                                   WAIT covers them (relay/ingress/store.py); expires in 60 s
alerts                     zset    alert job -> due ms; alert:{type}:{sub} rate-limits them
=========================  ======  ==========================================================

Ordered delivery (``ordering:``; relay/ordering.py). A *key* is ``o:{order number}`` or
``t:{topic}``; an (event, subscriber) is *queued* from acceptance until it is delivered,
dead-lettered (and not blocking) or released by turning ordering off:

=========================  ======  ==========================================================
ordq:{sub}:{key}           list    event ids of the key in acceptance order; the first is the
                                   head, the one that may be posted; deleted when empty
ordkeys:{id}               hash    subscriber -> the keys (``\n``-joined) the event is queued
                                   under; the field goes when the event leaves its queues
ordheld:{sub}              zset    key -> ms since its head holds others back (waiting events,
                                   or blocked)
ordblocked:{sub}           zset    key -> ms its head was dead-lettered under on_dead: block
ordready:{sub}             zset    event id -> ms released (first on every key now): lanes of
                                   the subscriber pull it like a parked attempt
ordsubs                    set     subscribers that have (or had) ordering state
ordwaiting                 hash    subscriber -> events waiting behind another
=========================  ======  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

#: The delivery record's marker field (``deliveries:{id}`` above): not a subscriber.
RECORD_MARK = b"#"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "relay:"
    queue_name: str = "queue"

    @classmethod
    def of(cls, config: object) -> Keys:
        """The keys of a ``relay.config.Config`` (its prefix and queue)."""
        return cls(prefix=config.redis.prefix,  # type: ignore[attr-defined]
                   queue_name=config.worker.queue)  # type: ignore[attr-defined]

    @property
    def queue(self) -> str:
        """The Celery queue's name (a Redis list)."""
        return f"{self.prefix}{self.queue_name}"

    # -- per event ---------------------------------------------------------------------------

    def seen(self, event_id: str) -> str:
        return f"{self.prefix}seen:{event_id}"

    def event(self, event_id: str) -> str:
        return f"{self.prefix}event:{event_id}"

    def deliveries(self, event_id: str) -> str:
        return f"{self.prefix}deliveries:{event_id}"

    def log(self, event_id: str, subscriber: str) -> str:
        return f"{self.prefix}log:{event_id}:{subscriber}"

    def letter(self, subscriber: str, event_id: str) -> str:
        return f"{self.prefix}letter:{subscriber}:{event_id}"

    # -- hub-wide ---------------------------------------------------------------------------

    @property
    def schedule(self) -> str:
        return f"{self.prefix}schedule"

    @property
    def unclaimed(self) -> str:
        return f"{self.prefix}unclaimed"

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    def order(self, number: str) -> str:
        return f"{self.prefix}order:{number}"

    def dead(self, subscriber: str) -> str:
        return f"{self.prefix}dead:{subscriber}"

    @property
    def dead_subscribers(self) -> str:
        return f"{self.prefix}deadsubs"

    def pending(self, subscriber: str) -> str:
        return f"{self.prefix}pending:{subscriber}"

    @property
    def inflight(self) -> str:
        return f"{self.prefix}inflight"

    def stats(self, minute: int) -> str:
        """Counters of one minute (``minute`` = unix seconds // 60)."""
        return f"{self.prefix}stats:{minute}"

    @property
    def totals(self) -> str:
        return f"{self.prefix}totals"

    def health(self, subscriber: str) -> str:
        return f"{self.prefix}health:{subscriber}"

    def parked(self, subscriber: str) -> str:
        return f"{self.prefix}parked:{subscriber}"

    def held(self, subscriber: str) -> str:
        return f"{self.prefix}held:{subscriber}"

    @property
    def breakers(self) -> str:
        return f"{self.prefix}breakers"

    def rate(self, subscriber: str) -> str:
        return f"{self.prefix}rate:{subscriber}"

    @property
    def known(self) -> str:
        return f"{self.prefix}known"

    @property
    def workers(self) -> str:
        return f"{self.prefix}workers"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}alerts"

    def alert_window(self, kind: str, subscriber: str) -> str:
        return f"{self.prefix}alert:{kind}:{subscriber}"

    def alert_folded(self, kind: str, subscriber: str) -> str:
        return f"{self.prefix}alertfold:{kind}:{subscriber}"

    # -- ordered delivery (relay/ordering.py) ----------------------------------------------

    def order_queue(self, subscriber: str, key: str) -> str:
        return f"{self.prefix}ordq:{subscriber}:{key}"

    def order_keys(self, event_id: str) -> str:
        return f"{self.prefix}ordkeys:{event_id}"

    def order_holding(self, subscriber: str) -> str:
        return f"{self.prefix}ordheld:{subscriber}"

    def order_blocked(self, subscriber: str) -> str:
        return f"{self.prefix}ordblocked:{subscriber}"

    def order_ready(self, subscriber: str) -> str:
        return f"{self.prefix}ordready:{subscriber}"

    @property
    def ordered_subscribers(self) -> str:
        return f"{self.prefix}ordsubs"

    @property
    def order_waiting(self) -> str:
        return f"{self.prefix}ordwaiting"

    @property
    def backlog_since(self) -> str:
        """ms since when the queue has not been empty (written by the scheduler)."""
        return f"{self.prefix}backlog_since"

    @property
    def ready_probe(self) -> str:
        return f"{self.prefix}readyz"
