"""SIGHUP reload: re-read the config file, apply what can change in a running process.

All or nothing: a file that does not load is refused with the message ``relay check-config``
prints, logged at error, and the running config stays. Keys a running process cannot change
(``relay.config.RESTART_KEYS``: Redis, hosts, ports, worker pool, concurrency, queue) are
logged as "restart required" and keep their running value; everything else applies.

What would run (the new file with the restart-only keys kept) is checked again
(``relay.config.check_running``): a file valid on its own values may not be once the running
``redis.retention`` and the address actually bound are the ones in force. Such a reload is
refused the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from relay.config import Config, check_running, live_part, load_config, restart_required
from relay.errors import ConfigError

log = logging.getLogger("relay.reload")


class Reloader:
    def __init__(self, config: Config, apply: Callable[[Config], None], who: str,
                 admin_bound: str | None = None) -> None:
        """``admin_bound``: the address the admin listens on (the admin passes it)."""
        self.current = config
        self._apply = apply
        self._who = who
        self._admin_bound = admin_bound

    def reload(self) -> bool:
        """Re-read ``current.source``; True if a new config was applied."""
        try:
            new = load_config(self.current.source)
            effective = live_part(self.current, new)
            check_running(effective, self._admin_bound)
        except ConfigError as exc:
            log.error("config reload refused; the running config stays",
                      extra={"who": self._who, "error": f"invalid config: {exc}"})
            return False
        restart = restart_required(self.current, new)
        if restart:
            log.warning("restart required for some changed keys; they keep their running value",
                        extra={"who": self._who, "keys": restart})
        try:
            self._apply(effective)
        except Exception:  # a bug in applying must not take the process down
            log.exception("config reload failed to apply; the running config stays",
                          extra={"who": self._who})
            return False
        self.current = effective
        for warning in effective.warnings:
            log.warning("config warning", extra={"who": self._who, "warning": warning})
        log.info("config reloaded", extra={"who": self._who,
                                           "subscribers": [s.name for s in effective.subscribers]})
        return True
