"""Keeping the leases of held attempts ahead of their due time.

An attempt may wait in its lane behind slow posts for longer than one post's timeout; its
lease must not fall due meanwhile (the scheduler would queue it again: a duplicate post). So,
like SQS's ChangeMessageVisibility or a Celery visibility timeout renewed while a task runs,
a live worker renews what it holds, and a dead one's leases fall due ``timeout +
lease_grace`` after its last renewal. Nothing is written while deliveries finish quickly:
only leases within half a grace of due are renewed.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from relay.config import Subscriber
from workers.ledger import Ledger, now_ms

log = logging.getLogger("relay.worker")


class LeaseKeeper:
    def __init__(self, ledger: Ledger, grace: float) -> None:
        self._ledger = ledger
        self.grace = grace
        self._held: dict[bytes, tuple[int, Subscriber]] = {}  # lease -> (due ms, subscriber)

    def lease_ms(self, sub: Subscriber) -> int:
        """How long a lease lasts past its last renewal: the post, then the grace."""
        return int((sub.timeout + self.grace) * 1000)

    def track(self, lease: bytes, due: int, sub: Subscriber) -> None:
        self._held[lease] = (due, sub)

    def forget(self, lease: bytes) -> None:
        """Stop renewing: the attempt ended (its outcome write re-scores or removes it)."""
        self._held.pop(lease, None)

    async def run(self) -> None:
        interval = max(0.1, min(5.0, self.grace / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_due()
            except (RedisError, OSError) as exc:
                log.warning("could not renew leases; retrying", extra={"error": repr(exc)})
            except Exception:  # a keeper that died would let held attempts be posted twice
                log.exception("renewing leases failed; retrying")

    async def renew_due(self) -> None:
        now = now_ms()
        soon = now + int(self.grace * 500)
        renew = {lease: now + self.lease_ms(sub) for lease, (due, sub) in self._held.items()
                 if due - int(sub.timeout * 1000) < soon}
        if not renew:
            return
        await self._ledger.renew(renew)
        for lease, due in renew.items():
            if lease in self._held:
                self._held[lease] = (due, self._held[lease][1])
