"""Sampling profiles with py-spy (a bench extra): record, summarise, draw a flame graph.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``). From them
this module computes where the samples go: self time by package and by function, and the
share of samples under a few functions of the hub (inclusive time). ``flame_svg`` draws the
stacks as a small self-contained SVG flame graph (frames under 0.2 % are left out).
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


class Recording:
    """``py-spy record`` on ``pid`` (and its children) for ``seconds``; ``wait`` for the file."""

    def __init__(self, pid: int, out: Path, seconds: float, subprocesses: bool = False,
                 rate: int = 200) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy, or .[bench])")
        self.out = out
        cmd = [exe, "record", "--pid", str(pid), "--format", "raw", "--output", str(out),
               "--duration", str(max(1, round(seconds))), "--rate", str(rate), "--nonblocking",
               "--full-filenames"]
        if subprocesses:
            cmd.append("--subprocesses")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self, timeout: float = 60) -> Path:
        _, err = self.proc.communicate(timeout=timeout)
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}")
        return self.out


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def read_stacks(raw: Path) -> list[tuple[list[tuple[str, str]], int]]:
    """[(frames root-first as (function, file), samples)] from py-spy's raw output.

    With ``--subprocesses`` each stack starts with one ``process PID:"cmd"`` frame per level
    of the process tree; they become a single ``[main process]`` or ``[child process]`` frame.
    """
    stacks = []
    for line in raw.read_text(errors="replace").splitlines():
        head, _, count = line.rpartition(" ")
        if not head or not count.isdigit():
            continue
        frames = []
        levels = 0
        for part in head.split(";"):
            if part.startswith("process ") and not frames:
                levels += 1
                continue
            m = _FRAME.match(part)
            if m is None:
                continue
            frames.append((m.group("func"), m.group("file")))
        if levels:
            frames.insert(0, ("[main process]" if levels == 1 else "[child process]", ""))
        if frames:
            stacks.append((frames, int(count)))
    return stacks


def where(frames: list[tuple[str, str]]) -> str:
    """Which process and thread a stack was sampled in, from its root frames."""
    proc = frames[0][0] + " " if frames[0][0].startswith("[") else ""
    names = [f for f, _ in frames]
    if "Scheduler.run" in names:
        thread = "scheduler thread"
    elif "Thread.run" in names and ("BaseEventLoop.run_forever" in names
                                    or _on_uvloop(frames, names.index("Thread.run"))):
        thread = "asyncio delivery thread"
    elif "Thread.run" in names or "Thread._bootstrap" in names:
        thread = "other thread"
    else:
        thread = "main thread"
    return proc + thread


def _on_uvloop(frames: list[tuple[str, str]], run: int) -> bool:
    """A thread running a uvloop loop: its loop is C, so its stacks go from ``Thread.run``
    straight to the callbacks (or stop there: time in the loop itself)."""
    if run + 1 == len(frames):
        return True
    func, path = frames[run + 1]
    return func not in ("Heartbeat.run", "Timer.run") and any(
        part in path for part in ("workers/", "relay/", "aiohttp/", "asyncio/", "redis/"))


def package_of(path: str) -> str:
    """A short name for where a frame's code lives: a package, a repo module, or stdlib."""
    norm = path.replace("\\", "/")
    if "site-packages/" in norm:
        rest = norm.split("site-packages/", 1)[1]
        return rest.split("/", 1)[0].removesuffix(".py")
    for top in ("relay/", "workers/", "bench/"):
        idx = norm.rfind("/" + top)
        if idx >= 0 or norm.startswith(top):
            rest = norm[idx + 1:] if idx >= 0 else norm
            return rest.removesuffix(".py").replace("/", ".")
    m = re.search(r"/lib/python3\.\d+/(.+)$", norm)
    if m:
        mod = m.group(1).split("/", 1)[0].removesuffix(".py")
        return f"stdlib {mod}"
    return norm.rsplit("/", 1)[-1]


def short_file(path: str) -> str:
    norm = path.replace("\\", "/")
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in norm:
            return norm.split(marker, 1)[1]
    for top in ("/relay/", "/workers/", "/bench/"):
        if top in norm:
            return top[1:] + norm.split(top, 1)[1]
    return norm


#: Leaf frames that are a thread waiting, not working: py-spy counts a thread blocked in
#: these as active, so they are set apart as "waiting" and left out of the shares.
#: (``EpollSelector.select`` also covers zero-timeout polls, which are work; a small part.)
WAITING = {
    "EpollSelector.select (selectors.py)", "_epoll.poll (kombu/utils/eventio.py)",
    "Condition.wait (threading.py)", "Connection._recv (billiard/connection.py)",
    "Event.wait (threading.py)", "sleep (asyncio/tasks.py)",
}


Stages = list[tuple[str, list[str]]]


#: Frames that dispatch work (an event loop running a callback, Celery's consumer loop, a
#: pool process's loop): what is above them is the same for every sample and is not matched.
DISPATCH = ("Handle._run ", "Hub.create_loop ", "Worker.workloop ")


def stage_of(names: list[str], stages: Stages, default: str) -> str:
    """The first stage (in the order given) with a marker in the frames below the dispatch."""
    cut = 0
    for i, name in enumerate(names):
        if name.startswith(DISPATCH):
            cut = i + 1
    below = names[cut:]
    for label, markers in stages:
        if any(m in name for name in below for m in markers):
            return label
    return default


def summarise(raw: Path, focus: list[str], top: int = 15, stages: Stages | None = None,
              default_stage: str = "other") -> dict[str, Any]:
    """Self time by package and by function; inclusive time of the ``focus`` functions.

    Shares are of the *busy* samples (stacks not ending in a ``WAITING`` frame).
    ``focus`` entries are substrings matched against ``function (file)``.
    """
    every = read_stacks(raw)
    stacks = [(f, n) for f, n in every
              if f"{f[-1][0]} ({short_file(f[-1][1])})" not in WAITING]
    waiting = sum(n for _, n in every) - sum(n for _, n in stacks)
    total = sum(n for _, n in stacks) or 1
    by_pkg: Counter[str] = Counter()
    by_func: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_where: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    for frames, n in stacks:
        by_where[where(frames)] += n
        if stages:
            labels = [f"{f} ({short_file(p)})" for f, p in frames]
            by_stage[stage_of(labels, stages, default_stage)] += n
        func, file = frames[-1]
        by_pkg[package_of(file)] += n
        by_func[f"{func} ({short_file(file)})"] += n
        names = {f"{f} ({short_file(p)})" for f, p in frames}
        for key in focus:
            if any(key in name for name in names):
                inclusive[key] += n

    def pct(counter: Counter[str], limit: int) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in counter.most_common(limit)]

    return {"samples": total, "waiting_samples": waiting,
            "by_thread": pct(by_where, 10),
            "by_stage": pct(by_stage, 20),
            "self_by_package": pct(by_pkg, top),
            "self_by_function": pct(by_func, top),
            "inclusive": [[k, round(100 * inclusive[k] / total, 1)] for k in focus]}


# -- flame graph -------------------------------------------------------------------------------


class _Node:
    __slots__ = ("name", "count", "children")

    def __init__(self, name: str) -> None:
        self.name = name
        self.count = 0
        self.children: dict[str, _Node] = {}


def flame_svg(raw: Path, out: Path, title: str, min_share: float = 0.002) -> Path:
    root = _Node("all")
    for frames, n in read_stacks(raw):
        node = root
        node.count += n
        for func, file in frames:
            name = f"{func} ({short_file(file)})" if file else func
            node = node.children.setdefault(name, _Node(name))
            node.count += n
    width, row = 1200.0, 16
    total = root.count or 1
    rects: list[tuple[int, str]] = []
    depth_max = 0

    def palette(name: str) -> str:
        h = sum(map(ord, name)) % 60
        return f"rgb({205 + h // 3},{80 + h * 2},{40 + h // 2})"

    def walk(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        w = width * node.count / total
        if node.count / total < min_share:
            return
        depth_max = max(depth_max, depth)
        label = html.escape(node.name)
        share = 100 * node.count / total
        text = ""
        chars = int(w / 7)
        if chars >= 4:
            shown = node.name if len(node.name) <= chars else node.name[:chars - 2] + ".."
            text = (f'<text x="{x + 3:.1f}" y="{{y}}" font-size="11" '
                    f'font-family="monospace">{html.escape(shown)}</text>')
        rects.append((depth, f'<g><title>{label} ({node.count} samples, {share:.1f}%)</title>'
                      f'<rect x="{x:.1f}" y="{{y0}}" width="{max(w - 0.5, 0.1):.1f}" '
                      f'height="{row - 1}" fill="{palette(node.name)}"/>{text}</g>'))
        cx = x
        for child in sorted(node.children.values(), key=lambda c: -c.count):
            walk(child, cx, depth + 1)
            cx += width * child.count / total

    walk(root, 0.0, 0)
    height = (depth_max + 1) * row + 40
    body = []
    for depth, snippet in rects:
        y0 = height - (depth + 1) * row - 10
        body.append(snippet.replace("{y0}", str(y0)).replace("{y}", str(y0 + 12)))
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{int(width)}" height="{height}" '
           f'viewBox="0 0 {int(width)} {height}"><rect width="100%" height="100%" fill="#fff"/>'
           f'<text x="4" y="16" font-size="14" font-family="sans-serif">'
           f'{html.escape(title)} ({total} samples; hover for names)</text>'
           + "".join(body) + "</svg>\n")
    out.write_text(svg)
    return out
