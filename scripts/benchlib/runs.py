"""What a workload is and what one cell of the results holds: the sizes of a run, the
command of one timed run and the check of its output, a workload, a cell (one
workload in one mode)."""
from __future__ import annotations

import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from benchlib import TREE

if TYPE_CHECKING:
    from benchlib.run import Bench


@dataclass(frozen=True)
class Sizes:
    files: int = 5000
    dirs: int = 50
    file_size: int = 4096
    big_mib: int = 256
    execs: int = 500
    creates: int = 2000
    create_dirs: int = 20
    rootfs_execs: int = 200


FULL = Sizes()
QUICK = Sizes(files=500, dirs=50, big_mib=32, execs=50, creates=200, create_dirs=10,
              rootfs_execs=50)
SMOKE = Sizes(files=60, dirs=6, big_mib=4, execs=10, creates=30, create_dirs=3,
              rootfs_execs=10)

Check = Callable[[subprocess.CompletedProcess], "str | None"]   # None = ok, else a problem


@dataclass
class Run:
    argv: list[str]
    cwd: Path
    check: Check
    env: dict | None = None                                     # None: benchlib.env()


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    make: Callable[["Bench", Path], Run]           # the command, given the root to use
    amount: float = 0.0                             # for the rate column
    unit: str = ""
    cold: bool = False                              # drop the page cache before the run
    warm: Callable[["Bench"], None] | None = None   # read the backing inputs (untimed)
    reset: Callable[["Bench"], None] | None = None  # remove the outputs (untimed)
    target: str = TREE                              # the backing it runs on


@dataclass
class Cell:
    times: list[float] = field(default_factory=list)
    error: str | None = None
    note: str | None = None
    engine: dict | None = None   # the engine's counters after the last timed run
    cpu: list[float] = field(default_factory=list)   # the daemon's CPU seconds per run

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None


# ---- checks of a run's output
def _last_int(p: subprocess.CompletedProcess) -> int | str:
    """The last number of the output, or the problem."""
    try:
        return int(p.stdout.split()[-1])
    except (ValueError, IndexError):
        return f"unexpected output {p.stdout.strip()[-80:]!r}"


def int_out(expected: int, what: str) -> Check:
    def check(p: subprocess.CompletedProcess) -> str | None:
        got = _last_int(p)
        if isinstance(got, str):
            return got
        return None if got == expected else f"{what}: {got}, expected {expected}"
    return check


def at_least(minimum: int, what: str) -> Check:
    def check(p: subprocess.CompletedProcess) -> str | None:
        got = _last_int(p)
        if isinstance(got, str):
            return got
        return None if got >= minimum else f"{what}: {got}, expected at least {minimum}"
    return check


def same_count(b: "Bench", key: str, minimum: int, what: str) -> Check:
    """The last number of the output, at least ``minimum`` and the same in every run
    and mode (the first run's value is the reference)."""
    def check(p: subprocess.CompletedProcess) -> str | None:
        problem = at_least(minimum, what)(p)
        if problem:
            return problem
        got = int(p.stdout.split()[-1])
        ref = b.refs.setdefault(key, got)
        return None if got == ref else f"{what}: {got}, {ref} in the first run"
    return check


def lines_starting(prefix: str, expected: int, what: str) -> Check:
    """As many lines of the output as expected begin with prefix (ls -l: "-" for a
    regular file)."""
    def check(p: subprocess.CompletedProcess) -> str | None:
        got = sum(1 for line in p.stdout.splitlines() if line.startswith(prefix))
        return None if got == expected else f"{what}: {got}, expected {expected}"
    return check


def dd_bytes(expected: int) -> Check:
    def check(p: subprocess.CompletedProcess) -> str | None:
        m = re.search(r"^(\d+) bytes", p.stderr, re.M)
        if not m:
            return f"no byte count in dd's output {p.stderr.strip()[-80:]!r}"
        got = int(m.group(1))
        return None if got == expected else f"read {got} bytes, expected {expected}"
    return check


def contains(*needles: str) -> Check:
    def check(p: subprocess.CompletedProcess) -> str | None:
        missing = [n for n in needles if n not in p.stdout]
        return f"output lacks {missing[0]!r}: {p.stdout.strip()[-80:]!r}" if missing else None
    return check


def starts(prefix: str) -> Check:
    def check(p: subprocess.CompletedProcess) -> str | None:
        return None if p.stdout.startswith(prefix) else \
            f"output does not start with {prefix!r}: {p.stdout.strip()[:80]!r}"
    return check


def ok(p: subprocess.CompletedProcess) -> str | None:
    return None
