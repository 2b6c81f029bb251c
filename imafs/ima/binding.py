"""Which integrity namespace a process belongs to.

A process is placed in a namespace by moving it into a cgroup of a **private, named
cgroup v1 hierarchy** that the daemon mounts for its state (``name=imafs.<key>``, no
controllers, at ``/run/imafs/cg/<key>``): one cgroup per namespace. Why a cgroup:

- the kernel copies cgroup membership to every child at fork, so double-forking,
  reparenting to init, ``setsid`` and new pid/mount/user namespaces all keep it;
- membership belongs to the process, not to its pid: a reused pid is a new process
  in whatever cgroup its own parent was in;
- a private named hierarchy has no controllers, so no container manager or systemd
  ever moves processes in it (they would in the unified cgroup v2 tree), and each
  mount's hierarchy is its own, so joining a namespace of another mount never takes
  a process out of this one.

Leaving is possible only by writing to this hierarchy's ``cgroup.procs``, which needs
the hierarchy mounted and root in the initial user namespace: a container process
(own mount namespace, no CAP_SYS_ADMIN there) cannot. Where named v1 hierarchies are
not available, the unified cgroup v2 tree is used under ``imafs.<key>/``.

A process whose ``/proc/PID/cgroup`` cannot be read is **unknown** (None): the engine
refuses it rather than treat it as the host.
"""
from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger("imafs.binding")

RUN_CG = "/run/imafs/cg"


class BindingError(Exception):
    pass


class CgroupBinder:
    def __init__(self, key: str):
        self.key = key[:24]
        self.name = f"imafs.{self.key}"
        self.mode = None        # "v1" or "v2"
        self.root = None        # directory whose subdirs are namespace cgroups
        self._setup()

    def _setup(self) -> None:
        mnt = os.path.join(RUN_CG, self.key)
        if self._mounted_named(mnt):
            self.mode, self.root = "v1", mnt
            return
        os.makedirs(mnt, exist_ok=True)
        r = os.system(f"mount -t cgroup -o none,name={self.name} cgroup {mnt} 2>/dev/null")
        if r == 0:
            self.mode, self.root = "v1", mnt
            return
        v2 = _cgroup2_mount()
        if v2 is None:
            raise BindingError("no cgroup hierarchy available to bind processes to namespaces")
        self.mode = "v2"
        self.root = os.path.join(v2, self.name)
        os.makedirs(self.root, exist_ok=True)

    def _mounted_named(self, mnt: str) -> bool:
        try:
            with open("/proc/self/mountinfo") as f:
                for line in f:
                    parts = line.split()
                    if parts[4] == mnt and f"name={self.name}" in line:
                        return True
        except OSError:
            pass
        return False

    def _dir(self, ns_id: int) -> str:
        return os.path.join(self.root, f"ns{ns_id}")

    def bind(self, pid: int, ns_id: int) -> None:
        """Move the process (its whole thread group) into namespace ns_id."""
        d = self._dir(ns_id)
        os.makedirs(d, exist_ok=True)
        try:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(f"{pid}\n")
        except OSError as e:
            raise BindingError(f"cannot move pid {pid} into namespace {ns_id}: {e.strerror}")

    def ns_of(self, pid: int) -> int | None:
        """The namespace id of a process: 0 (root) when it is in no namespace cgroup of
        this mount, None when it cannot be determined."""
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                text = f.read()
        except OSError:
            return None
        want = f"name={self.name}" if self.mode == "v1" else ""
        for line in text.splitlines():
            hid, ctrl, path = line.split(":", 2)
            if self.mode == "v1":
                if ctrl != want:
                    continue
            elif hid != "0":
                continue
            else:
                prefix = "/" + self.name
                if not path.startswith(prefix):
                    return 0
                path = path[len(prefix):]
            leaf = path.rstrip("/").rsplit("/", 1)[-1]
            if leaf.startswith("ns") and leaf[2:].isdigit():
                return int(leaf[2:])
            return 0
        return 0 if self.mode == "v1" else None

    def members(self, ns_id: int) -> list[int]:
        try:
            with open(os.path.join(self._dir(ns_id), "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def remove(self, ns_id: int) -> None:
        try:
            os.rmdir(self._dir(ns_id))
        except OSError as e:
            if e.errno not in (errno.ENOENT,):
                raise BindingError(f"namespace {ns_id} still has processes")


def _cgroup2_mount() -> str | None:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                if parts[sep + 1] == "cgroup2":
                    return parts[4]
    except (OSError, ValueError):
        pass
    return None
