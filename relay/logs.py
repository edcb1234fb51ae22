"""Logs as one JSON object a line. Pass context with ``extra={"eventId": ..., "subscriber": ...}``.

Secrets never reach a log: nothing here formats a config or a header set, callers log names
and ids only, and every line passes through ``mask_text`` so a URL with credentials inside an
error message (a Redis URL in a connection error) is masked. Python warnings (Celery's
``SecurityWarning``) are logged too, as JSON, instead of printed.

``extra`` keys must not be ``logging.LogRecord``'s own attributes (``name``, ``msg``,
``args``, ``process``, ``module``...): ``logging`` raises KeyError for those
(tests/test_logs.py checks every ``extra=`` in the code base).
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec

from relay.masking import mask_text

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_encode = msgspec.json.Encoder(decimal_format="number").encode


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return mask_text(_encode(entry).decode())


def setup_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr as JSON lines (idempotent)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_relay_json", False):
            root.setLevel(level.upper())  # installed already: only the level may change
            return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._relay_json = True  # type: ignore[attr-defined]
    root.handlers = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    if level.upper() != "DEBUG":
        # Celery logs two lines per task at INFO; at thousands of tasks a second that is
        # most of the log and a measurable share of the CPU. Our own lines carry the eventId.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
