"""How deeply a JSON document nests, found before it is parsed.

msgspec decodes nested arrays and objects recursively and raises ``RecursionError`` past
Python's recursion limit: a body of ``[`` a thousand times deep (no signature needed) was a
500 with a traceback. Every untrusted body (the ingress's webhooks, the admin's request
bodies) is measured first and refused with 400 past ``MAX_DEPTH``; Ingram's envelopes nest
about ten levels.

The measure works on bytes with C-speed operations only (``count``, ``translate``,
``replace``; a regex to drop strings): a 1.7 MB stock update costs ~2 ms. Brackets are
normalised to ``(`` and ``)`` and every ``()`` (an innermost pair) removed, round after
round: each round lowers the deepest point by exactly one and leaves the others' depths as
they were, so after ``r`` rounds what is left nests at most ``depth - r``. Brackets inside
strings count only when the quick measure says "too deep": the strings are then removed and
the body measured again, so a string holding ``[`` never refuses a valid event.
"""

from __future__ import annotations

import re
from array import array
from itertools import accumulate

#: Deepest nesting accepted (arrays and objects, the outermost one counting 1).
MAX_DEPTH = 32
#: Rounds of removing innermost pairs before the rest is summed (most bodies are empty by then).
_ROUNDS = 6

_NORMALISE = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SIGNED = bytes.maketrans(b"()", b"\x01\xff")  # +1 and -1 as signed bytes
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


class TooDeep(ValueError):
    """A JSON body nests deeper than MAX_DEPTH."""

    def __init__(self, limit: int = MAX_DEPTH) -> None:
        super().__init__(f"JSON nested deeper than {limit} levels (the hub's limit)")
        self.limit = limit


def check_depth(body: bytes, limit: int = MAX_DEPTH) -> None:
    """Raise TooDeep if ``body`` (JSON, maybe invalid) nests deeper than ``limit``."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return  # cannot nest deeper than it has brackets
    if _bound(body, limit) > limit and _bound(_STRING.sub(b"", body), limit) > limit:
        raise TooDeep(limit)


def _bound(body: bytes, limit: int) -> int:
    """An upper bound of the nesting depth of the brackets in ``body`` (exact for balanced
    brackets; past ``limit`` it may stop counting)."""
    brackets = body.translate(_NORMALISE, _NOT_BRACKETS)
    rounds = 0
    while rounds < _ROUNDS and brackets:
        inner = brackets.replace(b"()", b"")
        if len(inner) == len(brackets):
            break  # no pair left: only closers, then openers (invalid JSON)
        brackets, rounds = inner, rounds + 1
    if not brackets:
        return rounds
    if b"(" * (limit + 1) in brackets:
        return rounds + limit + 1  # a long run of openers: too deep, no need to sum
    deepest = max(accumulate(array("b", brackets.translate(_SIGNED))))
    return rounds + max(deepest, 0)
