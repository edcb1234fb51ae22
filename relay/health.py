"""Subscriber health as kept in Redis, shared by every worker and read by the admin and CLI.

``health:{sub}`` is a hash (relay/keys.py) written by the workers' outcome scripts
(``workers/ledger.py``) and by pause/resume here:

===============  ===========================================================================
field            meaning
===============  ===========================================================================
state            ``closed`` (or absent), ``open``, ``half`` (a probe is out) or ``disabled``
failures         consecutive failed attempts since the last success
failing_since    ms of the first failure after the last success (for ``disable_after``)
open_until       ms when an open breaker lets one probe through
cool_down        the current cool-down (ms); doubled by every failed probe
probe_until      ms until which the probe in flight is waited for (then another may go)
paused           ``1`` while an operator has paused the subscriber (with ``paused_at``)
last_error       what the last failed attempt got (``HTTP 503``, ``timeout``), with its ms
last_success_at  ms of the last 2xx
===============  ===========================================================================

While a subscriber is paused, disabled or its breaker open, its attempts are *held* in
``held:{sub}`` (nothing posted, nothing counted, nothing dead-lettered) and released into
the schedule, due at once, on resume or when a probe succeeds.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from relay.batching import Script
from relay.keys import Keys

#: What the API, the CLI and the metric call each state.
STATES = ("active", "half-open", "open", "paused", "disabled")

#: A Lua function, prepended to the scripts that release held attempts (resume here, a
#: successful probe in workers/ledger.py): every held attempt is made due at once.
RELEASE_HELD_FN = """
local function release_held(held, schedule, now)
  local members = redis.call('ZRANGE', held, 0, -1)
  for _, member in ipairs(members) do
    redis.call('ZADD', schedule, now, member)
  end
  redis.call('DEL', held)
  return #members
end
"""

# KEYS: health. ARGV: now ms.
PAUSE = Script("""
redis.call('HSET', KEYS[1], 'paused', '1', 'paused_at', ARGV[1])
return 1
""")

# KEYS: health, held, schedule. ARGV: now ms. Returns how many held attempts were released.
# Resume clears a pause and a disable (an operator's resume is the way back from either), then
# releases what was held unless the breaker is still open (its probe releases them then).
RESUME = Script(RELEASE_HELD_FN + """
redis.call('HDEL', KEYS[1], 'paused', 'paused_at')
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'disabled' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
  redis.call('HDEL', KEYS[1], 'failing_since', 'disabled_at', 'open_until', 'probe_until',
             'cool_down')
  state = 'closed'
end
if state == 'open' or state == 'half' then
  return 0
end
return release_held(KEYS[2], KEYS[3], ARGV[1])
""")


def public_state(fields: dict[bytes, bytes] | dict[str, str]) -> str:
    """``active`` | ``half-open`` | ``open`` | ``paused`` | ``disabled`` from ``health:{sub}``."""
    get = _getter(fields)
    if get("paused") == "1":
        return "paused"
    return {"open": "open", "half": "half-open", "disabled": "disabled"}.get(
        get("state") or "closed", "active")


def _getter(fields: dict[Any, Any]) -> Any:
    def get(name: str) -> str | None:
        value = fields.get(name, fields.get(name.encode()))
        return value.decode() if isinstance(value, bytes) else value
    return get


def field_ms(fields: dict[Any, Any], name: str) -> int | None:
    value = _getter(fields)(name)
    return int(float(value)) if value not in (None, "") else None


async def pause(client: aioredis.Redis, keys: Keys, subscriber: str, now_ms: int) -> None:
    await _run(client, PAUSE, [keys.health(subscriber)], [now_ms])


async def resume(client: aioredis.Redis, keys: Keys, subscriber: str, now_ms: int) -> int:
    """Resume (and re-enable) ``subscriber``; how many held attempts were released."""
    return int(await _run(client, RESUME, [keys.health(subscriber), keys.held(subscriber),
                                           keys.schedule], [now_ms]) or 0)


async def _run(client: aioredis.Redis, script: Script, keys: list[str], args: list[Any]) -> Any:
    return await client.eval(script.text, len(keys), *keys, *args)
