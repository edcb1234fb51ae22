"""Credentials inside URLs never leave the hub.

Two places carry them: the user part (``redis://:pw@host``, ``https://user:pw@host``,
``https://token@host``) and the query (``https://erp.example/hook?api_key=...``, a signed
``?sig=``, an Azure Functions ``?code=``).

``mask_url`` is for a URL the hub lists (a subscriber's, an alert target's, Redis's in
``relay status``, ``relay check-config``, ``GET /api/subscribers``): its password and *every*
query value become ``***``. A configured URL's query is the operator's to read in the file;
no list of names could know which of its parameters a subscriber treats as a secret.

``mask_text`` is for free text (an exception's message, every log line: the JSON log
formatter runs each through it): passwords of URLs, and the values of query parameters whose
names say credential (``CREDENTIAL_NAMES``), so an error that echoes a URL cannot leak it.
"""

from __future__ import annotations

import re

# scheme://[user]:password@  (password: anything but '@', '/' and whitespace)
_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*:)(?P<pw>[^/\s]+)@")
# scheme://token@ (a user part alone is often a token: https://ghp_xxx@host)
_USER_ONLY = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:@/\s]+)@")
#: Parts of query parameter names that name a credential (matched case-insensitively inside
#: the name: ``api_key``, ``apiKey``, ``access_token``, ``client_secret``, ``X-Amz-Signature``,
#: ``X-Amz-Credential``, ``password``, ``sig``, ``code``, ``auth``, ``session_id``...).
CREDENTIAL_NAMES = ("key", "token", "secret", "pass", "pwd", "sig", "auth", "cred", "session",
                    "code", "jwt", "hmac", "hash", "otp", "private")
# ?name=value or &name=value (also ';'), in a URL inside any text; the value ends at the next
# separator, whitespace, quote or backslash (text may be JSON).
_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#\s\"'<>\\]{1,100})=)(?P<value>[^&;#\s\"'<>\\]+)")
_CREDENTIAL_NAME = re.compile("|".join(CREDENTIAL_NAMES), re.IGNORECASE)
MASK = "***"


def _mask_credential_param(match: re.Match[str]) -> str:
    if _CREDENTIAL_NAME.search(match.group("name")):
        return f"{match.group('head')}{MASK}"
    return match.group(0)


def mask_text(text: str) -> str:
    """``text`` with the password (or lone user part) of every URL in it, and the values of
    query parameters named like credentials, replaced by ``***``."""
    if "@" in text:
        text = _CREDENTIALS.sub(lambda m: f"{m.group('head')}{MASK}@", text)
        text = _USER_ONLY.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    if "=" in text:
        text = _PARAM.sub(_mask_credential_param, text)
    return text


def mask_url(url: str) -> str:
    """One URL as the hub lists it: its password (if any) and every query value ``***``."""
    url = mask_text(url)
    base, mark, query = url.partition("?")
    if not mark:
        return url
    query, hash_mark, fragment = query.partition("#")
    masked = re.sub(r"=[^&;]+", f"={MASK}", query)
    return f"{base}?{masked}{hash_mark}{fragment}"
