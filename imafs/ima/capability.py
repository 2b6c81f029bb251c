"""What a caller may do, as the kernel decides it: its effective capabilities and the
user and pid namespaces they hold in (kernel/capability.c, security/commoncap.c).

uid 0 alone is no privilege: a container's root has uid 0 and, with runc's default
set, no CAP_SYS_ADMIN; root of a user namespace has every capability, over that
namespace only. So a control file asks for a capability **and** where it holds:

- ``admin``: CAP_SYS_ADMIN in the initial user namespace (the daemon's), what the
  kernel's ``capable(CAP_SYS_ADMIN)`` asks;
- ``sys_admin``: CAP_SYS_ADMIN in the caller's own user namespace, whichever it is
  (``ns_capable(current_user_ns(), CAP_SYS_ADMIN)``);
- ``host``: the caller's pid and user namespaces are the daemon's -- not a process of
  a container, whatever its integrity namespace (securityfs.py says who counts as the
  host).

Read from ``/proc/TID/status`` (``CapEff``: per thread, and FUSE reports the thread)
and ``/proc/TID/ns/{user,pid}``, while a pidfd holds the caller: what was read is the
caller's, not that of a process that got its pid meanwhile.
"""
from __future__ import annotations

import errno
import os
import signal
from dataclasses import dataclass

CAP_SYS_ADMIN = 21
PIDFD_THREAD = os.O_EXCL    # pidfd_open(2): a thread's pidfd (Linux 6.9)


def _key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


#: the daemon's user and pid namespaces (what "initial" and "the host" mean here)
OWN_USERNS = _key("/proc/self/ns/user")
OWN_PIDNS = _key("/proc/self/ns/pid")


class CredsError(OSError):
    pass


@dataclass(frozen=True)
class Creds:
    pid: int
    cap_eff: int
    userns: tuple[int, int]
    pidns: tuple[int, int]

    def has(self, cap: int) -> bool:
        return bool(self.cap_eff >> cap & 1)

    @property
    def initial_userns(self) -> bool:
        return self.userns == OWN_USERNS

    @property
    def admin(self) -> bool:
        """CAP_SYS_ADMIN in the initial user namespace."""
        return self.initial_userns and self.has(CAP_SYS_ADMIN)

    @property
    def sys_admin(self) -> bool:
        """CAP_SYS_ADMIN in its own user namespace."""
        return self.has(CAP_SYS_ADMIN)

    @property
    def host_namespaces(self) -> bool:
        """Its pid and user namespaces are the daemon's: no container's process."""
        return self.initial_userns and self.pidns == OWN_PIDNS

    def describe(self) -> str:
        where = "the initial user namespace" if self.initial_userns else \
            f"user namespace {self.userns[1]}"
        pid = "the host's pid namespace" if self.pidns == OWN_PIDNS else \
            f"pid namespace {self.pidns[1]}"
        cap = "CAP_SYS_ADMIN" if self.has(CAP_SYS_ADMIN) else "no CAP_SYS_ADMIN"
        return f"{cap} in {where}, in {pid}"


def _pidfd(pid: int) -> int | None:
    for flags in (PIDFD_THREAD, 0):
        try:
            return os.pidfd_open(pid, flags)
        except OSError as e:
            if e.errno != errno.EINVAL:
                return None
        except AttributeError:
            return None
    return None


def _alive(fd: int) -> bool:
    try:
        signal.pidfd_send_signal(fd, 0)
    except OSError:
        return False
    return True


def creds_of(pid: int) -> Creds:
    """The capabilities and namespaces of thread ``pid``; CredsError when it cannot be
    read (gone, or its pid reused while it was read)."""
    fd = _pidfd(pid)
    try:
        cap = None
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    cap = int(line.split()[1], 16)
                    break
        userns = _key(f"/proc/{pid}/ns/user")
        pidns = _key(f"/proc/{pid}/ns/pid")
        if cap is None or (fd is not None and not _alive(fd)):
            raise CredsError(errno.ESRCH, f"pid {pid} exited")
        return Creds(pid, cap, userns, pidns)
    except CredsError:
        raise
    except (OSError, ValueError, IndexError) as e:
        raise CredsError(errno.ESRCH, f"pid {pid}: cannot read its credentials "
                                      f"({getattr(e, 'strerror', e)})") from None
    finally:
        if fd is not None:
            os.close(fd)
