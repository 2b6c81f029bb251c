"""An open -> its IMA hooks: which (func, mask) pairs it stands for, the role of an
exec open (the program, its ELF interpreter, a script), the credentials each hook
sees, and the :class:`AccessEvent` the policy is matched against
(docs/kernel-mapping.md: "How kernel hooks map to FUSE requests").

The kernel calls its hooks from the VFS (do_open: FILE_CHECK; bprm_execve:
BPRM_CHECK, CREDS_CHECK; mmap: MMAP_CHECK); a FUSE daemon sees only OPEN requests,
so the mapping is done here, once, for the engine and for ``imafs verify --policy``.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from dataclasses import dataclass

from imafs.ima import binfmt
from imafs.ima.iint import FileRef, FsInfo, IInt, Subject
from imafs.ima.policy import MAY_APPEND, MAY_EXEC, MAY_READ, MAY_WRITE, AccessEvent

INTERP_WINDOW = 2.0    # seconds between an ELF's exec open and its loader's
MMAP_HOOKS = (("MMAP_CHECK_REQPROT", MAY_EXEC), ("MMAP_CHECK", MAY_EXEC))
#: the hooks of code the kernel maps or runs: an open appraised for one of them while
#: the file has writers through the mount is refused (violations.writers_check)
CODE_FUNCS = frozenset({"BPRM_CHECK", "CREDS_CHECK", "MMAP_CHECK", "MMAP_CHECK_REQPROT"})
#: ``--mmap-check``: which read-only opens of an ELF file stand for a library load
#: (the MMAP_CHECK approximation): none, those of processes running a program from
#: the mount, or all
MMAP_CHECK_MODES = ("off", "mount-programs", "all-elf")
#: the role of a read-only open the --mmap-check setting excludes from the
#: approximation (part of the verdict key, as an exec open's role is)
NO_LOAD = "no-load"
#: AccessEvent fields that need the caller's ids from /proc
SUBJECT_FIELDS = frozenset({"uid", "euid", "gid", "egid", "suid", "sgid"})
_FUNC_ALIAS = {"FILE_MMAP": "MMAP_CHECK", "MMAP_CHECK_REQPROT": "MMAP_CHECK",
               "PATH_CHECK": "FILE_CHECK"}


@dataclass(frozen=True, slots=True)
class OpenMode:
    """How a file is opened, as IMA's hooks care: the access mode, O_APPEND, whether
    the open is an exec (``__FMODE_EXEC``), creates the file, or is O_DIRECT."""
    readable: bool = True
    writable: bool = False
    append: bool = False
    exec_: bool = False
    created: bool = False
    direct: bool = False

    @classmethod
    def from_flags(cls, flags: int, *, exec_: bool = False,
                   created: bool = False) -> "OpenMode":
        """From open(2) flags (``os.O_*``)."""
        acc = flags & os.O_ACCMODE
        return cls(readable=acc != os.O_WRONLY, writable=acc != os.O_RDONLY,
                   append=bool(flags & os.O_APPEND), exec_=exec_, created=created,
                   direct=bool(flags & getattr(os, "O_DIRECT", 0)))

    @property
    def mask(self) -> int:
        """MAY_READ / MAY_WRITE / MAY_APPEND of the open (an exec adds MAY_EXEC in
        its hooks, not here)."""
        return ((MAY_READ if self.readable else 0) | (MAY_WRITE if self.writable else 0)
                | (MAY_APPEND if self.append else 0))


def open_hooks(mask: int, exec_: bool, role: str | None, library: bool
               ) -> list[tuple[str, int]]:
    """The (func, mask) hooks one open stands for, in the kernel's order. ``role``
    of an exec open: "elf" (the binary the exec runs), "interp" (the ELF interpreter
    it loads) or "other" (a #! script, not ELF); ``library``: a read-only open of an
    ELF file that is not an exec (the loader's).

    An exec open is FILE_CHECK with MAY_EXEC (do_open) and BPRM_CHECK; the file an
    exec finally runs, an ELF, also gets CREDS_CHECK and MMAP_CHECK_REQPROT /
    MMAP_CHECK (its PROT_EXEC segments); the ELF interpreter gets FILE_CHECK and the
    mmap hooks only, no BPRM_CHECK (load_elf_binary opens it with open_exec)."""
    if exec_:
        hooks = [("FILE_CHECK", MAY_EXEC)]
        if role != "interp":
            hooks.append(("BPRM_CHECK", MAY_EXEC))
        if role == "elf":
            hooks.append(("CREDS_CHECK", MAY_EXEC))
        if role in ("elf", "interp"):
            hooks.extend(MMAP_HOOKS)
        return hooks
    return [("FILE_CHECK", mask)] + (list(MMAP_HOOKS) if library else [])


def hook_ids(func: str, exec_: bool, ids: dict, st: os.stat_result, role: str | None,
             pid: int | None = None) -> dict:
    """The subject ids a rule sees for one hook: the caller's, except for CREDS_CHECK
    and the mmap hooks of an exec (bprm->cred: the credentials the exec gives)."""
    if func == "CREDS_CHECK" or (exec_ and func.startswith("MMAP_CHECK")):
        return exec_creds(ids, st, pid, role)
    return ids


def exec_creds(ids: dict, st: os.stat_result, pid=None, role=None) -> dict:
    """The credentials an exec gives (bprm->cred: what CREDS_CHECK rules see, and the
    mmap hooks of the new image): a set-uid file's owner as euid, a set-gid and
    group-executable file's group as egid (bprm_fill_uid), unless the task has
    no_new_privs; then suid = euid and sgid = egid, as the capability hook sets them.
    For the loader (``role`` "interp") the binary's set-id bits count, not its own:
    the caller's ids are used there (an approximation: the binary is not at hand)."""
    who = dict(ids)
    if role != "interp" and not (pid is not None and _no_new_privs(pid)):
        if st.st_mode & stat.S_ISUID:
            who["euid"] = st.st_uid
        if st.st_mode & stat.S_ISGID and st.st_mode & stat.S_IXGRP:
            who["egid"] = st.st_gid
    who["suid"], who["sgid"] = who["euid"], who["egid"]
    return who


def _no_new_privs(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"NoNewPrivs:"):
                    return line.split()[1] == b"1"
    except OSError:
        pass
    return False


def has_func(policy, func: str) -> bool:
    """Can a rule of ``policy`` match hook ``func`` (a rule without func= can)?"""
    cache = getattr(policy, "_imafs_funcs", None)
    if cache is None:
        cache = {_FUNC_ALIAS.get(r.func, r.func) for r in policy.rules}
        try:
            policy._imafs_funcs = cache
        except AttributeError:
            pass
    return func in cache or None in cache


def has_measure(policy) -> bool:
    """Does the policy have a measure rule (the kernel's ima_policy_flag & IMA_MEASURE)?
    The violation checks run only then."""
    cache = getattr(policy, "_imafs_measures", None)
    if cache is None:
        cache = any(r.action == "measure" for r in policy.rules)
        try:
            policy._imafs_measures = cache
        except AttributeError:
            pass
    return cache


def binfmt_of(ii: IInt, f: FileRef) -> tuple[bool, bytes | None]:
    """(is ELF, PT_INTERP) of this file version (read once per version)."""
    b = ii.binfmt
    if b is not None and b[0] == f.version:
        return b[1], b[2]
    try:
        elf = binfmt.is_elf(os.pread(f.fd, 4, 0)) if f.readable else False
    except OSError:
        elf = False
    interp = binfmt.interpreter(f.fd) if elf else None
    ii.binfmt = (f.version, elf, interp)
    return elf, interp


def subject_ids(chain, subject: Subject) -> dict:
    """The caller's ids as the rules of ``chain`` need them: from /proc when some
    rule looks at real/effective/saved ids, else the request's fsuid/fsgid."""
    for ns in chain:
        if ns.policy.needs & SUBJECT_FIELDS:
            return subject.ids()
    return {"uid": subject.uid, "euid": subject.uid, "gid": subject.gid,
            "egid": subject.gid}


def verdict_key(chain, ns, subject: Subject, mask: int, exec_: bool, role) -> tuple:
    """What a read-only open's verdict depends on besides the file version and the
    chain's policy and keyring epochs: the namespace, the caller's ids that some rule
    of the chain looks at, the mask and the hook (the layout of this tuple is part of
    the verdict cache's key: keep it)."""
    for n in chain:
        if n.policy.needs & SUBJECT_FIELDS:
            ids = subject.ids()
            who = (ids["uid"], ids["euid"], ids["suid"], ids["gid"], ids["egid"],
                   ids["sgid"], ids["cap_setuid"], ids["cap_setgid"])
            break
    else:
        who = (subject.uid, subject.gid)
    return (ns.id, who, mask, exec_, role)


def load_role(mode: str, subject: Subject, exec_: bool) -> str | None:
    """The role of a non-exec open under ``--mmap-check`` ``mode``: None when a
    read-only open of an ELF file by this subject stands for a library load (the
    approximation applies), :data:`NO_LOAD` when it does not. Exec opens: None (their
    role is ExecRoles')."""
    if exec_ or mode == "all-elf":
        return None
    if mode == "mount-programs" and subject.runs_program_here():
        return None
    return NO_LOAD


def may_load(chain, f: FileRef, mask: int, exec_: bool, role: str | None) -> bool:
    """Could this open be a library load under the approximation, whatever the file
    holds: a read-only open, not an exec, of a regular file, that the --mmap-check
    setting covers, under a chain with a rule that can match MMAP_CHECK."""
    return (not exec_ and role is None and mask == MAY_READ
            and stat.S_ISREG(f.st.st_mode)
            and any(has_func(ns.policy, "MMAP_CHECK") for ns in chain))


def events(chain, subject: Subject, f: FileRef, ii: IInt, mask: int, exec_: bool,
           funcs=None, role: str | None = None, *, assume_load: bool = False
           ) -> list[AccessEvent]:
    """The AccessEvents of one open: one per hook (``funcs`` overrides the hooks
    derived from the open, e.g. POLICY_CHECK). A read-only open of an ELF file that
    is not an exec stands for the dynamic loader's open of a library: the mmap hooks
    follow it (when some rule of the chain can match them, and ``role`` is not
    :data:`NO_LOAD`). ``assume_load``: take such an open for a library load whatever
    the file holds (what a loader may read while a writer can still change it)."""
    if funcs:
        hooks = list(funcs)
    else:
        library = may_load(chain, f, mask, exec_, role) and (
            assume_load or (f.st.st_size >= 4 and binfmt_of(ii, f)[0]))
        hooks = open_hooks(mask, exec_, role, library)
    return access_events(hooks, subject_ids(chain, subject), f.st, f.fs,
                         os.fsdecode(f.path), exec_, role, subject.pid)


def access_events(hooks, ids: dict, st: os.stat_result, fs: FsInfo, path: str,
                  exec_: bool, role: str | None, pid: int | None = None
                  ) -> list[AccessEvent]:
    """One AccessEvent per (func, mask) hook: the subject's ``ids`` as each hook sees
    them (:func:`hook_ids`), the file's owner and group, its file system. The one place
    AccessEvents of an open are built (the engine's :func:`events`, and ``imafs verify
    --policy`` for a read or exec by root)."""
    out = []
    for func, hmask in hooks:
        who = hook_ids(func, exec_, ids, st, role, pid)
        out.append(AccessEvent(
            func=func, mask=hmask, uid=who["uid"], euid=who["euid"], gid=who["gid"],
            egid=who["egid"], suid=who.get("suid"), sgid=who.get("sgid"),
            cap_setuid=who.get("cap_setuid", False), cap_setgid=who.get("cap_setgid", False),
            fowner=st.st_uid, fgroup=st.st_gid, fsmagic=fs.magic, fsname=fs.name,
            fs_subtype=fs.subtype, fsuuid=fs.uuid, path=path))
    return out


class ExecRoles:
    """Which exec open is the ELF interpreter's: after an ELF exec was allowed, the
    file its PT_INTERP names (resolved inside the mount, when the process's root is
    the mount's root -- chroot or pivot_root into it; ``FileRef.resolve`` compares
    the root by identity) is remembered for that task, so its next exec open -- in a
    real exec the very next open, of that file -- is taken for the loader's
    (binfmt_elf's open_exec). A process whose root is elsewhere loads its
    interpreter from there, not through the mount: nothing is remembered, and every
    exec open of it stays BPRM_CHECK."""

    MAX = 4096

    def __init__(self):
        self._interp: dict[int, tuple] = {}     # pid -> (identity, deadline)
        self._lock = threading.Lock()

    def role(self, subject: Subject, f: FileRef, ii: IInt) -> str:
        """What an exec open is: "interp" (the loader a dynamically linked ELF just
        exec'd by this very task asks for), "elf" (a binary the exec runs: a program,
        or a script's interpreter), or "other" (a #! script, anything not ELF)."""
        with self._lock:
            pend = self._interp.get(subject.pid)
        if pend is not None and pend[0] == f.key and time.monotonic() < pend[1]:
            return "interp"
        return "elf" if binfmt_of(ii, f)[0] else "other"

    def decided(self, subject: Subject, f: FileRef, ii: IInt, role: str) -> None:
        """An exec open with ``role`` was decided (and allowed): this task's next exec
        open was this one; an allowed ELF's interpreter is expected next."""
        with self._lock:
            self._interp.pop(subject.pid, None)
        if role == "elf":
            self._expect_interp(subject, f, ii)

    def _expect_interp(self, subject: Subject, f: FileRef, ii: IInt) -> None:
        interp = binfmt_of(ii, f)[1]
        if interp is None or f.resolve is None:
            return
        key = f.resolve(subject.pid, interp)
        if key is None:
            return
        with self._lock:
            if len(self._interp) > self.MAX:
                now = time.monotonic()
                for pid in [p for p, v in self._interp.items() if v[1] < now]:
                    del self._interp[pid]
                if len(self._interp) > self.MAX:
                    self._interp.clear()
            self._interp[subject.pid] = (key, time.monotonic() + INTERP_WINDOW)
