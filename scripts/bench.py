#!/usr/bin/env python3
"""imafs benchmark: the same workloads on the native backing directory and through
imafs mounts in several modes, in one run; prints times and ratios, writes a markdown
table (and a PNG plot, and optionally JSON).

    .venv/bin/python scripts/bench.py --rootfs --json bench/results.json   # full run
    .venv/bin/python scripts/bench.py --quick --reps 1    # smoke test sizes
    .venv/bin/python scripts/bench.py --only a,b --modes native,overlay
    .venv/bin/python scripts/bench.py --rootfs --only r-apt --modes native,appraise

Run as root (it mounts FUSE filesystems, chroots and drops the page cache for the cold
runs). The headline ratio is to "overlay", the mount with integrity off
(--no-integrity): what the integrity engine costs on top of any FUSE overlay. The ratio
to native is in the per-workload tables.

Modes (``--modes``; "-warm": remount on the state of a priming run, see Method)
  native                       the backing directory itself
  overlay (or integrity-off)   imafs mount --no-integrity: the baseline of the ratios
  integrity                    the engine on, empty policy
  measure, measure-warm        measure every read, exec and executable mmap (rootfs: tcb)
  appraise, appraise-warm      signature appraisal of reads and execs, --verify-reads=off
                               (rootfs: imasig for execs and mmaps, then appraise_tcb)
  measure-appraise[-warm]      both kinds of rules in one policy, reads verified (the
                               default when the policy appraises)
  verified, verified-warm      measure, and every read checked against the Merkle tree
                               (--verify-reads=on)
  namespace                    as measure, the workload in a child integrity namespace

Workloads on a synthetic tree
  a        cat of every file of a tree of 5,000 files of 4 KiB in 50 directories
           (``xargs -0 cat < LIST | wc -c``: a few ``cat`` processes open and read all)
  b-cold   sequential read of a 256 MiB file (``dd bs=1M``) after dropping the page cache
  b-warm   the same with the backing file in the page cache
  c        500 execs of a static busybox copied into the tree, by its path in the tree
  d        ``tar cf - tree | wc -c`` of the small-file tree (GNU tar skips reading when
           the archive is /dev/null, hence the pipe)
  e        creating and writing 2,000 files of 4 KiB (20 directories, one process)

Workloads on a real root filesystem (with --rootfs [DIR]; default the Debian bookworm
minbase that scripts/rootfs.sh caches). DIR is copied once into the work directory
(``cp -a``, xattrs kept) and every file signed (``imafs sign -r --skip-special``); each
command runs as ``chroot ROOT /bin/sh -c CMD`` with ROOT the copy (native) or the mount,
so the dynamic loader and the libraries are read through the mount. No /proc or /dev
is mounted in the chroot (none of the commands needs one).
  r-true   ``for i in $(seq 200); do /bin/true; done`` (200 dynamically linked execs)
  r-dpkg   ``dpkg -l``
  r-apt    ``apt-get --version``
  r-ls     ``ls -lR /usr > /dev/null``
  r-tar    ``tar c /usr | wc -c``

Measurements without a mount (``--only`` keys ``hash`` and ``ns``)
  hash     imafs's own hashing (imafs.ima.hashing.hash_fd, sha256, and sha256 with the
           fs-verity Merkle tree in the same pass) of the 256 MiB file, page cache dropped
           ("cold") and cached, against hashlib.sha256 over the same bytes in memory
  ns       per-open cost of finding the caller's integrity namespace
           (CgroupBinder.ns_of, and read_ns uncached), host process and namespaced one

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
    the same in every mode). Each run's output is checked (byte and file counts; the
    rootfs's tar size must be the same in every mode). After each run of an integrity
    mode, the engine's counters (control file ``stats``: files hashed, digest cache
    hits) and the measurement list's length are read (untimed) and reported; a warm
    run that hashed files gets a note.

Adding a mode is one entry in MODES: a name, extra ``imafs mount`` arguments, an
optional setup (write a policy, sign the files; it returns more mount arguments), the
state flag, and an optional wrapper the workload's command runs under (a namespace).
A mode that cannot mount (an engine feature not there yet) is reported as
"n/a (reason)" and the run goes on.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import stat
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
DEFAULT_ROOTFS = "/var/cache/imafs/rootfs-bookworm-minbase"   # scripts/rootfs.sh

TREE, ROOTFS = "tree", "rootfs"   # the two backings a workload runs on
TARGET_TITLES = {TREE: "synthetic tree",
                 ROOTFS: "real root filesystem (chroot into the copy or the mount)"}


def _import_imafs() -> None:
    """Make ``import imafs`` find this checkout (for the measurements run in-process)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


# --------------------------------------------------------------------------- policies
# Synthetic tree: every read and exec (and executable mmap: the tcb policy's exec rules)
MEASURE_ALL_POLICY = ("measure func=FILE_CHECK mask=MAY_READ\n"
                      "measure func=BPRM_CHECK\n"
                      "measure func=MMAP_CHECK mask=MAY_EXEC\n")
APPRAISE_SIG_POLICY = ("appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig\n"
                       "appraise func=BPRM_CHECK appraise_type=imasig\n")
# Real rootfs: a policy is a tuple of pieces, each a built-in policy's name
# (imafs.ima.policy.BUILTIN_POLICIES, as the kernel prints it) or rule text. The first
# matching appraise rule decides, so the signature rules for executables and libraries
# go before appraise_tcb's "appraise fowner=0" (which accepts a hash), as the kernel
# puts its secure-boot signature rules before the appraise_tcb ones (tests/test_rootfs.py).
SIG_EXEC_RULES = ("appraise func=BPRM_CHECK appraise_type=imasig\n"
                  "appraise func=MMAP_CHECK appraise_type=imasig\n")
ROOTFS_MEASURE = ("tcb",)
ROOTFS_APPRAISE = (SIG_EXEC_RULES, "appraise_tcb")
ROOTFS_MEASURE_APPRAISE = ("tcb", SIG_EXEC_RULES, "appraise_tcb")
_POLICY_TEXT = {MEASURE_ALL_POLICY: "measure all", APPRAISE_SIG_POLICY: "appraise imasig",
                SIG_EXEC_RULES: "exec+mmap imasig"}


def policy_text(spec) -> str:
    """The policy file's text for a rule text or a tuple of pieces (see above)."""
    if isinstance(spec, str):
        return spec
    _import_imafs()
    from imafs.ima.policy import BUILTIN_POLICIES
    return "".join(BUILTIN_POLICIES.get(p, p) for p in spec)


def policy_title(spec) -> str:
    if spec is None:
        return "no policy"
    parts = (spec,) if isinstance(spec, str) else spec
    return " + ".join(_POLICY_TEXT.get(p, p if "\n" not in p else "rules") for p in parts)


# --------------------------------------------------------------------------- modes
@dataclass(frozen=True)
class Mode:
    """One column of the results.

    name      short name (``--modes``, JSON keys, table columns)
    title     one line for the legend
    native    run on the backing directory itself (no mount)
    args      extra ``imafs mount`` arguments
    setup     called once per backing (TREE, ROOTFS) before the mode's first mount of
              it, with the Bench and the backing's name; may write files (a policy,
              keys) or sign the backing; returns more mount arguments. An exception
              makes the mode "n/a (reason)" on that backing.
    state     "cold": a fresh --state directory for every mount; "warm": one per
              workload, primed by an untimed run, then remounted for the timed runs
    wrap      returns an argv prefix the workload's command runs under, given the Bench
              and the mount root (e.g. a shell that enters a child namespace first)
    integrity the mode expects the engine: its control directory is checked after
              mounting and a note is added when it is missing
    policies  for the legend: the policy on the synthetic tree and on the rootfs
    """
    name: str
    title: str
    native: bool = False
    args: tuple[str, ...] = ()
    setup: Callable[["Bench", str], list[str]] | None = None
    state: str = "cold"
    wrap: Callable[["Bench", Path], list[str]] | None = None
    integrity: bool = False
    policies: tuple[str, str] | None = None


def policy_file(tree, name: str, rootfs=None) -> Callable[["Bench", str], list[str]]:
    """A mode setup that writes the policy for the backing (``tree`` for the synthetic
    tree, ``rootfs`` for the real rootfs; None: no --policy) and mounts with it."""
    def setup(bench: "Bench", target: str) -> list[str]:
        spec = tree if target == TREE else rootfs
        if spec is None:
            return []
        p = bench.work / f"policy-{name}-{target}"
        p.write_text(policy_text(spec))
        return ["--policy", str(p)]
    return setup


def sign_tree_and_policy(tree, name: str, rootfs=None) -> Callable[["Bench", str], list[str]]:
    """A mode setup: an ``imafs keygen`` key (once per run), every file of the tree and
    the big file signed (``imafs sign -r``, signature v2 over sha256; once per run; the
    rootfs is signed when it is copied), the policy, and the certificate as ``--key``."""
    def setup(bench: "Bench", target: str) -> list[str]:
        cert = bench.sign_tree() if target == TREE else bench.signing_key() / "signing_cert.der"
        return policy_file(tree, name, rootfs)(bench, target) + ["--key", str(cert)]
    return setup


def in_namespace(ns: str) -> Callable[["Bench", Path], list[str]]:
    """A mode wrapper: create child namespace ``ns`` (through the control directory),
    then run the workload in it (the shell moved into the namespace execs the command:
    its children, a chroot included, stay in it)."""
    def wrap(bench: "Bench", root: Path) -> list[str]:
        ctl = root / bench.control_name / "ns-create"
        return ["sh", "-c", 'printf "%s" "$0" > "$1" && shift && exec "$@"', ns, str(ctl)]
    return wrap


def _mode_pair(name: str, title: str, warm_title: str, **kw) -> list[Mode]:
    """A cold mode and its warm twin."""
    return [Mode(name, f"{title}, fresh state", integrity=True, **kw),
            Mode(f"{name}-warm", f"{warm_title}, remount with cached digests",
                 integrity=True, state="warm", **kw)]


MODES: list[Mode] = [
    Mode("native", "the backing directory, no FUSE", native=True),
    Mode("overlay", "integrity off (the baseline of the ratios): imafs mount --no-integrity, "
         "a plain passthrough", args=("--no-integrity",)),
    Mode("integrity", "imafs mount: engine on, empty policy", integrity=True),
    *_mode_pair("measure", "measure all reads, execs and executable mmaps (tcb-like)",
                "as measure", setup=policy_file(MEASURE_ALL_POLICY, "measure", ROOTFS_MEASURE),
                policies=(policy_title(MEASURE_ALL_POLICY), policy_title(ROOTFS_MEASURE))),
    *_mode_pair("appraise", "appraise signatures, reads not verified (--verify-reads=off): "
                "every read and exec needs a valid signature (appraise_type=imasig; files "
                "signed by imafs sign -r)", "as appraise", args=("--verify-reads=off",),
                setup=sign_tree_and_policy(APPRAISE_SIG_POLICY, "appraise", ROOTFS_APPRAISE),
                policies=(policy_title(APPRAISE_SIG_POLICY), policy_title(ROOTFS_APPRAISE))),
    *_mode_pair("measure-appraise", "measure all and appraise signatures (both kinds of "
                "rules in one policy), reads verified (the default with appraise rules)",
                "as measure-appraise",
                setup=sign_tree_and_policy(MEASURE_ALL_POLICY + APPRAISE_SIG_POLICY,
                                           "measure-appraise", ROOTFS_MEASURE_APPRAISE),
                policies=(policy_title((MEASURE_ALL_POLICY, APPRAISE_SIG_POLICY)),
                          policy_title(ROOTFS_MEASURE_APPRAISE))),
    *_mode_pair("verified", "measure all, every read checked against the Merkle tree "
                "(--verify-reads=on)", "as verified (digests and trees cached)",
                args=("--verify-reads=on",),
                setup=policy_file(MEASURE_ALL_POLICY, "verified", ROOTFS_MEASURE),
                policies=(policy_title(MEASURE_ALL_POLICY), policy_title(ROOTFS_MEASURE))),
    Mode("namespace", "as measure, run in a child namespace (chain of two, empty child "
         "policy), fresh state", setup=policy_file(MEASURE_ALL_POLICY, "ns",
                                                           ROOTFS_MEASURE),
         wrap=in_namespace("bench"), integrity=True,
         policies=(policy_title(MEASURE_ALL_POLICY), policy_title(ROOTFS_MEASURE))),
]
MODE_BY_NAME = {m.name: m for m in MODES}
MODE_ALIASES = {"integrity-off": "overlay"}
NATIVE, OVERLAY = "native", "overlay"
MICRO = ("hash", "ns")   # the measurements without a mount


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
    rootfs_execs: int = 200


FULL = Sizes()
QUICK = Sizes(files=500, dirs=50, big_mib=32, execs=50, creates=200, create_dirs=10,
              rootfs_execs=50)
SMOKE = Sizes(files=60, dirs=6, big_mib=4, execs=10, creates=30, create_dirs=3,
              rootfs_execs=10)


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
    env: dict | None = None                                     # None: _env()


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
            return f"no byte count in dd's output {p.stderr.strip()[-80:]!r}"
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


# ---- the real rootfs: each command is /bin/sh -c CMD of the rootfs, chrooted into ROOT
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LC_ALL": "C", "HOME": "/root", "TERM": "dumb"}


def _chroot(root: Path, script: str, check) -> Run:
    return Run(["chroot", str(root), "/bin/sh", "-c", script], root, check, env=CHROOT_ENV)


def _contains(*needles: str):
    def check(p: subprocess.CompletedProcess) -> str | None:
        missing = [n for n in needles if n not in p.stdout]
        return f"output lacks {missing[0]!r}: {p.stdout.strip()[-80:]!r}" if missing else None
    return check


def _starts(prefix: str):
    def check(p: subprocess.CompletedProcess) -> str | None:
        return None if p.stdout.startswith(prefix) else \
            f"output does not start with {prefix!r}: {p.stdout.strip()[:80]!r}"
    return check


def _ok(p: subprocess.CompletedProcess) -> str | None:
    return None


def _same_count(b: "Bench", key: str, minimum: int, what: str):
    """The last number of the output, at least ``minimum`` and the same in every run
    and mode (the first run's value is the reference)."""
    def check(p: subprocess.CompletedProcess) -> str | None:
        problem = _at_least(minimum, what)(p)
        if problem:
            return problem
        got = int(p.stdout.split()[-1])
        ref = b.refs.setdefault(key, got)
        return None if got == ref else f"{what}: {got}, {ref} in the first run"
    return check


def _r_true(b: "Bench", root: Path) -> Run:
    n = b.sizes.rootfs_execs
    # the loop of the issue, with a failed exec ending it (the status of a plain for
    # loop is only its last command's) and the count printed for the check
    return _chroot(root, f'for i in $(seq {n}); do /bin/true || exit 1; done; echo "$i"',
                   _int_out(n, "execs"))


def _r_dpkg(b: "Bench", root: Path) -> Run:
    return _chroot(root, "dpkg -l", _contains("ii  dpkg ", "ii  apt "))


def _r_apt(b: "Bench", root: Path) -> Run:
    return _chroot(root, "apt-get --version", _starts("apt "))


def _r_ls(b: "Bench", root: Path) -> Run:
    return _chroot(root, "ls -lR /usr > /dev/null", _ok)


def _r_tar(b: "Bench", root: Path) -> Run:
    return _chroot(root, "tar c /usr | wc -c", _same_count(b, "r-tar", 10 << 20, "tar bytes"))


def _warm_tree(b: "Bench") -> None:
    b.read_backing(b.backing / "tree")


def _warm_big(b: "Bench") -> None:
    b.read_backing(b.backing / "big")


def _warm_rootfs(b: "Bench") -> None:
    b.read_backing(b.rootfs)


def _reset_out(b: "Bench") -> None:
    out = b.backing / "out"
    if out.exists():
        shutil.rmtree(out)
    os.sync()


def workloads(s: Sizes) -> list[Workload]:
    kib = s.file_size // 1024
    r = dict(target=ROOTFS, warm=_warm_rootfs)
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
        Workload("r-true", f"sh -c 'for i in $(seq {s.rootfs_execs}); do /bin/true; done'",
                 _r_true, s.rootfs_execs, "execs/s", **r),
        Workload("r-dpkg", "dpkg -l", _r_dpkg, **r),
        Workload("r-apt", "apt-get --version", _r_apt, **r),
        Workload("r-ls", "ls -lR /usr > /dev/null", _r_ls, **r),
        Workload("r-tar", "tar c /usr | wc -c", _r_tar, **r),
    ]


def select_workloads(all_w: list[Workload], only: str | None,
                     rootfs: bool) -> tuple[list[Workload], list[str]]:
    """The workloads and the measurements (MICRO) to run: all (the rootfs's only with
    --rootfs) or those ``--only`` names."""
    if not only:
        return [w for w in all_w if rootfs or w.target != ROOTFS], list(MICRO)
    keys = [k.strip() for k in only.split(",") if k.strip()]
    chosen, micro = [], []
    for k in keys:
        if k in MICRO:
            micro += [k] if k not in micro else []
            continue
        hit = [w for w in all_w if w.key == k or w.key.split("-")[0] == k]
        if not hit:
            raise SystemExit(f"bench: unknown workload {k!r} "
                             f"(one of {', '.join(w.key for w in all_w)}, b for both b-*, "
                             f"r for all r-*, or {' or '.join(MICRO)})")
        if not rootfs and any(w.target == ROOTFS for w in hit):
            raise SystemExit(f"bench: workload {k!r} runs on a real rootfs: add --rootfs")
        chosen += [w for w in hit if w not in chosen]
    return [w for w in all_w if w in chosen], [m for m in MICRO if m in micro]


# --------------------------------------------------------------------------- the run
@dataclass
class Cell:
    times: list[float] = field(default_factory=list)
    error: str | None = None
    note: str | None = None
    engine: dict | None = None   # the engine's counters after the last timed run

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times and not self.error else None


def drop_page_cache() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


class Bench:
    def __init__(self, args, sizes: Sizes, modes: list[Mode], wls: list[Workload], work: Path,
                 micro: list[str] | tuple[str, ...] = ()):
        self.args, self.sizes, self.modes, self.workloads = args, sizes, modes, wls
        self.micro_keys = list(micro)
        self.work = work
        self.backing = work / "backing"
        self.rootfs = work / "rootfs"
        self.mnt = work / "mnt"
        self.file_list = work / "files.list"
        self.control_name = ".imafs"
        self.results: dict[str, dict[str, Cell]] = {w.key: {} for w in wls}
        self.micro: dict[str, dict] = {}      # "hashing", "ns_resolution"
        self.rootfs_info: dict = {}
        self.refs: dict[str, int] = {}        # outputs that must be the same in every run
        self.elapsed: float | None = None
        self._states = 0
        self._tree_signed = False
        self.mount: ImafsMount | None = None

    def log(self, msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def backing_of(self, target: str) -> Path:
        return self.rootfs if target == ROOTFS else self.backing

    def workloads_of(self, target: str) -> list[Workload]:
        return [w for w in self.workloads if w.target == target]

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
        """Read every regular file under path (symlinks, devices and fifos skipped)."""
        for dirpath, _, names in os.walk(path):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    if not stat.S_ISREG(os.lstat(p).st_mode):
                        continue
                    with open(p, "rb", buffering=0) as f:
                        while f.read(1 << 20):
                            pass
                except PermissionError:
                    continue

    # ---- keys and signatures
    def signing_key(self) -> Path:
        """An ``imafs keygen`` key pair, made once per run."""
        key = self.work / "signing-key"
        if not (key / "signing_cert.der").exists():
            self._imafs(["keygen", "--out", str(key)])
        return key

    def _imafs(self, cmd: list[str], timeout: float = 1800) -> None:
        p = subprocess.run(IMAFS + cmd, capture_output=True, text=True, cwd=REPO, env=_env(),
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if p.returncode:
            raise RuntimeError(f"imafs {cmd[0]}: {(p.stderr or p.stdout).strip()[-200:]}")

    def _sign_args(self) -> list[str]:
        key = self.signing_key()
        return ["sign", "-q", "--key", str(key / "signing_key.pem"),
                "--cert", str(key / "signing_cert.der"), "-r"]

    def sign_tree(self) -> Path:
        """Every file of the tree and the big file signed (once); the certificate."""
        if not self._tree_signed:
            self._imafs(self._sign_args() + [str(self.backing / "tree"), str(self.backing / "big")])
            self._tree_signed = True
        return self.signing_key() / "signing_cert.der"

    # ---- the real rootfs
    def build_rootfs(self) -> None:
        """The copy of --rootfs (cp -a: owners, modes, xattrs, devices), every regular
        file signed (imafs sign -r --skip-special)."""
        src = Path(self.args.rootfs)
        t0 = time.monotonic()
        p = subprocess.run(["cp", "-a", str(src), str(self.rootfs)], capture_output=True,
                           text=True)
        if p.returncode:
            raise RuntimeError(f"cp -a {src}: {p.stderr.strip()[-200:]}")
        t1 = time.monotonic()
        self._imafs(self._sign_args() + ["--skip-special", str(self.rootfs)])
        t2 = time.monotonic()
        files = size = 0
        for dirpath, _, names in os.walk(self.rootfs):
            for n in names:
                st = os.lstat(os.path.join(dirpath, n))
                if stat.S_ISREG(st.st_mode):
                    files += 1
                    size += st.st_size
        self.rootfs_info = {"source": str(src), "files": files, "bytes": size,
                            "copy_s": t1 - t0, "sign_s": t2 - t1}
        marker = Path(str(src) + ".complete")
        with contextlib.suppress(OSError):
            self.rootfs_info["built"] = marker.read_text().strip().splitlines()[0][:120]
        self.log(f"bench: rootfs ready: {files:,} files, {size / 2**20:.0f} MiB, copied in "
                 f"{t1 - t0:.1f} s, signed in {t2 - t1:.1f} s ({self.rootfs})")

    # ---- mounts
    def new_state(self, mode: Mode) -> Path:
        self._states += 1
        st = self.work / f"state-{mode.name}-{self._states}"
        return st

    @contextlib.contextmanager
    def mounted(self, mode: Mode, extra: list[str], state: Path | None, target: str = TREE):
        """Yields the root to run in: the backing directory or a fresh mount."""
        backing = self.backing_of(target)
        if mode.native:
            yield backing
            return
        assert state is not None
        m = ImafsMount(backing, self.mnt, state, self.work / f"imafs-{mode.name}-{target}.log",
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
            drop_page_cache()
        else:
            os.sync()
        t0 = time.perf_counter()
        p = subprocess.run(argv, cwd=r.cwd, capture_output=True, text=True,
                           env=r.env if r.env is not None else _env(),
                           stdin=subprocess.DEVNULL, timeout=self.args.timeout)
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            err = (p.stderr or p.stdout).strip().splitlines()
            raise RuntimeError(f"exit status {p.returncode}" + (f": {err[0]}" if err else ""))
        problem = r.check(p)
        if problem:
            raise RuntimeError(problem)
        return dt

    def engine_stats(self, root: Path) -> dict | None:
        """The engine's counters (control file stats: files hashed, cache hits, ...)
        and the length of the root namespace's measurement list, after a run (untimed):
        what the mode made the engine do."""
        ctl = root / self.control_name
        try:
            out = json.loads((ctl / "stats").read_text())
            with open(ctl / "ascii_runtime_measurements", "rb") as f:
                out["entries"] = sum(b.count(b"\n") for b in iter(lambda: f.read(1 << 16), b""))
            return out
        except (OSError, ValueError):
            return None

    def prepare(self, w: Workload) -> None:
        if w.reset:
            w.reset(self)
        if w.warm:
            w.warm(self)

    def run_mode(self, mode: Mode, target: str = TREE) -> None:
        wls = self.workloads_of(target)
        if not wls:
            return
        self.log(f"bench: mode {mode.name} ({target}): {mode.title}")
        extra: list[str] = []
        if mode.setup:
            try:
                extra = mode.setup(self, target)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.mode_na(mode, f"setup failed: {e}", target)
                return
        if any(w.cold for w in wls) and not os.access(DROP_CACHES, os.W_OK):
            for w in wls:
                if w.cold:
                    self.results[w.key][mode.name] = Cell(error=f"cannot write {DROP_CACHES} (not root)")
        for w in wls:
            cell = self.results[w.key].setdefault(mode.name, Cell())
            if cell.error:
                continue
            warm_state = self.new_state(mode) if mode.state == "warm" else None
            try:
                if warm_state is not None:   # prime the digest cache (untimed)
                    self.prepare(w)
                    with self.mounted(mode, extra, warm_state, target) as root:
                        self.run_once(mode, w, root)
                for rep in range(self.args.reps):
                    self.prepare(w)
                    state = warm_state or (None if mode.native else self.new_state(mode))
                    with self.mounted(mode, extra, state, target) as root:
                        if mode.integrity and not (root / self.control_name).is_dir():
                            cell.note = "no control directory: engine not active in this build"
                        cell.times.append(self.run_once(mode, w, root))
                        if mode.integrity:
                            cell.engine = self.engine_stats(root)
                            hashed = (cell.engine or {}).get("hashed_files")
                            if mode.state == "warm" and hashed:
                                cell.note = f"the warm run hashed {hashed} files"
                    if state is not None and state is not warm_state:
                        shutil.rmtree(state, ignore_errors=True)
            except MountFailed as e:
                self.mode_na(mode, f"mount failed: {e}", target)
                return
            except subprocess.TimeoutExpired:
                cell.error = f"timed out after {self.args.timeout:g} s"
            except Exception as e:  # noqa: BLE001 - one cell n/a, the run goes on
                cell.error = str(e) or type(e).__name__
            finally:
                if warm_state is not None:
                    shutil.rmtree(warm_state, ignore_errors=True)
            med = cell.median
            self.log(f"bench:   {w.key:7s} {mode.name:21s} "
                     + (f"{med:8.3f} s  (runs: {', '.join(f'{t:.3f}' for t in cell.times)})"
                        if med is not None else f"n/a ({cell.error})"))
        if target == TREE:
            _reset_out(self)

    def mode_na(self, mode: Mode, reason: str, target: str = TREE) -> None:
        self.log(f"bench:   {mode.name}: n/a ({reason})")
        for w in self.workloads_of(target):
            c = self.results[w.key].get(mode.name)
            if c is None or c.median is None:
                self.results[w.key][mode.name] = Cell(error=reason)

    def run_micro(self) -> None:
        if "hash" in self.micro_keys:
            self.log("bench: hashing speed (hash_fd against hashlib)")
            try:
                self.micro["hashing"] = hashing_micro(self.backing / "big" / "file",
                                                      self.args.reps)
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.micro["hashing"] = {"error": str(e) or type(e).__name__}
        if "ns" in self.micro_keys:
            self.log("bench: namespace resolution per open")
            try:
                us = ns_resolution_micro(5000 if self.args.quick else 20000)
                self.micro["ns_resolution"] = {"us": us}
            except Exception as e:  # noqa: BLE001 - reported as n/a
                self.micro["ns_resolution"] = {"error": str(e) or type(e).__name__}
        for k, v in self.micro.items():
            self.log(f"bench:   {k}: " + (f"n/a ({v['error']})" if "error" in v else "done"))

    def run(self) -> None:
        t0 = time.monotonic()
        self.mnt.mkdir(exist_ok=True)
        try:
            if self.workloads_of(TREE) or "hash" in self.micro_keys:
                self.build_tree()
            self.run_micro()
            for mode in self.modes:
                self.run_mode(mode, TREE)
            if self.workloads_of(ROOTFS):
                try:
                    self.build_rootfs()
                except Exception as e:  # noqa: BLE001 - the rootfs cells n/a
                    for mode in self.modes:
                        self.mode_na(mode, f"rootfs setup failed: {e}", ROOTFS)
                else:
                    for mode in self.modes:
                        self.run_mode(mode, ROOTFS)
        finally:
            self.elapsed = time.monotonic() - t0

    def cleanup(self) -> None:
        if self.mount is not None:
            self.mount.stop()
        force_unmount(str(self.mnt))


# --------------------------------------------------------------------------- measurements
def hashing_micro(path: Path, reps: int) -> dict:
    """Seconds to hash ``path`` with imafs.ima.hashing.hash_fd (sha256; sha256 and the
    fs-verity tree in one pass), page cache dropped ("cold") and cached, and with
    hashlib.sha256 over the same bytes in memory; every digest is checked. The variants
    take turns within each of the ``reps`` rounds (at least 3), so that a change of the
    machine's load hits them alike."""
    _import_imafs()
    from imafs.ima.hashing import hash_fd
    size = path.stat().st_size
    data = path.read_bytes()
    ref = hashlib.sha256(data).digest()
    variants = (("hash_fd", False, True), ("hash_fd cached", False, False),
                ("hash_fd+verity", True, True), ("hash_fd+verity cached", True, False))
    rows: dict[str, list[float]] = {"hashlib": []}
    rows.update((key, []) for key, _, _ in variants)
    for _ in range(max(3, reps)):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        rows["hashlib"].append(time.perf_counter() - t0)
        for key, verity, cold in variants:
            if cold:
                drop_page_cache()
            else:
                Bench.read_backing(path)
            fd = os.open(path, os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                d = hash_fd(fd, ("sha256",), verity=True if verity else None)
                rows[key].append(time.perf_counter() - t0)
            finally:
                os.close(fd)
            if d["sha256"] != ref or d.size != size or (verity and d.tree is None):
                raise RuntimeError(f"{key}: wrong digest or size")
    return {"bytes": size, "times": rows}


HASH_ROWS = {   # key: (label, cold)
    "hashlib": ("hashlib.sha256 over the bytes in memory", False),
    "hash_fd": ("hash_fd sha256, page cache dropped (cold)", True),
    "hash_fd cached": ("hash_fd sha256, file cached", False),
    "hash_fd+verity": ("hash_fd sha256 + fs-verity tree, one pass, cold", True),
    "hash_fd+verity cached": ("hash_fd sha256 + fs-verity tree, one pass, cached", False),
}


def hashing_summary(h: dict | None) -> list[dict]:
    """One row per HASH_ROWS key: median, MiB/s and speed relative to hashlib."""
    if not h or "error" in h:
        return []
    size = h["bytes"]
    base = statistics.median(h["times"]["hashlib"])
    out = []
    for key, (label, _) in HASH_ROWS.items():
        ts = h["times"].get(key)
        if not ts:
            continue
        med = statistics.median(ts)
        out.append({"key": key, "label": label, "times": ts, "median": med,
                    "mib_s": size / 2**20 / med, "vs_hashlib": base / med})
    return out


def ns_resolution_micro(n: int = 20000) -> dict[str, float]:
    """Per-open cost of finding the caller's namespace, in microseconds, for a host
    process and one bound to a namespace: CgroupBinder.ns_of (the engine's call, cached
    per process) and, "uncached", read_ns (a read of /proc/PID/cgroup)."""
    _import_imafs()
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


NS_ROWS = {"host": "host process, ns_of (cached per process)",
           "child": "process in a child namespace, ns_of",
           "host uncached": "host process, read_ns (uncached: /proc/PID/cgroup)",
           "child uncached": "process in a child namespace, read_ns (uncached)"}


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
        "times": c.times, "median": med, "error": c.error, "note": c.note, "engine": c.engine,
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


def _median(res, wkey: str, mname: str) -> float | None:
    c = res.get(wkey, {}).get(mname)
    return c.median if c else None


def issue_targets(bench: "Bench") -> list[dict]:
    """The figures the project's issues set targets for (and one for comparison),
    from this run's results; value None when a part was not run."""
    res = bench.results
    out = [
        {"key": "a appraise-warm/overlay",
         "what": "a: warm small-file opens with signature appraisal (appraise-warm) "
                 "/ integrity off (overlay)",
         "value": ratio(_median(res, "a", "appraise-warm"), _median(res, "a", OVERLAY)),
         "op": "<=", "limit": 1.10},
        {"key": "b-cold verified/measure",
         "what": "b-cold: cold read of the big file with verified reads (verified) "
                 "/ the same without verification (measure)",
         "value": ratio(_median(res, "b-cold", "verified"), _median(res, "b-cold", "measure")),
         "op": "<=", "limit": 1.15},
        {"key": "b-cold verified-warm/measure-warm",
         "what": "b-cold, warm state: verified-warm / measure-warm (for comparison)",
         "value": ratio(_median(res, "b-cold", "verified-warm"),
                        _median(res, "b-cold", "measure-warm")),
         "op": None, "limit": None},
    ]
    rows = {r["key"]: r for r in hashing_summary(bench.micro.get("hashing"))}
    out += [
        {"key": "hash_fd/hashlib cold",
         "what": "hash_fd sha256 of the big file, page cache dropped: speed / hashlib.sha256 "
                 "in memory",
         "value": rows["hash_fd"]["vs_hashlib"] if "hash_fd" in rows else None,
         "op": ">=", "limit": 0.80},
        {"key": "hash_fd+verity/hashlib cold",
         "what": "hash_fd sha256 + fs-verity tree, cold: speed / hashlib.sha256 (for comparison)",
         "value": rows["hash_fd+verity"]["vs_hashlib"] if "hash_fd+verity" in rows else None,
         "op": None, "limit": None},
    ]
    for t in out:
        v, lim = t["value"], t["limit"]
        t["met"] = None if v is None or lim is None else (v <= lim if t["op"] == "<=" else v >= lim)
    return out


def _target_cells(t: dict) -> tuple[str, str, str]:
    v, lim = t["value"], t["limit"]
    # a figure next to its limit (0.7997 against 0.80) gets the decimals that tell them apart
    digits = 4 if lim is not None and v is not None and abs(v - lim) < 0.005 else 2
    val = "not run" if v is None else f"{v:.{digits}f}x"
    goal = "" if t["limit"] is None else f"{'≤' if t['op'] == '<=' else '≥'} {t['limit']:.2f}x"
    met = "" if t["met"] is None else ("met" if t["met"] else "NOT met")
    return val, goal, met


def print_tables(bench: Bench) -> None:
    res = bench.results
    for w in bench.workloads:
        print(f"\n[{w.key}] {w.title}")
        print(f"  {'mode':21s} {'median s':>9s} {'rate':>14s} {'/int-off':>9s} {'/native':>8s}")
        for m in bench.modes:
            s = cell_summary(res, w.key, m.name)
            if s["median"] is None:
                print(f"  {m.name:21s} n/a ({s['error']})")
                continue
            rate = f"{w.amount / s['median']:,.0f} {w.unit}" if w.amount else ""
            print(f"  {m.name:21s} {s['median']:9.3f} {rate:>14s} "
                  f"{fmt_ratio(s['ratio_overlay']):>9s} {fmt_ratio(s['ratio_native']):>8s}"
                  + (f"  ({s['note']})" if s["note"] else ""))
    hs = bench.micro.get("hashing")
    if hs:
        print(f"\nhashing of the big file ({hs.get('bytes', 0) / 2**20:.0f} MiB)")
        if "error" in hs:
            print(f"  n/a ({hs['error']})")
        for r in hashing_summary(hs):
            print(f"  {r['label']:52s} {r['median']:7.3f} s {r['mib_s']:8,.0f} MiB/s "
                  f"{r['vs_hashlib']:6.2f}x hashlib")
    ns = bench.micro.get("ns_resolution")
    if ns:
        print("\nnamespace resolution per open")
        if "error" in ns:
            print(f"  n/a ({ns['error']})")
        for k, label in NS_ROWS.items():
            if k in ns.get("us", {}):
                print(f"  {label:56s} {ns['us'][k]:6.1f} us")
    if bench.rootfs_info:
        ri = bench.rootfs_info
        print(f"\nrootfs {ri['source']}: {ri['files']:,} files, {ri['bytes'] / 2**20:.0f} MiB; "
              f"cp -a {ri['copy_s']:.1f} s, imafs sign -r {ri['sign_s']:.1f} s")
    tg = [t for t in issue_targets(bench) if t["value"] is not None]
    print("\nissue targets" if tg else "", end="\n" if tg else "")
    for t in tg:
        val, goal, met = _target_cells(t)
        print(f"  {t['key']:34s} {val:>8s}  {goal:8s} {met}")
    if bench.elapsed:
        print(f"\nbench: the run took {bench.elapsed / 60:.1f} min")


def md(text) -> str:
    """Text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(bench: Bench, info: dict, plot_rel: str | None) -> str:
    res = bench.results
    a = bench.args
    s = bench.sizes
    cmd = "scripts/bench.py" + (" --quick" if a.quick else "") + f" --reps {a.reps}" + \
        (" --rootfs" if getattr(a, "rootfs", None) else "")
    took = f" — run took {bench.elapsed / 60:.1f} min" if bench.elapsed else ""
    out = ["# imafs benchmark", "",
           f"{info['date']} — `{cmd}` — imafs `{info['imafs_commit']}` "
           f"(worktree: {info['imafs_worktree']}){took}", "",
           f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
           f"Linux {info['kernel']}, Python {info['python']}, pyfuse3 {info['pyfuse3']}, "
           f"backing directory on {info['workdir_fs']}; load average {info['loadavg_start']:.2f} "
           f"at the start, {info['loadavg_end']:.2f} at the end.", "",
           f"Times are the median of {a.reps} runs, each FUSE run on a fresh mount (mount not "
           "timed; backing files in the page cache except for b-cold). The headline ratio is "
           "to **integrity off** (the `overlay` mode: `imafs mount --no-integrity`, the same "
           "FUSE overlay without the engine); the per-workload tables also give the ratio to "
           "the native directory. Lower is better.", ""]
    if plot_rel:
        out += [f"![ratio to integrity off]({plot_rel})", ""]
    tg = [t for t in issue_targets(bench) if t["value"] is not None]   # those this run has
    if tg:
        out += ["## Issue targets", "", "| figure | measured | target | |",
                "|---|---:|---:|---|"]
        for t in tg:
            val, goal, met = _target_cells(t)
            out.append(f"| {md(t['what'])} | {val} | {goal} | {met} |")
        out.append("")
    names = [m.name for m in bench.modes]
    for target in (TREE, ROOTFS):
        wls = bench.workloads_of(target)
        if not wls:
            continue
        title = "Summary" if target == TREE else "Summary: real root filesystem"
        out += [f"## {title} (time, ratio to integrity off)", "",
                "| workload | " + " | ".join(names) + " |",
                "|---|" + "---:|" * len(names)]
        for w in wls:
            row = []
            for n in names:
                c = cell_summary(res, w.key, n)
                if c["median"] is None:
                    row.append(f"n/a ({md(c['error'])})")
                elif n == OVERLAY or c["ratio_overlay"] is None:
                    row.append(f"{c['median']:.3f} s")
                else:
                    row.append(f"{c['median']:.3f} s ({fmt_ratio(c['ratio_overlay'])})")
            out.append(f"| **{w.key}** {md(w.title)} | " + " | ".join(row) + " |")
        out.append("")
    out += ["Modes:", ""]
    has_rootfs = bool(bench.workloads_of(ROOTFS))
    for m in bench.modes:
        st = "" if m.native or not m.integrity else f" — state {m.state}"
        pol = ""
        if m.policies:
            pol = f" — policy: {m.policies[0]}" + \
                (f" (rootfs: {m.policies[1]})" if has_rootfs else "")
        out.append(f"- **{m.name}**: {m.title}{st}{pol}")
    notes = sorted({(m.name, res[w.key][m.name].note) for w in bench.workloads
                    for m in bench.modes if res[w.key].get(m.name) and res[w.key][m.name].note})
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}: {t}" for n, t in notes]
    out.append("")
    hs = bench.micro.get("hashing")
    if hs:
        out += ["## Hashing", "",
                f"imafs's own hashing (`imafs.ima.hashing.hash_fd`, as the engine calls it) of "
                f"the {hs.get('bytes', 0) / 2**20:.0f} MiB file of workload b, against "
                "`hashlib.sha256` over the same bytes already in memory, on this machine "
                f"(median of {len(hs.get('times', {}).get('hashlib', [])) or a.reps}).", ""]
        if "error" in hs:
            out += [f"n/a ({md(hs['error'])})", ""]
        else:
            out += ["| | median | runs (s) | speed | / hashlib |", "|---|---:|---|---:|---:|"]
            for r in hashing_summary(hs):
                runs = ", ".join(f"{t:.3f}" for t in r["times"])
                out.append(f"| {r['label']} | {r['median']:.3f} s | {runs} | "
                           f"{r['mib_s']:,.0f} MiB/s | {r['vs_hashlib']:.2f}x |")
            out.append("")
    ns = bench.micro.get("ns_resolution")
    if ns:
        out += ["## Namespace resolution per open", "",
                "What the engine pays on each open to find the caller's integrity namespace "
                "(`CgroupBinder`, the process's cgroup; measured in-process).", ""]
        if "error" in ns:
            out += [f"n/a ({md(ns['error'])})", ""]
        else:
            out += ["| caller | per open |", "|---|---:|"]
            out += [f"| {label} | {ns['us'][k]:.1f} µs |" for k, label in NS_ROWS.items()
                    if k in ns["us"]]
            out.append("")
    if has_rootfs:
        ri = bench.rootfs_info
        out += ["## Real root filesystem", ""]
        if ri:
            out += [f"`{ri['source']}`" + (f" ({md(ri['built'])})" if ri.get("built") else "")
                    + f": {ri['files']:,} regular files, {ri['bytes'] / 2**20:.0f} MiB, copied "
                    f"into the work directory with `cp -a` ({ri['copy_s']:.1f} s) and every file "
                    f"signed with `imafs sign -r --skip-special` ({ri['sign_s']:.1f} s). Each "
                    "command runs as `chroot ROOT /bin/sh -c CMD` (ROOT: the copy for native, "
                    "the mount otherwise: the loader and libraries are read through it), "
                    "as root.", ""]
        else:
            out += ["The rootfs could not be prepared (see the cells).", ""]
    out += ["## Per workload", ""]
    for w in bench.workloads:
        out += [f"### {w.key}: {w.title}", "",
                "| mode | median | runs (s) | rate | / integrity off | / native "
                "| hashed · cache hits · done records · list entries |",
                "|---|---:|---|---:|---:|---:|---:|"]
        for m in bench.modes:
            c = cell_summary(res, w.key, m.name)
            if c["median"] is None:
                out.append(f"| {m.name} | n/a ({md(c['error'])}) | | | | | |")
                continue
            rate = f"{w.amount / c['median']:,.0f} {w.unit}" if w.amount else ""
            runs = ", ".join(f"{t:.3f}" for t in c["times"])
            e = c.get("engine") or {}
            eng = " · ".join(f"{e[k]:,}" if isinstance(e.get(k), int) else "?" for k in
                             ("hashed_files", "cache_hits", "done_records", "entries")) if e else ""
            out.append(f"| {m.name} | {c['median']:.3f} s | {runs} | {rate} | "
                       f"{fmt_ratio(c['ratio_overlay'])} | {fmt_ratio(c['ratio_native'])} "
                       f"| {eng} |")
        out.append("")
    out += ["Sizes: " + ", ".join(f"{k}={v}" for k, v in s.__dict__.items()) + ".", ""]
    return "\n".join(out)


def to_json(bench: Bench, info: dict) -> dict:
    return {
        "machine": info,
        "args": {"reps": bench.args.reps, "quick": bench.args.quick,
                 "rootfs": getattr(bench.args, "rootfs", None)},
        "elapsed_s": bench.elapsed,
        "sizes": dict(bench.sizes.__dict__),
        "modes": [{"name": m.name, "title": m.title, "native": m.native, "args": list(m.args),
                   "state": m.state, "integrity": m.integrity,
                   "policies": list(m.policies) if m.policies else None} for m in bench.modes],
        "workloads": {w.key: {"title": w.title, "unit": w.unit, "amount": w.amount,
                              "target": w.target,
                              "modes": {m.name: cell_summary(bench.results, w.key, m.name)
                                        for m in bench.modes}}
                      for w in bench.workloads},
        "targets": issue_targets(bench),
        "hashing": (dict(bench.micro["hashing"], summary=hashing_summary(bench.micro["hashing"]))
                    if "hashing" in bench.micro else None),
        "ns_resolution": bench.micro.get("ns_resolution"),
        "rootfs": bench.rootfs_info or None,
    }


def plot(bench: Bench, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        print(f"bench: no plot ({e})", file=sys.stderr)
        return False
    modes = [m for m in bench.modes if m.name != OVERLAY]
    groups = [(t, bench.workloads_of(t)) for t in (TREE, ROOTFS) if bench.workloads_of(t)]
    if not modes or not groups:
        return False
    # a cold mode and its warm twin: one hue, dark and light
    bases = list(dict.fromkeys(m.name.removesuffix("-warm") for m in MODES + bench.modes
                               if not m.native))
    colors = {m.name: "0.55" if m.native else plt.cm.tab20(
        (2 * bases.index(m.name.removesuffix("-warm")) + m.name.endswith("-warm")) % 20)
        for m in bench.modes}
    nmax = max(len(wls) for _, wls in groups)
    fig, axes = plt.subplots(len(groups), 1, squeeze=False, figsize=(
        min(16.0, max(6.0, 2 + nmax * (0.3 * len(modes) + 0.5))), 4.6 * len(groups)))
    for row, (target, wls) in enumerate(groups):
        ax = axes[row][0]
        width = 0.8 / len(modes)
        ratios = [r for w in wls for m in modes
                  if (r := cell_summary(bench.results, w.key, m.name)["ratio_overlay"])]
        log = bool(ratios) and max(ratios) / min(ratios) > 20   # native's 0.05 and 10x
        for i, m in enumerate(modes):
            xs, ys = [], []
            for j, w in enumerate(wls):
                r = cell_summary(bench.results, w.key, m.name)["ratio_overlay"]
                x = j - 0.4 + width * (i + 0.5)
                if r is None:
                    ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90)
                    continue
                xs.append(x)
                ys.append(r)
            bars = ax.bar(xs, ys, width, label=m.name, color=colors[m.name])
            for b_, y in zip(bars, ys):
                ax.text(b_.get_x() + b_.get_width() / 2, y,
                        f"{y:.0f}" if y >= 10 else f"{y:.1f}" if y >= 0.95 else f"{y:.2f}",
                        ha="center", va="bottom", fontsize=6,
                        rotation=90 if len(modes) > 4 else 0)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(wls)), [w.key for w in wls])
        ax.set_ylabel("time / integrity off (lower is better" + (", log)" if log else ")"))
        ax.set_title(TARGET_TITLES[target], fontsize=10)
        ax.legend(fontsize=7, ncol=3 if len(modes) > 5 else 1)
        if log:
            ax.set_yscale("log")
            ax.set_ylim(min(ratios) / 2, max(ratios) * 3)
        else:
            ax.set_ylim(bottom=0, top=max(ratios or [1]) * 1.15)
    fig.suptitle("imafs: time relative to the mount with integrity off (--no-integrity = 1), "
                 f"median of {bench.args.reps}", fontsize=10)
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
                                + " (integrity-off: another name of overlay). Workloads: a, b "
                                "(b-cold and b-warm), c, d, e; with --rootfs r-true, r-dpkg, "
                                "r-apt, r-ls, r-tar (r for all); measurements: hash, ns.")
    p.add_argument("--reps", type=int, default=3, help="timed runs per workload and mode (median)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a smoke test (500 files, 32 MiB, 50 execs, 200 creates, "
                        "50 rootfs execs)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, for the test suite's run of every mode (implies --quick)")
    p.add_argument("--only", metavar="a,b,...",
                   help="workloads and measurements to run (default all; the r-* only with "
                        "--rootfs)")
    p.add_argument("--modes", metavar="native,overlay,...",
                   help=f"modes to run (default all: {','.join(m.name for m in MODES)})")
    p.add_argument("--rootfs", metavar="DIR", nargs="?", const=DEFAULT_ROOTFS,
                   help="also run the r-* workloads on a copy of this root filesystem "
                        f"(default {DEFAULT_ROOTFS}, built by scripts/rootfs.sh)")
    p.add_argument("--markdown", metavar="FILE", default=str(REPO / "bench" / "results.md"),
                   help="markdown report (default bench/results.md)")
    p.add_argument("--plot", metavar="FILE",
                   help="PNG bar chart of ratios to integrity off (default: the markdown file "
                        "with .png; 'none' for no plot)")
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


def rootfs_problem(d: str) -> str | None:
    """Why DIR cannot be used as --rootfs (one line), or None."""
    p = Path(d)
    hint = f"build it with scripts/rootfs.sh{'' if d == DEFAULT_ROOTFS else ' ' + d}"
    if not p.is_dir():
        return f"bench: no root filesystem at {d} ({hint})"
    if Path(d + ".lock").exists() and not Path(d + ".complete").exists():
        return f"bench: {d} is an unfinished scripts/rootfs.sh build ({hint})"
    if not os.path.lexists(p / "bin" / "sh") or not (p / "usr").is_dir():
        return f"bench: {d} has no bin/sh or usr/: not a root filesystem ({hint})"
    if shutil.which("chroot") is None:
        return "bench: --rootfs needs chroot(8) (coreutils)"
    return None


def select_modes(spec: str | None) -> list[Mode]:
    if not spec:
        return list(MODES)
    out = []
    for n in (x.strip() for x in spec.split(",")):
        if not n:
            continue
        n = MODE_ALIASES.get(n, n)
        if n not in MODE_BY_NAME:
            raise SystemExit(f"bench: unknown mode {n!r} (one of {', '.join(MODE_BY_NAME)})")
        if MODE_BY_NAME[n] not in out:
            out.append(MODE_BY_NAME[n])
    return out


def load_json(path: str, args) -> tuple["Bench", dict]:
    """A Bench (not to be run) holding the results of an earlier --json file."""
    data = json.loads(Path(path).read_text())
    # the modes as they were in that run (a mode's name may mean other arguments now)
    modes = [Mode(m["name"], m["title"], native=m["native"], args=tuple(m["args"]),
                  state=m["state"], integrity=m["integrity"],
                  policies=tuple(m["policies"]) if m.get("policies") else None)
             for m in data["modes"]]
    wls = [Workload(k, w["title"], _w_cat, w["amount"], w["unit"], target=w.get("target", TREE))
           for k, w in data["workloads"].items()]
    args.reps, args.quick = data["args"]["reps"], data["args"]["quick"]
    args.rootfs = data["args"].get("rootfs")
    known = set(Sizes.__dataclass_fields__)
    bench = Bench(args, Sizes(**{k: v for k, v in data["sizes"].items() if k in known}),
                  modes, wls, Path("/nonexistent"))
    for k, w in data["workloads"].items():
        for name, c in w["modes"].items():
            bench.results[k][name] = Cell(times=list(c["times"]), error=c["error"], note=c["note"],
                                          engine=c.get("engine"))
    if data.get("hashing"):
        bench.micro["hashing"] = {k: v for k, v in data["hashing"].items() if k != "summary"}
    if data.get("ns_resolution"):
        bench.micro["ns_resolution"] = data["ns_resolution"]
    bench.rootfs_info = data.get("rootfs") or {}
    bench.elapsed = data.get("elapsed_s")
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


def _mounts_under(path: Path) -> list[str]:
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mountinfo") as f:
        return [m for line in f if (m := line.split(" ")[4]).startswith(prefix)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        bench, info = load_json(args.from_json, args)
        report(bench, info, args)
        return 0
    if args.rootfs is not None:
        args.rootfs = os.path.abspath(args.rootfs)
        problem = rootfs_problem(args.rootfs)
        if problem:
            print(problem, file=sys.stderr)
            return 2
    if args.smoke:
        args.quick = True
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    modes = select_modes(args.modes)
    wls, micro = select_workloads(workloads(sizes), args.only, args.rootfs is not None)
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
    bench = Bench(args, sizes, modes, wls, work, micro)
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # a second Ctrl-C or a TERM must not cut the unmount and removal short: SIGINT
        # ignored (by the umount commands run now, too: they inherit that), TERM and HUP
        # kept for after
        pending: list[int] = []
        old = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
        for s in (signal.SIGTERM, signal.SIGHUP):
            old[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
        try:
            bench.cleanup()
            left = _mounts_under(work)
            if left:
                print(f"bench: {', '.join(left)} still mounted; leaving {work}", file=sys.stderr)
            elif args.keep:
                print(f"bench: kept {work}", file=sys.stderr)
            else:
                shutil.rmtree(work, ignore_errors=True)
            if not run_dir_existed:   # created by our daemons: remove it if they left it empty
                with contextlib.suppress(OSError):
                    os.rmdir(RUN_DIR)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
        if pending:
            raise SystemExit(128 + pending[0])
    if interrupted:
        print("bench: interrupted; unmounted and removed the work directory, no report",
              file=sys.stderr)
        return 128 + signal.SIGINT
    info = machine_info(Path(args.workdir), load_start)
    report(bench, info, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
