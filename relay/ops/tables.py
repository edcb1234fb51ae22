"""Plain-text tables for the CLI (``relay dlq list``, ``events``, ``status``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from relay.ops.deadletters import Letter


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds))


def dead_letter_table(letters: Sequence[Letter]) -> str:
    if not letters:
        return "no dead letters"
    rows = [("EVENT", "SUBSCRIBER", "ATTEMPTS", "LAST ERROR", "DEAD AT (UTC)", "REASON")]
    for d in letters:
        name = d.letter.subscriber + ("" if d.configured else " (removed)")
        rows.append((d.letter.event_id, name, str(len(d.attempts)), d.last_error,
                     _when(d.letter.dead_at), d.letter.reason))
    return table(rows)


def _short(iso: str | None) -> str:
    return (iso or "-").replace("T", " ").replace("Z", "")


def first_line(text: str | None, width: int) -> str:
    """The first non-blank line of ``text``, stripped and cut to ``width`` characters."""
    line = next((x.strip() for x in (text or "").splitlines() if x.strip()), "")
    return line if len(line) <= width else line[:max(1, width - 1)] + "…"


def timeline(event: dict[str, Any], width: int = 100) -> str:
    """One event's story; under each failed attempt that got an answer, the first line of
    its body, cut to ``width`` (the terminal's)."""
    lines = [f"event {event['eventId']}",
             f"  received  {_short(event['receivedAt'])} UTC" if event["receivedAt"]
             else "  received  (record expired)",
             f"  topic     {event['topic'] or '-'}",
             f"  types     {', '.join(event['eventTypes']) or '-'}",
             f"  orders    {', '.join(event['orderNumbers']) or '-'}"]
    if not event["deliveries"]:
        lines.append("  no subscriber matches it")
    for d in event["deliveries"]:
        extra = ""
        if d["nextAttemptAt"]:
            extra = f", next attempt {_short(d['nextAttemptAt'])}"
        if d["deadReason"]:
            extra = f": {d['deadReason']}"
        removed = "" if d["configured"] else " (no longer configured)"
        lines.append(f"  -> {d['subscriber']}{removed}: {d['state']}{extra}")
        for a in d["attempts"]:
            result = f"HTTP {a['status']}" if a["status"] is not None else (a["error"] or "?")
            trigger = a.get("trigger") or ("probe" if a.get("probe") else "auto")
            tag = "" if trigger == "auto" else f" ({trigger})"
            lines.append(f"       #{a['attempt']} {_short(a['at'])}  {result:<14} "
                         f"{a['latencyMs']:>8.1f} ms{tag}")
            response = a.get("response")
            failed = a["status"] is None or not 200 <= a["status"] < 300
            if failed and response and response.get("body"):
                lines.append("          " + first_line(response["body"], width - 10))
    return "\n".join(lines)


def order_report(order: dict[str, Any]) -> str:
    """An order's events, oldest first, one column per subscriber; then where it waits."""
    events = order["events"]
    names = list(dict.fromkeys(n for e in events for n in e["states"]))
    lines = [f"order {order['orderNumber']}: {len(events)} event(s)"
             + (" (the oldest shown; more exist)" if order.get("more") else "")]
    rows = [("EVENT", "RECEIVED (UTC)", "TYPES", *[n.upper() for n in names])]
    for e in events:
        rows.append((e["eventId"], _short(e["receivedAt"]), ",".join(e["eventTypes"]) or "-",
                     *[e["states"].get(n, "-") for n in names]))
    lines.append(table(rows))
    for o in order.get("ordering") or []:
        since = f" since {_short(o.get('since'))} UTC" if o.get("since") else ""
        lines.append(f"{o['subscriber']}: {o['state']}{since}, head {o.get('headEventId')}, "
                     f"{o.get('waiting', 0)} waiting behind it")
    return "\n".join(lines)


def event_table(events: Sequence[dict[str, Any]]) -> str:
    if not events:
        return "no events"
    rows = [("EVENT", "RECEIVED (UTC)", "TOPIC", "ORDERS", "DELIVERIES")]
    for e in events:
        states = ", ".join(f"{name}={state}" for name, state in e["states"].items()) or "-"
        rows.append((e["eventId"], _short(e["receivedAt"]), e["topic"] or "-",
                     ",".join(e["orderNumbers"]) or "-", states))
    return table(rows)


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:g}{unit}"


def status_report(overview: dict[str, Any], subscribers: Sequence[dict[str, Any]]) -> str:
    lines = [f"hub: {overview['status']}" + (f" ({'; '.join(overview['reasons'])})"
                                             if overview.get("reasons") else "")]
    if "queueMessages" in overview:
        lines.append(f"workers seen in the last minute: {len(overview['workers'])}; queue "
                     f"{overview['queueMessages']}; scheduled {overview['retriesScheduled']}; "
                     f"backlog {overview['backlogOldestSeconds']:g}s; last hour: accepted "
                     f"{overview['acceptedLastHour']}, delivered "
                     f"{overview['deliveredLastHour']}, failed {overview['failedLastHour']}; "
                     f"dead letters {overview['deadLetters']}")
    if not subscribers:
        lines.append("no subscribers configured")
        return "\n".join(lines)
    rows = [("SUBSCRIBER", "STATE", "OK 1H", "FAILED 1H", "SUCCESS", "P50", "P99", "PENDING",
             "OLDEST", "WAITING", "BLOCKED", "DEAD", "LAST ERROR")]
    for s in subscribers:
        rate = "-" if s["successRate"] is None else f"{s['successRate'] * 100:.1f}%"
        ordered = s.get("ordering")
        rows.append((s["name"] + ("" if s["configured"] else " (removed)"), s["state"],
                     str(s["delivered"]), str(s["failed"]), rate,
                     _num(s["latencyP50Ms"], "ms"), _num(s["latencyP99Ms"], "ms"),
                     str(s["pending"]), _num(s["oldestPendingSeconds"], "s"),
                     str(ordered["waiting"]) if ordered else "-",
                     str(ordered["blockedKeys"]) if ordered else "-",
                     str(s["deadLetters"]), (s["lastError"] or "-")[:40]))
    lines.append(table(rows))
    return "\n".join(lines)
