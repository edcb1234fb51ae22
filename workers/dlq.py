"""Dead letters: list them, replay them with fresh attempts."""

from __future__ import annotations

import time

import msgspec
import redis

from relay.config import Config
from relay.keys import Keys
from relay.queue import deliver_message
from workers.ledger import DeadLetter, decode_dead_letter

# Replay in one atomic step: the dead letter disappears exactly when its event record is
# restored and a fresh first attempt is queued, so a crash can neither lose nor double it.
REPLAY = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3], 'NX')
  redis.call('HDEL', KEYS[3], ARGV[4])
  redis.call('DEL', KEYS[4])
  redis.call('LPUSH', KEYS[5], ARGV[5])
  redis.call('ZADD', KEYS[6], ARGV[6], ARGV[5])
  return 1
end
return 0
"""


def _client(config: Config) -> redis.Redis:
    return redis.Redis.from_url(config.redis.url, socket_connect_timeout=3, socket_timeout=10)


def _letters(client: redis.Redis, keys: Keys) -> list[DeadLetter]:
    letters = [decode_dead_letter(v) for _, v in client.hscan_iter(keys.dlq)]
    return sorted(letters, key=lambda d: d.dead_at)


def list_dead_letters(config: Config, subscriber: str | None = None,
                      limit: int = 100) -> list[DeadLetter]:
    keys = Keys(queue=config.worker.queue)
    with _client(config) as client:
        letters = _letters(client, keys)
    if subscriber:
        letters = [d for d in letters if d.subscriber == subscriber]
    return letters[-limit:] if limit else letters


def format_table(letters: list[DeadLetter]) -> str:
    if not letters:
        return "no dead letters"
    rows = [("EVENT", "SUBSCRIBER", "ATTEMPTS", "LAST ERROR", "DEAD AT (UTC)")]
    for d in letters:
        last = d.attempts[-1].describe() if d.attempts else d.reason
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.dead_at))
        rows.append((d.event_id, d.subscriber, str(len(d.attempts)), last, when))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def replay_dead_letters(config: Config, subscriber: str | None = None,
                        event_id: str | None = None) -> int:
    """Queue each matching dead letter as a fresh first attempt; returns how many."""
    keys = Keys(queue=config.worker.queue)
    count = 0
    with _client(config) as client:
        script = client.register_script(REPLAY)
        for letter in _letters(client, keys):
            if subscriber and letter.subscriber != subscriber:
                continue
            if event_id and letter.event_id != event_id:
                continue
            count += int(script(
                keys=[keys.dlq, keys.event(letter.event_id), keys.done(letter.event_id),
                      keys.log(letter.event_id, letter.subscriber), keys.queue,
                      keys.unclaimed],
                args=[Keys.dlq_field(letter.event_id, letter.subscriber),
                      msgspec.msgpack.encode(letter.event), int(config.redis.retention),
                      letter.subscriber,
                      deliver_message(keys.queue, letter.event_id, [letter.subscriber], 1),
                      # queued again unless a worker takes it by then (see relay/keys.py)
                      int((time.time() + config.worker.visibility_timeout) * 1000)]))
    return count
