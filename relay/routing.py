"""Which subscribers an event goes to (used by the workers to fan out, and by the admin to
show an event's deliveries): ``topics`` and ``event_types`` filters.

Both filters are optional; when given, each must match (all given must match). Matching is
case-insensitive with ``*`` as a wildcard; an event matches ``event_types`` when any of its
types (the top-level ``eventType`` or any ``resource[].eventType``) matches any pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from relay.config import Subscriber
from relay.models import StoredEvent


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [".*".join(re.escape(p) for p in pattern.lower().split("*")) for pattern in patterns]
    return re.compile("(?:" + "|".join(parts) + r")\Z") if parts else None


class Router:
    """Precompiled filters of every subscriber; ``route`` is called once per event."""

    def __init__(self, subscribers: Sequence[Subscriber]) -> None:
        self._rules = [(s, _compile(s.topics), _compile(s.event_types)) for s in subscribers]

    def route(self, event: StoredEvent) -> list[Subscriber]:
        topic = event.topic.lower()
        chosen = []
        for sub, topics, types in self._rules:
            if topics is not None and not topics.match(topic):
                continue
            if types is not None and not any(types.match(t) for t in event.event_types):
                continue
            chosen.append(sub)
        return chosen
