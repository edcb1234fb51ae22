"""``--stress``: a slower, busier machine of the same kind, made with ``stress-ng``.

``stress-ng --cpu N --cpu-load P`` keeps N workers each busy P % of the time (busy loops and
sleeps in short slices) for the whole run, ceilings included, so every ratio of the run is
taken under the same competing load. It runs in its own session and is stopped at the end of
the run, on error and on Ctrl-C or SIGTERM too; should the bench itself be SIGKILLed, the
kernel sends it SIGTERM (``PR_SET_PDEATHSIG``) and its own ``--timeout`` bounds it anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

INSTALL = "apt-get install -y stress-ng"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the bench's process goes away."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Stress:
    """``stress-ng --cpu cpus --cpu-load load``, started at once; ``stop`` ends it."""

    def __init__(self, cpus: int, load: int, log_dir: Path, timeout_s: int = 7200) -> None:
        exe = shutil.which("stress-ng")
        if exe is None:
            raise SystemExit(f"--stress needs stress-ng, which is not installed: {INSTALL}")
        if not 1 <= load <= 100 or cpus < 1:
            raise SystemExit("--stress-load must be 1-100 and --stress-cpus at least 1")
        self.cpus, self.load = cpus, load
        self.cmd = [exe, "--cpu", str(cpus), "--cpu-load", str(load),
                    "--timeout", f"{timeout_s}s", "--quiet"]
        self.version = "?"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                          timeout=10).stdout.strip()
        self._log = open(log_dir / "stress-ng.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe(self) -> dict[str, Any]:
        return {"command": " ".join(["stress-ng", *self.cmd[1:]]), "cpus": self.cpus,
                "cpu_load_percent": self.load, "version": self.version}

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to its process group (stress-ng ends its workers), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
