"""One delivery attempt over HTTP: sign, post the exact bytes, classify the outcome.

Every failure of an attempt becomes an ``Outcome`` with an error class, whatever raised it:
an attempt that escaped as an exception would never be recorded, and would come back only
when its lease expired, with no history in its dead letter.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import time
import zlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import msgspec
from multidict import CIMultiDict

from relay.config import SignatureScheme, Subscriber
from relay.masking import mask_url
from relay.models import ANSWER_BODY_BYTES, Answer, SentRequest
from relay.signatures import INGRAM_HEADER, StandardWebhook, sign_ingram
from workers.backoff import parse_retry_after

USER_AGENT = "order-event-relay/0.1"
#: Header pairs in the order sent or received.
Pairs = tuple[tuple[str, str], ...]


class Outcome(msgspec.Struct, frozen=True):
    """What one attempt gave: an HTTP status, or an error class when there was no answer;
    with an answer, its headers and the first ANSWER_BODY_BYTES + 1 bytes of its body
    (decompressed, if it came gzip- or deflate-encoded)."""

    status: int | None
    error: str | None
    latency_ms: float
    retry_after: float | None = None
    headers: Pairs = ()
    head: bytes = b""
    #: The body went on past ``head`` (more than ANSWER_BODY_BYTES).
    more: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def gone(self) -> bool:
        return self.status == 410


def signed_headers(signature: SignatureScheme, secret: str, own: dict[str, str],
                   event_id: str, body: bytes) -> CIMultiDict[str] | dict[str, str]:
    """The endpoint's own headers, then content type and signatures. Header names are
    case-insensitive: the hub's win over a configured ``content-type`` or ``x-hub-signature``
    in any case, instead of going out twice. (Without own headers a plain dict does: the
    hub's names do not repeat.)"""
    headers: CIMultiDict[str] | dict[str, str] = CIMultiDict(own) if own else {}
    headers["Content-Type"] = "application/json"
    headers["User-Agent"] = USER_AGENT
    if signature in ("ingram", "both"):
        headers[INGRAM_HEADER] = sign_ingram(secret, event_id)
    if signature in ("standard", "both"):
        # webhook-id is stable across retries (receivers dedupe on it); timestamp is fresh.
        for name, value in StandardWebhook(secret).headers(f"msg_{event_id}", body).items():
            headers[name] = value
    return headers


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


async def post(session: aiohttp.ClientSession, url: str, body: bytes,
               headers: CIMultiDict[str] | dict[str, str], timeout: float) -> Outcome:
    started = time.perf_counter()

    def elapsed() -> float:
        return round((time.perf_counter() - started) * 1000, 2)

    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False,
                                timeout=_timeout(timeout)) as resp:
            head, more = await _read_head(resp)
            # Retry-After is honoured on any status (a 500 with one means it too).
            retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
            return Outcome(resp.status, None, elapsed(), retry_after,
                           tuple(resp.headers.items()), head, more)
    except TimeoutError:
        return Outcome(None, "timeout", elapsed())
    except aiohttp.ClientConnectorDNSError:
        return Outcome(None, "dns", elapsed())
    except aiohttp.ClientConnectorError:
        return Outcome(None, "connect", elapsed())
    except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
        return Outcome(None, type(exc).__name__, elapsed())
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # e.g. ValueError for a header aiohttp refuses: still an attempt
        return Outcome(None, type(exc).__name__, elapsed())


# -- what an attempt keeps -----------------------------------------------------------------

_LIMIT = ANSWER_BODY_BYTES + 1
#: Compressed bytes read at most to find the first ANSWER_BODY_BYTES of a compressed body.
_COMPRESSED_LIMIT = 64 * 1024


async def _read_head(resp: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The first ANSWER_BODY_BYTES of the body, and whether there was more. Never more than
    that is read (plus one byte to know): a 200 KB error page costs 4 KiB. The rest is left
    unread (the connection is then closed instead of reused)."""
    encoding = resp.headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        return await _read_compressed(resp.content, encoding)
    data = await _read_up_to(resp.content, _LIMIT)
    return data[:ANSWER_BODY_BYTES], len(data) > ANSWER_BODY_BYTES


async def _read_up_to(content: aiohttp.StreamReader, limit: int) -> bytes:
    # read(n) returns what is buffered (up to n), not n: read until n or the end.
    parts, got = [], 0
    while got < limit:
        chunk = await content.read(limit - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def _read_compressed(content: aiohttp.StreamReader, encoding: str) -> tuple[bytes, bool]:
    """The session does not decompress (the hub relays nothing it receives back); a gzipped
    error page is decompressed here, as far as its first ANSWER_BODY_BYTES."""
    # 47: zlib or gzip header, detected; "deflate" is sometimes sent raw (no zlib header).
    inflate = zlib.decompressobj(47)
    out, read = b"", 0
    try:
        while len(out) < _LIMIT and read < _COMPRESSED_LIMIT:
            chunk = await content.read(min(8192, _COMPRESSED_LIMIT - read))
            if not chunk:
                break
            if read == 0 and encoding == "deflate" and chunk[:1] not in (b"\x78", b"\x58"):
                inflate = zlib.decompressobj(-15)
            read += len(chunk)
            out += inflate.decompress(chunk, _LIMIT - len(out))
            if inflate.eof:
                break
    except zlib.error:
        return b"", True
    more = len(out) > ANSWER_BODY_BYTES or not inflate.eof
    return out[:ANSWER_BODY_BYTES], more


#: Request headers whose value is a credential: kept as ``***``. So is every header the
#: operator configured under ``headers:`` (the hub cannot tell which of those are secrets).
#: Signatures (X-Hub-Signature, webhook-signature) are kept: they are HMACs, not the secret.
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key", "api-key",
    "apikey", "x-auth-token", "x-access-token", "x-token", "x-secret", "x-webhook-secret"})
#: Query parameters whose value is kept as ``***``.
_CREDENTIAL_PARAM = re.compile(
    r"(token|key|secret|pass|pwd|auth|sig|credential|session|code)", re.IGNORECASE)
MASK = "***"
#: Shorter known secrets are not searched for in free text: a short string would match by
#: chance inside signatures and bodies, and mangle them.
_NEEDLE_MIN = 8


class Redaction(msgspec.Struct, frozen=True):
    """What never goes into an attempt record for one subscriber: its URL as kept, the header
    names masked, and the strings scrubbed from whatever else is kept (the secret, in the
    clear and base64-encoded; configured header values; URL credentials)."""

    url: str
    masked: frozenset[str]
    needles: tuple[str, ...]

    def scrub(self, text: str) -> str:
        for needle in self.needles:
            if needle in text:
                text = text.replace(needle, MASK)
        return text

    def pairs(self, headers: object, masked: frozenset[str]) -> Pairs:
        items = headers.items()  # type: ignore[attr-defined]
        # str(): a CIMultiDict's names are ``istr``, which msgpack does not encode.
        return tuple((str(name), MASK if name.lower() in masked else self.scrub(value))
                     for name, value in items)


@functools.lru_cache(maxsize=256)
def redaction(url: str, secret: str, configured: tuple[tuple[str, str], ...]) -> Redaction:
    parts = urlsplit(url)
    needles = {secret, secret.removeprefix("whsec_")}
    raw = secret.encode()
    needles |= {base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode()}
    needles |= {n.rstrip("=") for n in list(needles)}
    needles |= {value for _, value in configured}
    if parts.password:
        needles.add(parts.password)
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = []
    for name, value in query:
        if _CREDENTIAL_PARAM.search(name):
            needles.add(value)
            value = MASK
        kept.append((name, value))
    masked_url = mask_url(urlunsplit(parts._replace(query=urlencode(kept, safe="*"))))
    # Longest first: a secret's base64 is scrubbed whole before a shorter part of it.
    found = sorted((n for n in needles if len(n) >= _NEEDLE_MIN), key=len, reverse=True)
    return Redaction(masked_url, CREDENTIAL_HEADERS | {n.lower() for n, _ in configured},
                     tuple(found))


def redaction_of(sub: Subscriber) -> Redaction:
    return redaction(sub.url, sub.secret, tuple(sub.headers.items()))


_RESPONSE_MASKED = frozenset({"set-cookie", "www-authenticate", "proxy-authenticate"})


def sent_request(sub: Subscriber, headers: CIMultiDict[str] | dict[str, str]) -> SentRequest:
    """The request as kept: URL and headers as sent, credentials masked (``redaction``)."""
    r = redaction_of(sub)
    return SentRequest(r.url, r.pairs(headers, r.masked))


def answer(sub: Subscriber, outcome: Outcome, keep_body: bool) -> Answer | None:
    """The answer as kept (None when nothing came back): status, headers and, with
    ``keep_body``, the first ANSWER_BODY_BYTES of the body as text."""
    if outcome.status is None:
        return None
    r = redaction_of(sub)
    headers = tuple((str(name), MASK if name.lower() in _RESPONSE_MASKED else r.scrub(value))
                    for name, value in outcome.headers)
    if not keep_body:
        return Answer(outcome.status, headers)
    return Answer(outcome.status, headers, r.scrub(_text(outcome.head, outcome.headers)),
                  outcome.more)


def _text(head: bytes, headers: Pairs) -> str:
    """The body as text, in its declared charset (else UTF-8); undecodable bytes replaced."""
    charset = "utf-8"
    for name, value in headers:
        if name.lower() == "content-type" and "charset=" in value.lower():
            charset = value.lower().split("charset=", 1)[1].split(";")[0].strip(" \"'")
    try:
        return head.decode(charset, errors="replace")
    except LookupError:
        return head.decode("utf-8", errors="replace")
