"""Credentials inside URLs (``redis://:pw@host``, ``https://user:pw@host``) never leave the hub.

``mask_url`` hides the password of one URL; ``mask_text`` does the same for every URL inside a
free text (an exception's message, a log line), so a Redis error that echoes its URL cannot
leak it. The JSON log formatter runs every line through ``mask_text``.
"""

from __future__ import annotations

import re

# scheme://[user]:password@  (password: anything but '@', '/' and whitespace)
_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*:)(?P<pw>[^/\s]+)@")
# scheme://token@ (a user part alone is often a token: https://ghp_xxx@host)
_USER_ONLY = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]+)@")
MASK = "***"


def mask_text(text: str) -> str:
    """``text`` with the password (or lone user part) of every URL in it replaced by ``***``."""
    if "@" not in text:
        return text
    text = _CREDENTIALS.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    return _USER_ONLY.sub(lambda m: f"{m.group('head')}{MASK}@", text)


def mask_url(url: str) -> str:
    """One URL with its password (if any) replaced by ``***``."""
    return mask_text(url)
