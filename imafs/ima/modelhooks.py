"""Behaviour models in the engine (TSEM's tsem.c: its LSM hooks): what an open or a
namespace operation through the mount is as a model event, who acts
(:mod:`imafs.ima.modeltask`), and the decision over the models of the caller's
namespace chain (:func:`imafs.ima.model.decide_chain`): refused (EPERM) when an
enforcing model refuses, in the caller's namespace or any ancestor's.

The engine calls, per event, one of:

* :meth:`Modelling.file_open` -- step 5b of process_measurement: IMA measured and
  appraised the open, then the model decides (either can refuse); called with the
  file's IInt lock held. An exec open is ``bprm_check`` (the program the task then
  runs -- an ELF binary, or a script's interpreter -- changes its identity; a script
  or the dynamic loader does not); any other open ``file_open`` with its access class
  (MAY_READ, MAY_WRITE, MAY_APPEND), and a read-only open of an ELF file that is not
  an exec (the loader's open of a library) also ``mmap_file``. The CELL's digest is
  the file's sha256: the one the collect step computed, or computed here;
  :meth:`Modelling.ready` says whether the open can be decided on the event loop
  (actor cached, digest at hand), else the engine finishes it in a worker thread;
* :meth:`Modelling.inode_event` -- before a namespace operation happens
  (``inode_create``, ``inode_mkdir``, ``inode_unlink``, ``inode_rmdir``,
  ``inode_rename``, ``inode_link``, ``inode_symlink``, ``inode_setattr``,
  ``inode_setxattr``, ``inode_removexattr``): the FUSE adapter gives the facts (stat
  results, paths inside the mount, the new mode or attributes); a refusal means the
  operation is never done. As the kernel's LSM hooks, which run before the file
  system acts, an allowed event is modelled whether or not the operation then
  succeeds.

Files created inside a model: an allowed ``inode_create`` is kept for the creating
task and path until its open (the open that created the file) tells the file's
identity, which every model of the chain then learns (``Verdict.created``). When an
allowed unlink or a rename removes a file's last link, the models forget it.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import stat
import threading
import time

from imafs.ima import modelmap as mm
from imafs.ima.hooks import binfmt_of
from imafs.ima.iint import AccessDenied, Pending, Subject
from imafs.ima.model import ENFORCE, decide_chain
from imafs.ima.modeltask import TaskCache

log = logging.getLogger("imafs.model")

CREATING_MAX = 1024         # allowed inode_create events waiting for their open
EVENTS_MAX = 8192           # the events of file versions opened lately


def _key(st) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


_I = mm.Inode.of

# hook -> facts (what the FUSE adapter gives) -> the model event
EVENT_OF = {
    "inode_create": lambda f: mm.inode_create(_I(f["dir"]), f["path"], f["mode"]),
    "inode_mkdir": lambda f: mm.inode_mkdir(_I(f["dir"]), f["path"], f["mode"]),
    "inode_unlink": lambda f: mm.inode_unlink(_I(f["dir"]), f["path"], _I(f["st"]),
                                              key=_key(f["st"])),
    "inode_rmdir": lambda f: mm.inode_rmdir(_I(f["dir"]), f["path"], _I(f["st"]),
                                            key=_key(f["st"])),
    "inode_rename": lambda f: mm.inode_rename(
        _I(f["old_dir"]), f["old_path"], _I(f["st"]), _I(f["new_dir"]), f["new_path"],
        target=None if f["target"] is None else _I(f["target"]), key=_key(f["st"]),
        target_key=None if f["target"] is None else _key(f["target"])),
    "inode_link": lambda f: mm.inode_link(f["old_path"], _I(f["st"]), _I(f["new_dir"]),
                                          f["new_path"], key=_key(f["st"])),
    "inode_symlink": lambda f: mm.inode_symlink(_I(f["dir"]), f["path"], f["target"]),
    "inode_setattr": lambda f: mm.inode_setattr(
        f["path"], _I(f["st"]), mode=f.get("mode"), uid=f.get("uid"), gid=f.get("gid"),
        size=f.get("size"), atime=f.get("atime", False), mtime=f.get("mtime", False),
        key=_key(f["st"])),
    "inode_setxattr": lambda f: mm.inode_setxattr(f["path"], _I(f["st"]), f["name"],
                                                  f["value"], key=_key(f["st"])),
    "inode_removexattr": lambda f: mm.inode_removexattr(f["path"], _I(f["st"]), f["name"],
                                                        key=_key(f["st"])),
}


def models_of(ns) -> list:
    """[(namespace, model)] of a namespace chain, leaf first."""
    out = []
    while ns is not None:
        if ns.model is not None:
            out.append((ns, ns.model))
        ns = ns.parent
    return out


def _event_key(req) -> tuple:
    """What the events of an open depend on besides the models: the file version,
    the name it was opened by, the access, the exec role."""
    f, mode = req.f, req.mode
    return (f.key, f.version, f.path, mode.mask, mode.exec_, req.role)


def _library(req) -> bool:
    """Could this open be the dynamic loader's open of a library (an mmap_file)?"""
    f = req.f
    return (not req.mode.exec_ and req.mode.mask == mm.MAY_READ and f.readable
            and f.st.st_size >= 4)


class Modelling:
    """The engine's behaviour-model step (one per engine). ``collector`` computes a
    file's sha256 when the collect step did not; ``tasks`` names who acts."""

    def __init__(self, collector, tasks: TaskCache | None = None):
        self.collector = collector
        self.tasks = tasks or TaskCache()
        self._creating: collections.OrderedDict = collections.OrderedDict()
        # (file version, name, access, exec role) -> its events (_open_events): the
        # next open like it is mapped with one sha256 per model
        self._events: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        # events decided, refused, tasks that could not be read, and the time spent
        # deciding them (actor, digest, decision): the engine's stats
        self.events = self.refused = self.unknown = self.ns = 0

    def stats(self) -> dict:
        with self._lock:
            return {"model_events": self.events, "model_refused": self.refused,
                    "model_unknown_tasks": self.unknown, "model_us": self.ns // 1000}

    def _count(self, t0: int, events: int, refused: bool = False) -> None:
        t = time.perf_counter_ns() - t0
        with self._lock:
            self.ns += t
            self.events += events
            self.refused += refused

    # ------------------------------------------------------------------ opens
    def ready(self, req) -> bool:
        """Can :meth:`file_open` decide this open on the event loop: who acts known
        (a cached actor, read again here when stale) to every model of the chain, the
        events of this file version at hand (or its digest and ELF type)? Sets
        ``req.actor``."""
        s = req.subject
        if req.mode.exec_:      # read the task afresh (_file_open): not on the loop
            return False
        a = self.tasks.known(s.pid, s.uid, s.gid)
        if a is None:
            return False
        for _, m in req.models:
            if a.key not in m.tasks:
                return False
        req.model_events = None if req.mode.created else self._events.get(_event_key(req))
        if req.model_events is None:
            ii, f = req.ii, req.f
            if ii.version != f.version:
                return False
            if not req.mode.created and "sha256" not in ii.digests \
                    and self._wants_digest(req.models, f.path, f.key):
                return False
            if _library(req) and (ii.binfmt is None or ii.binfmt[0] != f.version):
                return False
        req.actor = a
        return True

    def file_open(self, req) -> None:
        """Decide an open (the file's IInt lock held; reads /proc or hashes when
        :meth:`ready` said no). Raises AccessDenied (EPERM) to refuse."""
        t0 = time.perf_counter_ns()
        try:
            n = self._file_open(req)
        except AccessDenied:
            self._count(t0, 1, True)
            raise
        self._count(t0, n)

    def _file_open(self, req) -> int:
        pairs, f, mode = req.models, req.f, req.mode
        if mode.exec_:
            # the credentials the new identity is computed with are the task's now: a
            # capset() or a change of ids since the cached read (runtimes drop their
            # capabilities just before they exec the workload) would otherwise make
            # the identity depend on how long ago that read was
            self.tasks.exec_seen(req.subject.pid)
        a = req.actor or self.tasks.actor(req.subject.pid, req.subject.uid,
                                          req.subject.gid)
        if a is None:
            self._nobody(pairs, req.subject, "open", f.path)
            return 0
        if mode.created:
            with self._lock:
                v = self._creating.pop((a.key, f.path), None)
            if v is not None:
                v.created(f.key)
            evs = self._open_events(req, None)
        else:
            evs = req.model_events
            if evs is None:
                ek = _event_key(req)
                evs = self._events.get(ek) or self._open_events(req, ek)
        try:
            for ev in evs:
                self._decide(pairs, a, ev)
        finally:
            if mode.exec_:
                self.tasks.exec_seen(req.subject.pid)
        return len(evs)

    def _open_events(self, req, ek) -> tuple:
        """The events an open of this file version is (kept for the next opens like
        it, under ``ek``, when its digest is the file's)."""
        pairs, f, mode, ii = req.models, req.f, req.mode, req.ii
        path, key, inode = f.path, f.key, _I(f.st)
        digest = None
        if not mode.created and self._wants_digest(pairs, path, key):
            if ii.version != f.version:
                ii.reset(f.version)
            digest = ii.digests.get("sha256")
            if digest is None:
                digest = self.collector.digest(ii, f, "sha256", {"sha256"})
        if mode.exec_:
            evs = (mm.bprm_check(path, inode, digest, key=key, identity=req.role == "elf"),)
        elif _library(req) and binfmt_of(ii, f)[0]:
            evs = (mm.file_open(path, inode, digest, mode.mask, key=key),
                   mm.mmap_file(path, inode, digest, key=key))
        else:
            evs = (mm.file_open(path, inode, digest, mode.mask, key=key),)
        if ek is not None and digest is not None:
            with self._lock:
                self._events[ek] = evs
                while len(self._events) > EVENTS_MAX:
                    self._events.popitem(last=False)
        return evs

    def _wants_digest(self, pairs, path: bytes, key) -> bool:
        """Does some model of the chain put this file's digest in its CELL (not a
        file created inside it, nor a pseudonym)?"""
        for _, m in pairs:
            if key in m.created:
                continue
            if m.pseudonyms and mm.pseudonym(path) in m.pseudonyms:
                continue
            return True
        return False

    # ------------------------------------------------------------------ namespace ops
    def inode_event(self, subject: Subject, pairs, hook: str, facts: dict):
        """A namespace operation about to happen: None (allowed), or a Pending (who
        acts must be read from /proc first); AccessDenied (EPERM) to refuse."""
        a = self.tasks.known(subject.pid, subject.uid, subject.gid)
        if a is None or any(a.key not in m.tasks for _, m in pairs):
            return Pending(self._inode_event, subject, pairs, hook, facts, None)
        return self._inode_event(subject, pairs, hook, facts, a)

    def _inode_event(self, subject: Subject, pairs, hook: str, facts: dict, a) -> None:
        t0 = time.perf_counter_ns()
        try:
            n = self._inode_decide(subject, pairs, hook, facts, a)
        except AccessDenied:
            self._count(t0, 1, True)
            raise
        self._count(t0, n)

    def _inode_decide(self, subject: Subject, pairs, hook: str, facts: dict, a) -> int:
        if a is None:
            a = self.tasks.actor(subject.pid, subject.uid, subject.gid)
            if a is None:
                self._nobody(pairs, subject, hook, facts.get("path"))
                return 0
        try:
            event = EVENT_OF[hook](facts)
        except (KeyError, ValueError) as e:     # a path the model cannot name
            log.warning("%s by pid %d not modelled: %s", hook, subject.pid, e)
            self._nobody(pairs, subject, hook, facts.get("path"))
            return 0
        v = self._decide(pairs, a, event)
        if hook == "inode_create":
            with self._lock:
                self._creating[(a.key, facts["path"])] = v
                self._creating.move_to_end((a.key, facts["path"]))
                while len(self._creating) > CREATING_MAX:
                    self._creating.popitem(last=False)
        gone = None                 # the inode whose link this removes
        if hook == "inode_unlink":
            gone = facts["st"]
        elif hook == "inode_rename" and not facts.get("exchange"):
            gone = facts["target"]
        if gone is not None and gone.st_nlink <= 1 and not stat.S_ISDIR(gone.st_mode):
            for _, m in pairs:      # its last link goes: its identity may name another
                m.forget_file(_key(gone))
        return 1

    # ------------------------------------------------------------------ decision
    def _decide(self, pairs, a, event):
        v = decide_chain([m for _, m in pairs], a, event)
        if v.allowed:
            return v
        ns = [n.path for n, m in pairs if m in v.refused_by]
        reason = next((d.reason for m, d in v.decisions if not d.allowed), "")
        raise AccessDenied(errno.EPERM, f"{event.name} of {os.fsdecode(_path_of(event))} "
                                        f"by pid {a.pid} ({a.comm}): {reason}, refused by "
                                        f"the behaviour model of namespace "
                                        f"{', '.join(ns)}")

    def _nobody(self, pairs, subject: Subject, what: str, path) -> None:
        """Who acts cannot be read (the task has gone): refused where a model of the
        chain enforces (fail closed), not modelled otherwise."""
        with self._lock:
            self.unknown += 1
        enforcing = [n.path for n, m in pairs if m.mode == ENFORCE]
        if enforcing:
            raise AccessDenied(errno.EPERM, f"{what} by pid {subject.pid}: the task cannot "
                                            f"be read from /proc, refused by the behaviour "
                                            f"model of namespace {', '.join(enforcing)}")
        return None


def _path_of(event) -> bytes:
    """The first path of an event's CELL (for messages)."""
    for (kind, _), v in zip(mm.EVENTS[event.name], event.values):
        if kind is mm.PATH:
            return v
    return b"?"
