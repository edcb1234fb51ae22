"""Pulling attempts into lanes with room: parked attempts, and ordered events released by
the event ahead of them.

An attempt whose subscriber already held its share of the process was parked in
``parked:{sub}``; a released ordered event waits in ``ordready:{sub}`` (relay/ordering.py).
Lanes of that subscriber, in any worker process, take them as they have room: at once when
a post ends or an outcome released one, and every PULL_SECONDS for work another process
left. Each taken attempt becomes its own lease in the same script, so one taken by a worker
that then dies is queued again when that lease falls due.
"""

from __future__ import annotations

import asyncio
import logging

from redis.exceptions import RedisError

from relay.config import Subscriber
from relay.queue import member, read_member
from workers.ledger import Loaded, now_ms
from workers.parts import EngineParts
from workers.planning import _Plan

log = logging.getLogger("relay.worker")

#: How often a lane with room looks for parked attempts left by other processes.
PULL_SECONDS = 1.0


class Pulling(EngineParts):
    """The engine's pulling part (workers/engine.py puts the parts together)."""

    async def _pull(self, name: str) -> None:
        """Take parked attempts of ``name`` into its lane while it has room for them."""
        lane, sub = self.lanes[name], self.subscribers.get(name)
        if sub is None or lane.pulling:
            return
        lane.pulling = True
        try:
            # Released ordered events first: each is the head of a key others wait behind.
            while lane.ready and (room := lane.hold - lane.held) > 0:
                ids = await self.ledger.ready(name, room)
                if len(ids) < room:
                    lane.ready = False
                if ids:
                    await self._launch_ready(sub, ids)
            while lane.parked and (room := lane.hold - lane.held) > 0:
                parkings = lane.parkings
                members = await self.ledger.pull(name, room,
                                                 now_ms() + self.leases.lease_ms(sub))
                # Drained (for now), unless a plan parked more while the pull was on its way:
                # the pull may have missed those, so look again rather than leave them to the
                # next poll.
                if len(members) < room and lane.parkings == parkings:
                    lane.parked = False
                if members:
                    await self._launch_pulled(sub, members)
        finally:
            lane.pulling = False

    async def _launch_ready(self, sub: Subscriber, ids: list[str]) -> None:
        """Claim released ordered events (each becomes its own lease: its first attempt) and
        launch them; another process may have claimed some first."""
        members = {event_id: member(event_id, sub.name, 1) for event_id in ids}
        claimed, loaded = await self.ledger.claim_ready(
            sub.name, members, now_ms() + self.leases.lease_ms(sub))
        if claimed:
            taken = set(claimed)
            mine = [(m, item) for m, item in zip(members.values(), loaded, strict=True)
                    if m in taken]
            await self._launch_pulled(sub, [m for m, _ in mine], [item for _, item in mine])

    async def _launch_pulled(self, sub: Subscriber, members: list[bytes],
                             loaded: list[Loaded] | None = None) -> None:
        taken = [(m, read_member(m)) for m in members]
        ids = [str(args.event_id) for _, args in taken]
        loaded = self._shared(loaded) if loaded is not None else await self._load(ids)
        plan, now = _Plan(), now_ms()
        for (pulled, args), item, event_id in zip(taken, loaded, ids, strict=True):
            try:
                self._plan_event(plan, event_id, item, [sub.name], args.attempt, None, {}, now,
                                 lease=pulled, trigger=args.trigger)
            except Exception as exc:
                plan.dead.append((event_id, sub, f"cannot be processed: {exc}"[:300],
                                  item.event, pulled))
        # Every member is accounted for in the one script: launched (its lease re-scored),
        # held (moved), dropped (delivered meanwhile) or dead-lettered (removed with the
        # letter). Should the write fail, each stays in the schedule as its own lease.
        await self._commit(plan, ())

    async def _puller(self) -> None:
        """Pull parked attempts into lanes with room: at once when a post ends (``_finished``)
        and every PULL_SECONDS for parked work another process left (one round trip)."""
        while True:
            await asyncio.sleep(PULL_SECONDS)
            names = [n for n in self.subscribers if self.lanes[n].held < self.lanes[n].hold]
            if not names:
                continue
            try:
                counts = await self.ledger.run(
                    [("ZCARD", key) for n in names
                     for key in (self.keys.parked(n), self.keys.order_ready(n))])
                for i, name in enumerate(names):
                    parked, ready = counts[2 * i], counts[2 * i + 1]
                    if parked or ready:
                        self.lanes[name].parked |= bool(parked)
                        self.lanes[name].ready |= bool(ready)
                        await self._pull(name)
            except (RedisError, OSError) as exc:
                log.warning("could not pull parked attempts; retrying",
                            extra={"error": repr(exc)})
            except Exception:
                log.exception("pulling parked attempts failed; retrying")

    def _background_pull(self, name: str) -> None:
        task = asyncio.create_task(self._pull(name))
        self._pulls.add(task)
        task.add_done_callback(self._pull_done)

    def _pull_done(self, task: asyncio.Task[None]) -> None:
        self._pulls.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not pull parked attempts", extra={"error": repr(task.exception())})
