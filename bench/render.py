"""Re-render the report from a saved run: ``python -m bench.render [--profile DIR]``.

Reads ``bench/results/latest.json`` (``--stress``: ``latest-stress.json``; or ``--json``),
re-summarises the py-spy stacks kept in ``--profile DIR`` if given (``ingress.raw.txt``,
``worker-fo1.raw.txt``, ``steady-fo1-50-worker.raw.txt``, ...), and writes the JSON back,
``docs/benchmarks.md`` (the section of that run) and the chart, as ``python -m bench.run``
would.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import report
from bench.procs import ROOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__)
    p.add_argument("--stress", action="store_true",
                   help="the run under --stress: latest-stress.json, its own section of the "
                        "page and benchmarks-fanout-stress.png")
    p.add_argument("--json", default=None, help="default bench/results/latest[-stress].json")
    p.add_argument("--md", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--png", default=None, help="default docs/benchmarks-fanout[-stress].png")
    p.add_argument("--profile", default=None, metavar="DIR")
    args = p.parse_args(argv)
    suffix = "-stress" if args.stress else ""
    path = Path(args.json or ROOT / "bench" / "results" / f"latest{suffix}.json")
    png = Path(args.png or ROOT / "docs" / f"benchmarks-fanout{suffix}.png")
    results = json.loads(path.read_text())
    if args.profile:
        from bench.profile import summarise
        from bench.run import (
            INGRESS_DEFAULT_STAGE,
            INGRESS_FOCUS,
            INGRESS_STAGES,
            WORKER_DEFAULT_STAGE,
            WORKER_FOCUS,
            WORKER_STAGES,
        )

        prof = results.setdefault("profile", {})
        for raw in sorted(Path(args.profile).glob("*.raw.txt")):
            role = raw.name.removesuffix(".raw.txt")
            if role == "ingress" or role.endswith("-ingress"):
                prof[role] = summarise(raw, INGRESS_FOCUS, stages=INGRESS_STAGES,
                                       default_stage=INGRESS_DEFAULT_STAGE)
            else:
                prof[role] = summarise(raw, WORKER_FOCUS, stages=WORKER_STAGES,
                                       default_stage=WORKER_DEFAULT_STAGE)
        path.write_text(json.dumps(results, indent=1) + "\n")
    results["targets"] = report.targets(results)
    chart = report.chart(results, png)
    report.write_markdown(results, Path(args.md), chart)
    print(report.table_text(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
