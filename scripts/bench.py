#!/usr/bin/env python3
"""imafs benchmark: the same workloads on the native backing directory and through
imafs mounts in several modes, in one run; prints times and ratios, writes a markdown
table (and a PNG plot, and optionally JSON).

    .venv/bin/python scripts/bench.py                     # full run, all modes
    .venv/bin/python scripts/bench.py --quick --reps 1    # smoke test sizes
    .venv/bin/python scripts/bench.py --only a,b --modes native,overlay

Run as root (it mounts FUSE filesystems and drops the page cache for the cold runs).

Workloads
  a        cat of every file of a tree of 5,000 files of 4 KiB in 50 directories
           (``xargs -0 cat < LIST | wc -c``: a few ``cat`` processes open and read all)
  b-cold   sequential read of a 256 MiB file (``dd bs=1M``) after dropping the page cache
  b-warm   the same with the backing file in the page cache
  c        500 execs of a static busybox copied into the tree, by its path in the tree
  d        ``tar cf - tree | wc -c`` of the small-file tree (GNU tar skips reading when
           the archive is /dev/null, hence the pipe)
  e        creating and writing 2,000 files of 4 KiB (20 directories, one process)

Method
  * Every timed run of a FUSE mode starts on a fresh mount (the mount is not timed): no
    dentries, attributes or pages of the mount are cached in the kernel or the daemon,
    so every lookup, open and read of the run reaches the daemon. The backing files are
    in the page cache (read natively before each run) except for b-cold, where the cache
    is dropped after mounting. That is "a container's first run after mount", the case
    the overlay's costs show in; a second run on the same mount is mostly served by the
    kernel's caches (keep_cache) and is not measured here.
  * Integrity modes: state "cold" means a fresh --state directory for every mount;
    "warm" means one --state directory per workload, primed by an untimed run, then
    remounted for every timed run (digests cached in LMDB, daemon memory empty).
  * The time is the median of --reps runs of the whole subprocess (start-up included,
    the same in every mode). Each run's output is checked (byte and file counts).

Adding a mode is one entry in MODES: a name, extra ``imafs mount`` arguments, an
optional setup (write a policy, sign the tree; it returns more mount arguments), the
state flag, and an optional wrapper the workload's command runs under (a namespace).
A mode that cannot mount (an engine feature not there yet) is reported as
"n/a (reason)" and the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
IMAFS = [sys.executable, "-m", "imafs"]
DROP_CACHES = "/proc/sys/vm/drop_caches"
RUN_DIR = "/run/imafs"          # where imafs daemons record their pids

MEASURE_ALL_POLICY = "measure func=FILE_CHECK mask=MAY_READ\nmeasure func=BPRM_CHECK\n"


# --------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    """One column of the results.

    name      short name (``--modes``, JSON keys, table columns)
    title     one line for the legend
    native    run on the backing directory itself (no mount)
    args      extra ``imafs mount`` arguments
    setup     called once before the mode's first mount with the Bench; may write
              files (a policy, keys) or change the backing tree (signatures); returns
              more mount arguments. An exception makes the mode "n/a (reason)".
    state     "cold": a fresh --state directory for every mount; "warm": one per
              workload, primed by an untimed run, then remounted for the timed runs
    wrap      returns an argv prefix the workload's command runs under, given the Bench
              and the mount root (e.g. a shell that enters a child namespace first)
    integrity the mode expects the engine: its control directory is checked after
              mounting and a note is added when it is missing
    """
    name: str
    title: str
    native: bool = False
    args: tuple[str, ...] = ()
    setup: Callable[["Bench"], list[str]] | None = None
    state: str = "cold"
    wrap: Callable[["Bench", Path], list[str]] | None = None
    integrity: bool = False


def policy_file(text: str, name: str) -> Callable[["Bench"], list[str]]:
    """A mode setup that writes ``text`` as a policy file and mounts with it."""
    def setup(bench: "Bench") -> list[str]:
        p = bench.work / f"policy-{name}"
        p.write_text(text)
        return ["--policy", str(p)]
    return setup


APPRAISE_SIG_POLICY = ("appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig\n"
                       "appraise func=BPRM_CHECK appraise_type=imasig\n")


def sign_tree_and_policy(text: str, name: str) -> Callable[["Bench"], list[str]]:
    """A mode setup: an ``imafs keygen`` key (once per run), every file of the tree and
    the big file signed (``imafs sign -r``, signature v2 over sha256), the policy, and
    the certificate as ``--key``."""
    def setup(bench: "Bench") -> list[str]:
        key = bench.work / "signing-key"
        cmds = [["sign", "-q", "-r", "--key", str(key / "signing_key.pem"), "--cert",
                 str(key / "signing_cert.der"), str(bench.backing / "tree"),
                 str(bench.backing / "big")]]
        if not (key / "signing_cert.der").exists():
            cmds.insert(0, ["keygen", "--out", str(key)])
        for c in cmds:
            p = subprocess.run(IMAFS + c, capture_output=True, text=True, cwd=REPO, env=_env())
            if p.returncode:
                raise RuntimeError(f"imafs {c[0]}: {(p.stderr or p.stdout).strip()[-200:]}")
        return policy_file(text, name)(bench) + ["--key", str(key / "signing_cert.der")]
    return setup


def in_namespace(ns: str) -> Callable[["Bench", Path], list[str]]:
    """A mode wrapper: create child namespace ``ns`` (through the control directory),
    then run the workload in it. For a later "namespace" mode."""
    def wrap(bench: "Bench", root: Path) -> list[str]:
        ctl = root / bench.control_name / "ns-create"
        return ["sh", "-c", 'printf "%s" "$0" > "$1" && shift && exec "$@"', ns, str(ctl)]
    return wrap


MODES: list[Mode] = [
    Mode("native", "the backing directory, no FUSE", native=True),
    Mode("overlay", "imafs mount --no-integrity (passthrough)", args=("--no-integrity",)),
    Mode("integrity", "imafs mount: engine on, empty policy", integrity=True),
    Mode("measure", "measure all reads and execs, fresh state (cold)",
         setup=policy_file(MEASURE_ALL_POLICY, "measure"), integrity=True),
    Mode("measure-warm", "measure all reads and execs, remount with cached digests",
         setup=policy_file(MEASURE_ALL_POLICY, "measure"), state="warm", integrity=True),
    Mode("appraise", "appraise signatures (cold): every read and exec needs a valid "
         "signature (appraise_type=imasig; tree signed by imafs sign -r), fresh state",
         setup=sign_tree_and_policy(APPRAISE_SIG_POLICY, "appraise"), integrity=True),
    Mode("appraise-warm", "appraise signatures (warm): as appraise, remount with cached "
         "digests", setup=sign_tree_and_policy(APPRAISE_SIG_POLICY, "appraise"),
         state="warm", integrity=True),
    Mode("verified", "measure all, every read checked against the Merkle tree "
         "(--verify-reads=on), fresh state (cold)", args=("--verify-reads=on",),
         setup=policy_file(MEASURE_ALL_POLICY, "verified"), integrity=True),
    Mode("verified-warm", "measure all, reads verified, remount with cached digests "
         "and trees", args=("--verify-reads=on",),
         setup=policy_file(MEASURE_ALL_POLICY, "verified"), state="warm", integrity=True),
    Mode("namespace", "as measure, run in a child namespace (chain of two, empty child policy)",
         setup=policy_file(MEASURE_ALL_POLICY, "ns"), wrap=in_namespace("bench"),
         integrity=True),
]
MODE_BY_NAME = {m.name: m for m in MODES}
NATIVE, OVERLAY = "native", "overlay"


# --------------------------------------------------------------------------- sizes
@dataclass(frozen=True)
class Sizes:
    files: int = 5000
    dirs: int = 50
    file_size: int = 4096
    big_mib: int = 256
    execs: int = 500
    creates: int = 2000
    create_dirs: int = 20


FULL = Sizes()
QUICK = Sizes(files=500, dirs=50, big_mib=32, execs=50, creates=200, create_dirs=10)


# --------------------------------------------------------------------------- mounting
def is_mounted(path) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def force_unmount(mnt: str) -> None:
    """Unmount whatever is at mnt, even when the daemon hangs or died (as
    tests/conftest.py does)."""
    for cmd in (["fusermount3", "-u", mnt], ["umount", mnt], ["umount", "-l", mnt]):
        if not is_mounted(mnt):
            return
        subprocess.run(cmd, capture_output=True)
    if is_mounted(mnt):
        # a wedged daemon: abort its FUSE connection, then detach
        try:
            dev = os.stat(mnt).st_dev
        except OSError:
            dev = None
        if dev is not None:
            ctl = "/sys/fs/fuse/connections"
            if not os.path.exists(os.path.join(ctl, str(os.minor(dev)))):
                subprocess.run(["mount", "-t", "fusectl", "none", ctl], capture_output=True)
            with contextlib.suppress(OSError):
                Path(ctl, str(os.minor(dev)), "abort").write_text("1")
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def _daemon_pid(state: Path) -> int | None:
    try:
        return int((state / "daemon.lock").read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive (the daemon's parent, our mount command, is gone: init reaps)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class MountFailed(Exception):
    pass


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def _env() -> dict:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    # the mount command imports imafs from this checkout even without an install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


class ImafsMount:
    """One imafs mount of ``backing`` at ``mnt``; always unmounted by stop()."""

    def __init__(self, backing: Path, mnt: Path, state: Path, log: Path, args: list[str]):
        self.backing, self.mnt, self.state, self.log, self.args = backing, mnt, state, log, args
        self.pid: int | None = None

    def start(self) -> None:
        cmd = IMAFS + ["mount", str(self.backing), str(self.mnt), "--state", str(self.state),
                       "--log-file", str(self.log)] + self.args
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO,
                               env=_env(), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            self.pid = _daemon_pid(self.state)
            self.stop()
            raise MountFailed("imafs mount timed out after 60 s")
        self.pid = _daemon_pid(self.state)
        if p.returncode != 0 or not is_mounted(self.mnt):
            self.stop()
            why = (p.stderr or p.stdout).strip().splitlines()
            reason = why[-1] if why else f"exit status {p.returncode}"
            raise MountFailed(reason.removeprefix("imafs mount: ").strip())

    def stop(self) -> None:
        try:
            if is_mounted(self.mnt):
                subprocess.run(IMAFS + ["umount", str(self.mnt)], capture_output=True,
                               timeout=60, cwd=REPO, env=_env())
        except subprocess.TimeoutExpired:
            pass
        finally:
            force_unmount(str(self.mnt))
        self._reap()

    def _reap(self) -> None:
        """Wait for the daemon (it holds the state lock a warm remount needs); a
        daemon this run started that outlives its mount is ended by its pid."""
        pid = self.pid
        if not pid:
            return
        for sig, wait in ((None, 10.0), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if sig is not None and _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.02)
            if not _alive(pid):
                break
        self.pid = None


# --------------------------------------------------------------------------- workloads
@dataclass
class Run:
    argv: list[str]
    cwd: Path
    check: Callable[[subprocess.CompletedProcess], str | None]   # None = ok, else a problem


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


def _int_out(expected: int, what: str):
    def check(p: subprocess.CompletedProcess) -> str | None:
        try:
            got = int(p.stdout.split()[-1])
        except (ValueError, IndexError):
            return f"unexpected output {p.stdout.strip()[-80:]!r}"
        if got != expected:
            return f"{what}: {got}, expected {expected}"
        return None
    return check


def _at_least(minimum: int, what: str):
    def check(p: subprocess.CompletedProcess) -> str | None:
        try:
            got = int(p.stdout.split()[-1])
        except (ValueError, IndexError):
            return f"unexpected output {p.stdout.strip()[-80:]!r}"
        return None if got >= minimum else f"{what}: {got}, expected at least {minimum}"
    return check


def _dd_check(expected: int):
    def check(p: subprocess.CompletedProcess) -> str | None:
        m = re.search(r"^(\d+) bytes", p.stderr, re.M)
        if not m:
            return f"unexpected dd output {p.stderr.strip()[-80:]!r}"
        got = int(m.group(1))
        return None if got == expected else f"read {got} bytes, expected {expected}"
    return check


def _w_cat(b: "Bench", root: Path) -> Run:
    return Run(["bash", "-c", 'set -o pipefail; xargs -0 cat < "$1" | wc -c', "cat-all",
                str(b.file_list)], root / "tree",
               _int_out(b.sizes.files * b.sizes.file_size, "bytes read"))


def _w_seq(b: "Bench", root: Path) -> Run:
    return Run(["dd", f"if={root / 'big' / 'file'}", "of=/dev/null", "bs=1M"], root,
               _dd_check(b.sizes.big_mib << 20))


def _w_exec(b: "Bench", root: Path) -> Run:
    script = 'set -e; i=0; while [ "$i" -lt "$2" ]; do "$1" true; i=$((i+1)); done; echo "$i"'
    return Run(["sh", "-c", script, "execs", str(root / "tree" / "bin" / "busybox"),
                str(b.sizes.execs)], root, _int_out(b.sizes.execs, "execs"))


def _w_tar(b: "Bench", root: Path) -> Run:
    return Run(["bash", "-c", "set -o pipefail; tar cf - tree | wc -c"], root,
               _at_least(b.sizes.files * b.sizes.file_size, "tar bytes"))


CREATE_CODE = r"""
import os, sys
out, n, ndirs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(int(sys.argv[4]))
os.mkdir(out)
dirs = [os.path.join(out, "d%02d" % i) for i in range(ndirs)]
for d in dirs:
    os.mkdir(d)
for i in range(n):
    with open(os.path.join(dirs[i % ndirs], "f%05d" % i), "wb") as f:
        f.write(data)
print(n)
"""


def _w_create(b: "Bench", root: Path) -> Run:
    return Run([sys.executable, "-S", "-c", CREATE_CODE, str(root / "out"),
                str(b.sizes.creates), str(b.sizes.create_dirs), str(b.sizes.file_size)],
               root, _int_out(b.sizes.creates, "files written"))


def _warm_tree(b: "Bench") -> None:
    b.read_backing(b.backing / "tree")


def _warm_big(b: "Bench") -> None:
    b.read_backing(b.backing / "big")


def _reset_out(b: "Bench") -> None:
    out = b.backing / "out"
    if out.exists():
        shutil.rmtree(out)
    os.sync()


def workloads(s: Sizes) -> list[Workload]:
    kib = s.file_size // 1024
    return [
        Workload("a", f"cat {s.files:,} files of {kib} KiB in {s.dirs} directories", _w_cat,
                 s.files, "files/s", warm=_warm_tree),
        Workload("b-cold", f"sequential read of a {s.big_mib} MiB file, page cache dropped",
                 _w_seq, s.big_mib, "MiB/s", cold=True),
        Workload("b-warm", f"sequential read of a {s.big_mib} MiB file, backing file cached",
                 _w_seq, s.big_mib, "MiB/s", warm=_warm_big),
        Workload("c", f"{s.execs:,} execs of a static busybox in the tree", _w_exec,
                 s.execs, "execs/s", warm=_warm_tree),
        Workload("d", f"tar cf - of the tree ({s.files:,} files) | wc -c", _w_tar,
                 s.files, "files/s", warm=_warm_tree),
        Workload("e", f"create and write {s.creates:,} files of {kib} KiB", _w_create,
                 s.creates, "files/s", reset=_reset_out),
    ]


def select_workloads(all_w: list[Workload], only: str | None) -> list[Workload]:
    if not only:
        return all_w
    keys = [k.strip() for k in only.split(",") if k.strip()]
    chosen = []
    for k in keys:
        hit = [w for w in all_w if w.key == k or w.key.split("-")[0] == k]
        if not hit:
            raise SystemExit(f"bench: unknown workload {k!r} "
                             f"(one of {', '.join(w.key for w in all_w)}, or b for both b-*)")
        chosen += [w for w in hit if w not in chosen]
    return [w for w in all_w if w in chosen]


# --------------------------------------------------------------------------- the run
@dataclass
class Cell:
    times: list[float] = field(default_factory=list)
    error: str | None = None
    note: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None


class Bench:
    def __init__(self, args, sizes: Sizes, modes: list[Mode], wls: list[Workload], work: Path):
        self.args, self.sizes, self.modes, self.workloads = args, sizes, modes, wls
        self.work = work
        self.backing = work / "backing"
        self.mnt = work / "mnt"
        self.file_list = work / "files.list"
        self.control_name = ".imafs"
        self.results: dict[str, dict[str, Cell]] = {w.key: {} for w in wls}
        self._states = 0
        self.mount: ImafsMount | None = None

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # ---- the tree
    def build_tree(self) -> None:
        s = self.sizes
        t0 = time.monotonic()
        tree = self.backing / "tree"
        rels = []
        for d in range(s.dirs):
            (tree / f"d{d:02d}").mkdir(parents=True)
        for i in range(s.files):
            rel = f"d{i % s.dirs:02d}/f{i:05d}"
            (tree / rel).write_bytes(os.urandom(s.file_size))
            rels.append(rel)
        self.file_list.write_bytes(b"\0".join(r.encode() for r in rels) + b"\0")
        (tree / "bin").mkdir()
        shutil.copy2(self.busybox(), tree / "bin" / "busybox")
        (self.backing / "big").mkdir()
        with open(self.backing / "big" / "file", "wb") as f:
            for _ in range(s.big_mib):
                f.write(os.urandom(1 << 20))
        self.mnt.mkdir()
        os.sync()
        self.log(f"bench: tree ready in {time.monotonic() - t0:.1f} s ({self.backing})")

    @staticmethod
    def busybox() -> str:
        for p in ("/bin/busybox", "/usr/bin/busybox"):
            if os.path.exists(p):
                out = subprocess.run(["file", "-L", p], capture_output=True, text=True).stdout \
                    if shutil.which("file") else "statically linked"
                if "statically linked" in out or "static-pie" in out:
                    return p
        raise SystemExit("bench: needs a static busybox (apt-get install busybox-static)")

    @staticmethod
    def read_backing(path: Path) -> None:
        for dirpath, _, names in os.walk(path):
            for n in names:
                with open(os.path.join(dirpath, n), "rb", buffering=0) as f:
                    while f.read(1 << 20):
                        pass

    # ---- mounts
    def new_state(self, mode: Mode) -> Path:
        self._states += 1
        st = self.work / f"state-{mode.name}-{self._states}"
        return st

    @contextlib.contextmanager
    def mounted(self, mode: Mode, extra: list[str], state: Path | None):
        """Yields the root to run in: the backing directory or a fresh mount."""
        if mode.native:
            yield self.backing
            return
        assert state is not None
        m = ImafsMount(self.backing, self.mnt, state, self.work / f"imafs-{mode.name}.log",
                       list(mode.args) + extra)
        self.mount = m
        try:
            m.start()
            yield self.mnt
        finally:
            m.stop()
            self.mount = None

    # ---- one timed run
    def run_once(self, mode: Mode, w: Workload, root: Path) -> float:
        r = w.make(self, root)
        argv = (mode.wrap(self, root) if mode.wrap else []) + r.argv
        if w.cold:
            os.sync()
            with open(DROP_CACHES, "w") as f:
                f.write("3\n")
        else:
            os.sync()
        t0 = time.perf_counter()
        p = subprocess.run(argv, cwd=r.cwd, capture_output=True, text=True, env=_env(),
                           stdin=subprocess.DEVNULL, timeout=self.args.timeout)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            err = (p.stderr or p.stdout).strip().splitlines()
            raise RuntimeError(f"exit status {p.returncode}" + (f": {err[0]}" if err else ""))
        problem = r.check(p)
        if problem:
            raise RuntimeError(problem)
        return dt

    def prepare(self, w: Workload) -> None:
        if w.reset:
            w.reset(self)
        if w.warm:
            w.warm(self)

    def run_mode(self, mode: Mode) -> None:
        self.log(f"bench: mode {mode.name}: {mode.title}")
        extra: list[str] = []
        if mode.setup:
            try:
                extra = mode.setup(self)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.mode_na(mode, f"setup failed: {e}")
                return
        if any(w.cold for w in self.workloads) and not os.access(DROP_CACHES, os.W_OK):
            for w in self.workloads:
                if w.cold:
                    self.results[w.key][mode.name] = Cell(error=f"cannot write {DROP_CACHES} (not root)")
        for w in self.workloads:
            cell = self.results[w.key].setdefault(mode.name, Cell())
            if cell.error:
                continue
            warm_state = self.new_state(mode) if mode.state == "warm" else None
            try:
                if warm_state is not None:   # prime the digest cache (untimed)
                    self.prepare(w)
                    with self.mounted(mode, extra, warm_state) as root:
                        self.run_once(mode, w, root)
                for rep in range(self.args.reps):
                    self.prepare(w)
                    state = warm_state or (None if mode.native else self.new_state(mode))
                    with self.mounted(mode, extra, state) as root:
                        if mode.integrity and not (root / self.control_name).is_dir():
                            cell.note = "no control directory: engine not active in this build"
                        cell.times.append(self.run_once(mode, w, root))
                    if state is not None and state is not warm_state:
                        shutil.rmtree(state, ignore_errors=True)
            except MountFailed as e:
                self.mode_na(mode, f"mount failed: {e}")
                return
            except subprocess.TimeoutExpired:
                cell.error = f"timed out after {self.args.timeout:g} s"
            except Exception as e:  # noqa: BLE001 - one cell n/a, the run goes on
                cell.error = str(e) or type(e).__name__
            finally:
                if warm_state is not None:
                    shutil.rmtree(warm_state, ignore_errors=True)
            med = cell.median
            self.log(f"bench:   {w.key:7s} {mode.name:13s} "
                     + (f"{med:8.3f} s  (runs: {', '.join(f'{t:.3f}' for t in cell.times)})"
                        if med is not None else f"n/a ({cell.error})"))
        if self.workloads:
            _reset_out(self)

    def mode_na(self, mode: Mode, reason: str) -> None:
        self.log(f"bench:   {mode.name}: n/a ({reason})")
        for w in self.workloads:
            c = self.results[w.key].get(mode.name)
            if c is None or c.median is None:
                self.results[w.key][mode.name] = Cell(error=reason)

    def run(self) -> None:
        self.build_tree()
        for mode in self.modes:
            self.run_mode(mode)

    def cleanup(self) -> None:
        if self.mount is not None:
            self.mount.stop()
        force_unmount(str(self.mnt))


# --------------------------------------------------------------------------- reporting
def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}x"


def cell_summary(res: dict[str, dict[str, Cell]], wkey: str, mname: str) -> dict:
    c = res[wkey].get(mname, Cell(error="not run"))
    nat = res[wkey].get(NATIVE)
    ovl = res[wkey].get(OVERLAY)
    med = c.median
    return {
        "times": c.times, "median": med, "error": c.error, "note": c.note,
        "ratio_native": ratio(med, nat.median if nat else None),
        "ratio_overlay": ratio(med, ovl.median if ovl else None),
    }


def machine_info(work: Path, load_start: float) -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024} MiB"
                break
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                            text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    try:
        import pyfuse3
        pyfuse3_v = getattr(pyfuse3, "__version__", "?")
    except Exception:  # noqa: BLE001
        pyfuse3_v = "?"
    wt = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "imafs"],
                        capture_output=True, text=True).stdout.splitlines()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu, "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyfuse3": pyfuse3_v,
        "workdir_fs": fstype,
        "imafs_commit": commit,
        "imafs_worktree": f"{len(wt)} changed or new files under imafs/" if wt else "clean",
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
    }


def print_tables(bench: Bench) -> None:
    res = bench.results
    for w in bench.workloads:
        print(f"\n[{w.key}] {w.title}")
        print(f"  {'mode':14s} {'median s':>9s} {'rate':>14s} {'/native':>8s} {'/overlay':>9s}")
        for m in bench.modes:
            s = cell_summary(res, w.key, m.name)
            if s["median"] is None:
                print(f"  {m.name:14s} n/a ({s['error']})")
                continue
            rate = f"{w.amount / s['median']:,.0f} {w.unit}" if w.amount else ""
            print(f"  {m.name:14s} {s['median']:9.3f} {rate:>14s} {fmt_ratio(s['ratio_native']):>8s} "
                  f"{fmt_ratio(s['ratio_overlay']):>9s}" + (f"  ({s['note']})" if s["note"] else ""))


def md(text) -> str:
    """Text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(bench: Bench, info: dict, plot_rel: str | None) -> str:
    res = bench.results
    a = bench.args
    s = bench.sizes
    out = ["# imafs benchmark", "",
           f"{info['date']} — `scripts/bench.py{' --quick' if a.quick else ''} --reps {a.reps}`"
           f" — imafs `{info['imafs_commit']}` (worktree: {info['imafs_worktree']})", "",
           f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
           f"Linux {info['kernel']}, Python {info['python']}, pyfuse3 {info['pyfuse3']}, "
           f"backing directory on {info['workdir_fs']}; load average {info['loadavg_start']:.2f} "
           f"at the start, {info['loadavg_end']:.2f} at the end.", "",
           f"Times are the median of {a.reps} runs, each FUSE run on a fresh mount (mount not "
           "timed; backing files in the page cache except for b-cold). Ratios are to the "
           "native directory and to the overlay with integrity off; lower is better.", ""]
    if plot_rel:
        out += [f"![ratio to native]({plot_rel})", ""]
    # summary: workloads x modes
    names = [m.name for m in bench.modes]
    out += ["## Summary (time, ratio to native)", "",
            "| workload | " + " | ".join(names) + " |",
            "|---|" + "---:|" * len(names)]
    for w in bench.workloads:
        row = []
        for n in names:
            c = cell_summary(res, w.key, n)
            if c["median"] is None:
                row.append(f"n/a ({md(c['error'])})")
            elif n == NATIVE:
                row.append(f"{c['median']:.3f} s")
            else:
                row.append(f"{c['median']:.3f} s ({fmt_ratio(c['ratio_native'])})")
        out.append(f"| **{w.key}** {md(w.title)} | " + " | ".join(row) + " |")
    out += ["", "Modes:", ""]
    for m in bench.modes:
        st = "" if m.native or not m.integrity else f" — state {m.state}"
        out.append(f"- **{m.name}**: {m.title}{st}")
    notes = sorted({(m.name, res[w.key][m.name].note) for w in bench.workloads
                    for m in bench.modes if res[w.key].get(m.name) and res[w.key][m.name].note})
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}: {t}" for n, t in notes]
    out += ["", "## Per workload", ""]
    for w in bench.workloads:
        out += [f"### {w.key}: {w.title}", "",
                "| mode | median | runs (s) | rate | / native | / overlay |",
                "|---|---:|---|---:|---:|---:|"]
        for m in bench.modes:
            c = cell_summary(res, w.key, m.name)
            if c["median"] is None:
                out.append(f"| {m.name} | n/a ({md(c['error'])}) | | | | |")
                continue
            rate = f"{w.amount / c['median']:,.0f} {w.unit}" if w.amount else ""
            runs = ", ".join(f"{t:.3f}" for t in c["times"])
            out.append(f"| {m.name} | {c['median']:.3f} s | {runs} | {rate} | "
                       f"{fmt_ratio(c['ratio_native'])} | {fmt_ratio(c['ratio_overlay'])} |")
        out.append("")
    out += ["Sizes: " + ", ".join(f"{k}={v}" for k, v in s.__dict__.items()) + ".", ""]
    return "\n".join(out)


def to_json(bench: Bench, info: dict) -> dict:
    return {
        "machine": info,
        "args": {"reps": bench.args.reps, "quick": bench.args.quick},
        "sizes": dict(bench.sizes.__dict__),
        "modes": [{"name": m.name, "title": m.title, "native": m.native, "args": list(m.args),
                   "state": m.state, "integrity": m.integrity} for m in bench.modes],
        "workloads": {w.key: {"title": w.title, "unit": w.unit, "amount": w.amount,
                              "modes": {m.name: cell_summary(bench.results, w.key, m.name)
                                        for m in bench.modes}}
                      for w in bench.workloads},
    }


def plot(bench: Bench, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"bench: no plot ({e})", file=sys.stderr)
        return False
    modes = [m for m in bench.modes if not m.native]
    wls = bench.workloads
    if not modes or not wls:
        return False
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 2 + len(wls) * (0.3 * len(modes) + 0.5))),
                                    5.0))
    width = 0.8 / len(modes)
    ratios = [r for w in wls for m in modes
              if (r := cell_summary(bench.results, w.key, m.name)["ratio_native"]) is not None]
    log = bool(ratios) and max(ratios) > 20   # a few huge ratios would flatten the rest
    for i, m in enumerate(modes):
        xs, ys = [], []
        for j, w in enumerate(wls):
            r = cell_summary(bench.results, w.key, m.name)["ratio_native"]
            x = j - 0.4 + width * (i + 0.5)
            if r is None:
                ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                continue
            xs.append(x)
            ys.append(r)
        bars = ax.bar(xs, ys, width, label=m.name)
        for b_, y in zip(bars, ys):
            ax.text(b_.get_x() + b_.get_width() / 2, y, f"{y:.0f}" if y >= 10 else f"{y:.1f}",
                    ha="center", va="bottom", fontsize=6, rotation=90 if len(modes) > 4 else 0)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(wls)), [w.key for w in wls])
    ax.set_ylabel("time / native (lower is better" + (", log scale)" if log else ")"))
    ax.set_title(f"imafs: time relative to the native directory ({bench.args.reps} reps, median)")
    ax.legend(fontsize=7, ncol=2 if len(modes) > 5 else 1)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(0.5, max(ratios) * 3)
    else:
        ax.set_ylim(bottom=0, top=max(ratios or [1]) * 1.15)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Modes: " + ", ".join(m.name for m in MODES)
                                + ". Workloads: a, b (b-cold and b-warm), c, d, e.")
    p.add_argument("--reps", type=int, default=3, help="timed runs per workload and mode (median)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke test (500 files, 32 MiB, 50 execs, 200 creates)")
    p.add_argument("--only", metavar="a,b,...", help="workloads to run (default all)")
    p.add_argument("--modes", metavar="native,overlay,...",
                   help=f"modes to run (default all: {','.join(m.name for m in MODES)})")
    p.add_argument("--markdown", metavar="FILE", default=str(REPO / "bench" / "results.md"),
                   help="markdown report (default bench/results.md)")
    p.add_argument("--plot", metavar="FILE",
                   help="PNG bar chart of ratios to native (default: the markdown file with "
                        ".png; 'none' for no plot)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--workdir", metavar="DIR", default="/var/tmp",
                   help="where to create the temporary tree (default /var/tmp); removed afterwards")
    p.add_argument("--keep", action="store_true", help="keep the temporary tree")
    p.add_argument("--timeout", type=float, default=600, help="limit per timed run, seconds")
    p.add_argument("--from-json", metavar="FILE",
                   help="run nothing: write the tables, markdown and plot again from a --json file")
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error("--reps must be at least 1")
    return a


def select_modes(spec: str | None) -> list[Mode]:
    if not spec:
        return list(MODES)
    out = []
    for n in (x.strip() for x in spec.split(",")):
        if not n:
            continue
        if n not in MODE_BY_NAME:
            raise SystemExit(f"bench: unknown mode {n!r} (one of {', '.join(MODE_BY_NAME)})")
        if MODE_BY_NAME[n] not in out:
            out.append(MODE_BY_NAME[n])
    return out


def ns_resolution_micro(n: int = 20000) -> dict[str, float]:
    """Per-open cost of finding the caller's namespace, in microseconds, for a host
    process and one bound to a namespace: CgroupBinder.ns_of (cached per pid and start
    time: one read of /proc/PID/stat) and, "uncached", read_ns (/proc/PID/cgroup)."""
    sys.path.insert(0, str(REPO))
    from imafs.ima.binding import CgroupBinder
    b = CgroupBinder(f"bench{os.getpid()}")
    child = subprocess.Popen(["sleep", "60"])
    try:
        b.bind(child.pid, 1)
        out = {}
        for name, pid in (("host", os.getpid()), ("child", child.pid)):
            for fn, suffix in ((b.ns_of, ""), (b.read_ns, " uncached")):
                assert fn(pid) == (1 if name == "child" else 0)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn(pid)
                out[name + suffix] = (time.perf_counter() - t0) / n * 1e6
        return out
    finally:
        child.kill()
        child.wait()
        b.close(wait=2.0)


def load_json(path: str, args) -> tuple["Bench", dict]:
    """A Bench (not to be run) holding the results of an earlier --json file."""
    data = json.loads(Path(path).read_text())
    modes = [MODE_BY_NAME.get(m["name"]) or Mode(m["name"], m["title"], native=m["native"],
                                                  args=tuple(m["args"]), state=m["state"],
                                                  integrity=m["integrity"])
             for m in data["modes"]]
    wls = [Workload(k, w["title"], _w_cat, w["amount"], w["unit"])
           for k, w in data["workloads"].items()]
    args.reps, args.quick = data["args"]["reps"], data["args"]["quick"]
    bench = Bench(args, Sizes(**data["sizes"]), modes, wls, Path("/nonexistent"))
    for k, w in data["workloads"].items():
        for name, c in w["modes"].items():
            bench.results[k][name] = Cell(times=list(c["times"]), error=c["error"], note=c["note"])
    return bench, data["machine"]


def report(bench: "Bench", info: dict, args) -> None:
    print(f"\nimafs benchmark — {info['date']} — {info['nproc']} CPUs, Linux {info['kernel']}, "
          f"Python {info['python']}, imafs {info['imafs_commit']}")
    print_tables(bench)
    md_path = Path(args.markdown)
    plot_path = None
    if args.plot != "none":
        plot_path = Path(args.plot) if args.plot else md_path.with_suffix(".png")
        if not plot(bench, plot_path):
            plot_path = None
    plot_rel = None
    if plot_path is not None:
        plot_rel = os.path.relpath(plot_path.resolve(), md_path.resolve().parent)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown(bench, info, plot_rel))
    print(f"\nbench: wrote {md_path}" + (f" and {plot_path}" if plot_path else ""))
    if args.json and not args.from_json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(to_json(bench, info), indent=2) + "\n")
        print(f"bench: wrote {args.json}")


def _on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        bench, info = load_json(args.from_json, args)
        report(bench, info, args)
        return 0
    sizes = QUICK if args.quick else FULL
    modes = select_modes(args.modes)
    wls = select_workloads(workloads(sizes), args.only)
    if os.geteuid() != 0 and any(not m.native for m in modes):
        print("bench: warning: not root; mounts may fail", file=sys.stderr)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    load_start = os.getloadavg()[0]
    if load_start > 0.5 * len(os.sched_getaffinity(0)):
        print(f"bench: warning: load average {load_start:.2f}: other work on this machine "
              "will make the times noisy", file=sys.stderr)
    run_dir_existed = os.path.isdir(RUN_DIR)
    os.makedirs(args.workdir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="imafs-bench-", dir=args.workdir))
    os.chmod(work, 0o755)
    bench = Bench(args, sizes, modes, wls, work)
    try:
        bench.run()
    finally:
        bench.cleanup()
        if is_mounted(bench.mnt):
            print(f"bench: {bench.mnt} is still mounted; leaving {work}", file=sys.stderr)
        elif args.keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        if not run_dir_existed:   # created by our daemons: remove it if they left it empty
            with contextlib.suppress(OSError):
                os.rmdir(RUN_DIR)
    info = machine_info(Path(args.workdir), load_start)
    print_ns = MODE_BY_NAME["namespace"] in modes
    report(bench, info, args)
    if print_ns:
        with contextlib.suppress(Exception):
            us = ns_resolution_micro()
            print(f"\nnamespace resolution per open (CgroupBinder.ns_of): host process "
                  f"{us['host']:.1f} us, process in a child namespace {us['child']:.1f} us "
                  f"(uncached: {us['host uncached']:.1f} us, {us['child uncached']:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
