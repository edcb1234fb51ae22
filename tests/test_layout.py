"""The tree shows the architecture: data flows HTTP -> Redis -> worker -> HTTP, and each part
imports only what CONTRIBUTING.md's table allows. Read from the source (every import, also
those inside functions), so a new import across a line fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import ROOT

#: The parts and what each may import besides the shared core (relay's top-level modules),
#: its own modules and libraries. ``relay.ops.cli`` is the composition root: it starts every
#: part, so it may import any of them.
ALLOWED = {
    "relay": set(),                              # the shared core
    "relay.ingress": set(),
    "relay.admin": {"relay.ops.timeline", "relay.ops.deadletters", "relay.ops.status",
                    "relay.ops.ordered"},       # the read models it shares with the CLI
    "relay.ops": set(),
    "relay.ops.cli": {"relay.ingress", "relay.admin", "workers"},
    "workers": set(),
}
PARTS = ("relay.ingress", "relay.admin", "relay.ops", "workers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def part_of(module: str) -> str:
    """The part a module belongs to: the most specific key of ALLOWED it falls under."""
    for part in sorted(ALLOWED, key=len, reverse=True):
        if module == part or module.startswith(part + "."):
            return part
    raise AssertionError(f"{module} is in no part")


def imported(path: Path) -> set[str]:
    """Every relay/workers module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in ("relay", "workers")}


def is_core(module: str) -> bool:
    return module.startswith("relay") and not any(
        module == p or module.startswith(p + ".") for p in PARTS)


def allowed(importer: str, target: str) -> bool:
    part = part_of(importer)
    if is_core(target):
        return True
    own = "relay.ops" if part == "relay.ops.cli" else part
    if part != "relay" and (target == own or target.startswith(own + ".")):
        return True
    return any(target == a or target.startswith(a + ".") for a in ALLOWED[part])


def test_each_part_imports_only_what_its_place_in_the_flow_allows() -> None:
    wrong = [(module_name(path), target)
             for path in sorted([*(ROOT / "relay").rglob("*.py"),
                                 *(ROOT / "workers").rglob("*.py")])
             for target in sorted(imported(path))
             if target not in ("relay", "workers") and not allowed(module_name(path), target)]
    assert wrong == [], "imports across the architecture's lines:\n" + "\n".join(
        f"  {a} imports {b}" for a, b in wrong)


def test_no_module_of_workers_grows_past_one_concept() -> None:
    """About 450 lines at most: past that, split it along its concepts."""
    long = {p.name: n for p in (ROOT / "workers").glob("*.py")
            if (n := len(p.read_text().splitlines())) > 460}
    assert long == {}
