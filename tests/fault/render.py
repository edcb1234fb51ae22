"""Write the "latest run" table of docs/reliability.md from one run's figures.

    RELAY_FAULT_REPORT=/tmp/fault.jsonl .venv/bin/python -m pytest -q tests/fault
    .venv/bin/python -m tests.fault.render /tmp/fault.jsonl --summary "42 passed in 150 s"

Every fault test writes its figures as one JSON line (tests/fault/helpers.py FigureReport);
this replaces what lies between the ``latest-run`` markers of docs/reliability.md with a
table of those lines and the commit they ran on, so the page never mixes runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- latest-run:start -->", "<!-- latest-run:end -->"


def flatten(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        out = []
        for key, inner in value.items():
            out += flatten(inner, f"{prefix}{key}." if isinstance(inner, dict) else
                           f"{prefix}{key}")
        return out
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    return [f"{prefix.rstrip('.')}: {value}"]


def render(entries: list[dict[str, Any]], commit: str, summary: str) -> str:
    lines = [START, "", f"**Latest run**: commit `{commit}`, {summary}. Each row is one test's "
             "figures as it printed them (`FAULT-FIGURES` lines).", "",
             "| test | fault | figures |", "|---|---|---|"]
    for entry in entries:
        figures = {k: v for k, v in entry.items() if k not in ("test", "at", "fault")}
        name = entry["test"].split("::")[-1]
        cells = "<br>".join(item.replace("|", "/") for item in flatten(figures))
        lines.append(f"| `{name}` | {entry.get('fault', '')} | {cells} |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("report", type=Path)
    parser.add_argument("--summary", required=True, help='e.g. "44 passed in 160 s"')
    args = parser.parse_args()
    entries = [json.loads(line) for line in args.report.read_text().splitlines() if line]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.strip()
    text = DOC.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + render(entries, commit, args.summary) + tail)


if __name__ == "__main__":
    main()
