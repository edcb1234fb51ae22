"""Signatures on both sides of the hub.

* Ingram Micro's ``X-Hub-Signature``: base64(HMAC-SHA512(secret, eventId)). It covers the
  ``eventId`` only, not the body; the hub verifies it on the way in and re-computes it with each
  subscriber's own secret on the way out, so code written against Ingram verifies us unchanged.
* Standard Webhooks v1 (https://www.standardwebhooks.com/): ``webhook-signature`` is
  ``v1,`` + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}")), key = base64 after ``whsec_``.

Comparisons are constant time (``hmac.compare_digest``) against every candidate, so the time
taken does not tell which secret, or how much of a signature, matched.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable

from relay.errors import SignatureError

INGRAM_HEADER = "X-Hub-Signature"


class IngramSigner:
    """Signs and verifies Ingram Micro's ``X-Hub-Signature`` with one or more secrets.

    The first secret signs; any of them verifies (several while a secret is being rotated).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        self._keys = [s.encode("utf-8") for s in secrets]
        if not self._keys:
            raise ValueError("at least one secret is required")

    def sign(self, event_id: str) -> str:
        return _ingram_digest(self._keys[0], event_id)

    def verify(self, event_id: str, signature: str | None) -> None:
        """Raise SignatureError unless ``signature`` matches ``event_id`` under some secret."""
        if not signature:
            raise SignatureError(f"missing {INGRAM_HEADER} header")
        given = signature.strip().encode("ascii", "replace")
        matched = False
        for key in self._keys:  # no early exit: every secret costs the same time
            expected = _ingram_digest(key, event_id).encode("ascii")
            matched |= hmac.compare_digest(expected, given)
        if not matched:
            raise SignatureError(f"{INGRAM_HEADER} does not match the eventId")


def _ingram_digest(key: bytes, event_id: str) -> str:
    mac = hmac.new(key, event_id.encode("utf-8"), hashlib.sha512).digest()
    return base64.b64encode(mac).decode("ascii")


def sign_ingram(secret: str, event_id: str) -> str:
    """``X-Hub-Signature`` for ``event_id`` under ``secret`` (the string as written, UTF-8)."""
    return _ingram_digest(secret.encode("utf-8"), event_id)


class StandardWebhook:
    """Standard Webhooks v1 sign/verify for one ``whsec_`` secret."""

    PREFIX = "whsec_"

    def __init__(self, secret: str) -> None:
        if not secret.startswith(self.PREFIX):
            raise ValueError("a Standard Webhooks secret starts with whsec_")
        self._key = base64.b64decode(secret[len(self.PREFIX):], validate=True)

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        to_sign = f"{msg_id}.{timestamp}.".encode() + body
        mac = hmac.new(self._key, to_sign, hashlib.sha256).digest()
        return "v1," + base64.b64encode(mac).decode("ascii")

    def headers(self, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The three ``webhook-*`` headers for one attempt (timestamp fresh unless given)."""
        ts = int(time.time()) if timestamp is None else timestamp
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": self.sign(msg_id, ts, body),
        }

    def verify(self, body: bytes, headers: dict[str, str], tolerance: int = 300,
               now: float | None = None) -> None:
        """Raise SignatureError unless the headers sign ``body``; timestamps must be recent."""
        lowered = {k.lower(): v for k, v in headers.items()}
        try:
            msg_id = lowered["webhook-id"]
            ts_text = lowered["webhook-timestamp"]
            sig_header = lowered["webhook-signature"]
        except KeyError as exc:
            raise SignatureError(f"missing {exc.args[0]} header") from exc
        try:
            ts = int(ts_text)
        except ValueError as exc:
            raise SignatureError("webhook-timestamp is not an integer") from exc
        current = time.time() if now is None else now
        if abs(current - ts) > tolerance:
            raise SignatureError("webhook-timestamp is outside the tolerance")
        expected = self.sign(msg_id, ts, body).split(",", 1)[1].encode()
        matched = False
        for candidate in sig_header.split():
            version, _, value = candidate.partition(",")
            if version == "v1":
                matched |= hmac.compare_digest(expected, value.encode("ascii", "replace"))
        if not matched:
            raise SignatureError("webhook-signature does not match")
