"""The names the admin answers to: ``Host`` and ``Origin`` checks against DNS rebinding and
cross-site requests (docs/admin-api.md, "Safe from other web pages").

A web page can make a browser send requests to any address, the admin's loopback port too,
but it cannot choose the ``Host`` and ``Origin`` the browser sends: they name the page's own
site. So the admin answers only a ``Host`` that names the admin itself: a loopback name
(``localhost``, ``127.0.0.1``, ``[::1]``) with the port the request arrived on, or one of
``admin.allowed_hosts``. A loopback name is accepted whatever the address bound, because only
a page loaded from that very name and port (the console itself) can send it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})

# A DNS name or IPv4 address (letters, digits, '.', '-', '_' for container names) or a
# bracketed IPv6 address, then an optional port. Applied with fullmatch (no trailing newline).
_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9_](?:[a-z0-9_.-]{0,252}))"
                   r"(?::(?P<port>\d{1,5}))?")


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port or None)`` of ``name[:port]``, lower-cased; None if it is not one."""
    match = _HOST.fullmatch(value.lower())
    if match is None:
        return None
    port = match.group("port")
    if port is not None and not 0 < int(port) < 65536:
        return None
    return match.group("name"), int(port) if port is not None else None


class HostRule:
    """Which ``Host`` values (and ``Origin`` sites) are the admin's own."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self._any_port: set[str] = set()
        self._exact: set[tuple[str, int]] = set()
        for entry in allowed:
            parsed = split_host(entry)
            if parsed is None:
                continue  # refused by the config check; never reached in a running hub
            name, port = parsed
            if port is None:
                self._any_port.add(name)
            else:
                self._exact.add((name, port))

    def allows(self, host: str, local_port: int | None) -> bool:
        """Whether ``host`` (a ``Host`` header's value) names the admin; ``local_port`` is
        the port the request arrived on (None if not TCP)."""
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        if name in LOOPBACK_NAMES and local_port is not None and (
                port == local_port or (port is None and local_port == 80)):
            return True
        return name in self._any_port or (port is not None and (name, port) in self._exact)

    def allows_origin(self, origin: str, local_port: int | None) -> bool:
        """Whether an ``Origin`` header names a site of the admin's own (``null``, the origin
        of sandboxed frames and local files, never does)."""
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or parts.path or parts.query or not parts.netloc:
            return False
        return self.allows(parts.netloc, local_port)
