"""The parts of scripts/bench.py, one concern each:

    runs.py        what a workload is (Sizes, Run, Workload, Cell) and the checks of its output
    workloads.py   the workloads on the synthetic tree, and choosing workloads (--only)
    rootfs.py      the real root filesystem: its copy, its signing, its chroot workloads
    modes.py       the modes (columns): policies, setups, how each one mounts (--modes, --pin)
    digestlists.py the digest-list modes: each backing's signed list, its policy, its load
    mounts.py      mounting and unmounting: imafs, libfuse's C passthrough_ll
    passthrough_c.py  building passthrough_ll from the example Debian ships in libfuse3-dev
    measure.py     the measurements without a mount (hashing, namespace resolution)
    model.py       behaviour models: cost per event (a mount of its own)
    notice.py      the delay before a change behind the mount is noticed (a mount of its own)
    run.py         Bench: the tree, the timed runs, one mode after another
    results.py     ratios, the issues' targets, the machine, JSON out and in
    report.py      the printed tables and the markdown report
    plot.py        the PNG bar chart

This file holds what all of them share: where things are, the environment of the
commands the bench runs, and the page cache.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
IMAFS = [sys.executable, "-m", "imafs"]
DROP_CACHES = "/proc/sys/vm/drop_caches"
RUN_DIR = "/run/imafs"          # where imafs daemons record their pids
DEFAULT_ROOTFS = "/var/cache/imafs/rootfs-bookworm-minbase"   # scripts/rootfs.sh

TREE, ROOTFS = "tree", "rootfs"   # the two backings a workload runs on
TARGET_TITLES = {TREE: "synthetic tree",
                 ROOTFS: "real root filesystem (chroot into the copy or the mount)"}


def import_imafs() -> None:
    """Make ``import imafs`` find this checkout (for the measurements run in-process)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def env() -> dict:
    """The environment of the commands the bench runs."""
    e = dict(os.environ)
    e["LC_ALL"] = "C"
    # the mount command imports imafs from this checkout even without an install
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH")) if p)
    return e


def drop_page_cache() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def read_files(path: Path) -> None:
    """Read path, or every regular file under it, into the page cache (symlinks,
    devices and fifos skipped)."""
    walk = os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [],
                                                        [os.path.basename(path)])]
    for dirpath, _, names in walk:
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
