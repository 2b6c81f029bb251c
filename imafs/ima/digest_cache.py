"""Digest lists in the open path: what the digest_cache patches (Roberto Sassu, 2023-24,
never merged; ``ima_digest_cache.c``) add to ``process_measurement``, per namespace.

- A rule with ``digest_cache=`` (policy.py) lets its namespace's loaded digest lists
  stand for the file: ``appraise ... digest_cache=content`` passes a file whose digest
  is in a list that was itself appraised when it was loaded; ``measure ...
  digest_cache=content pcr=N`` records no entry for a file whose digest is in a list
  that was measured -- the list's own entry stands for it, which is what makes the PCR
  independent of the order of accesses. The actions a list was loaded with
  (``ACTION_MEASURED``, ``ACTION_APPRAISED``) are the kernel's "verified usage": the
  same action must have been done to the list (:func:`lookup` returns them).
- Loading a list is the hook ``DIGEST_LIST_CHECK`` (:func:`load`): the file is opened
  through the engine as that hook, measured and appraised by the policies of the
  namespace it goes into and of its ancestors; a refused appraisal refuses the load;
  the bytes parsed are the bytes the engine hashed.
- Each namespace has its own lists (``Namespace.digest_lists``, an
  ima/digest_index.DigestListIndex): a container's lists never vouch for the host.
  Verdicts depend on them (``Namespace.epoch``/``fingerprint``): a verdict owed to a
  list does not outlive the list.

The engine calls :func:`wanted_algos`, :func:`measured` and :func:`appraisal`; the
control files (securityfs_digest.py) call :func:`load` and :func:`unload`, the control
socket (imafs/ctl/server.py) :class:`HostLists`; the query file :func:`lookup`; ``imafs
verify --digest-list`` (no mount) :func:`load_offline`, :func:`lookup_in` and
:func:`listed_pass`. No FUSE here.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

from imafs.ima import appraise as ap
from imafs.ima import digest_lists as dl
from imafs.ima import hashing
from imafs.ima.digest_index import IndexError_, ListInfo
from imafs.ima.hooks import OpenMode
from imafs.ima.iint import AccessDenied, FileRef, Subject, settle
from imafs.ima.policy import MAY_READ
from imafs.ima.quota import QuotaExceeded, admit_digest_list

log = logging.getLogger("imafs.engine")

__all__ = ["Found", "ListedPass", "DigestListRefused", "wanted_algos", "lookup", "lookup_in",
           "found", "measured", "appraisal", "listed_pass", "is_listed", "load",
           "load_offline", "read_all", "unload", "list_actions", "actions_of",
           "HostLists"]

DIGEST_LIST_CHECK = "DIGEST_LIST_CHECK"


class Found(NamedTuple):
    """A file's digest found in a namespace's lists: the OR of the actions of the
    lists holding it, and the first of them (for messages, read when asked)."""
    actions: int
    algo: str
    hit: object                 # digest_index.Hit
    index: object               # the DigestListIndex that answered

    @property
    def label(self) -> str:
        """``debian.list (from bash 5.2.15-2+b7)``."""
        return self.index.describe(self.hit)


@dataclass(frozen=True)
class ListedPass(ap.AppraiseResult):
    """An appraisal passed because the file's digest is in an appraised digest list
    (the patches set INTEGRITY_PASS): such a file is, like a signed one, not opened
    for writing in enforce mode (its list cannot follow the change)."""


class DigestListRefused(Exception):
    """A load or removal refused: ``errno`` for the control file, the reason."""

    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


# --------------------------------------------------------------------------- open path

def wanted_algos(decided) -> set[str]:
    """The algorithms the lists of the namespaces whose decisions use them hold (the
    file is hashed in each, in the same pass as the rest)."""
    out: set[str] = set()
    for n, _ev, d in decided:
        if (d.digest_cache_measure or d.digest_cache_appraise) \
                and n.digest_lists is not None:
            out |= n.digest_lists.algos()
    return out


def lookup(n, digest_for: Callable[[str], bytes]) -> Found | None:
    """Is the file (``digest_for(algo)``: its digest) in a list of namespace ``n``?
    Each algorithm the lists hold is tried (sorted: the same answer every time); the
    actions are those of every list holding it, in any algorithm."""
    return lookup_in(n.digest_lists, digest_for)


def lookup_in(idx, digest_for: Callable[[str], bytes]) -> Found | None:
    """:func:`lookup` in one index (None: no lists) -- what ``imafs verify
    --digest-list`` asks of the lists it loaded offline (:func:`load_offline`)."""
    if idx is None:
        return None
    first = None
    actions = 0
    for algo in idx.algos_sorted():
        hit = idx.lookup(algo, digest_for(algo))
        if hit is not None:
            actions |= hit.actions
            if first is None:
                first = (algo, hit)
    return None if first is None else Found(actions, first[0], first[1], idx)


def found(req, n, digest_for: Callable[[str], bytes]) -> Found | None:
    """:func:`lookup` once per open (``req``, the engine's OpenRequest) and namespace:
    the patches' digest_cache_lookup in process_measurement."""
    memo = req.listed
    if memo is None:
        memo = req.listed = {}
    if n.id not in memo:
        memo[n.id] = lookup(n, digest_for)
    return memo[n.id]


def measured(req, n, digest_for: Callable[[str], bytes]) -> bool:
    """A ``measure ... digest_cache=`` decision of ``n`` records no entry: a list
    holding the file's digest was measured when it was loaded."""
    f = found(req, n, digest_for)
    return f is not None and bool(f.actions & dl.ACTION_MEASURED)


def appraisal(req, n, digest_for: Callable[[str], bytes]) -> ListedPass | None:
    """The pass an ``appraise ... digest_cache=`` decision of ``n`` gets -- only if a
    list holding the file's digest was appraised when it was loaded -- else None (the
    file is then appraised from its ``security.ima`` as usual: the patches try the
    digest cache first)."""
    return listed_pass(found(req, n, digest_for))


def listed_pass(f: Found | None) -> ListedPass | None:
    """The pass a digest found in the lists (``f``) gives an ``appraise ...
    digest_cache=`` decision: only if a list holding it was appraised when it was
    loaded (the patches' "the same action must have been done to the list")."""
    if f is None or not f.actions & dl.ACTION_APPRAISED:
        return None
    return ListedPass(ap.PASS, None, f.algo, None, f"digest in list {f.label}")


def is_listed(result) -> bool:
    return isinstance(result, ListedPass)


# --------------------------------------------------------------------------- loading

def list_actions(ns, state) -> int:
    """What the open of a list (``state``, a DIGEST_LIST_CHECK OpenState) did to it in
    namespace ``ns`` -- the actions its digests may be used for: measured (its entry
    is in ``ns``'s list on the rule's PCR), appraised (passed; by a signature:
    also ACTION_APPRAISED_DIGSIG). Appraisal in log or fix mode that did not pass,
    and appraise_mode=off, are no appraisal."""
    ii = state.iint
    measured_ = False
    results = []
    for n, _ev, d in state.decisions:
        if n is not ns:
            continue
        if d.measure and d.pcr in ii.measured.get(n.id, ()):
            measured_ = True
        if d.appraise and n.appraise_mode != "off":
            cached = ii.appraised.get((n.id, ap.decision_flags(d)))
            if cached is not None:
                results.append(cached[1])
    return actions_of(measured_, results)


def actions_of(measured_: bool, appraisals) -> int:
    """The actions a list's load did to it: ``measured_`` (its entry was stored), and
    the results of its appraisals (``ap.AppraiseResult``): one that passed makes it
    appraised, by a signature (a key id) appraised_digsig."""
    actions = dl.ACTION_MEASURED if measured_ else 0
    for r in appraisals:
        if r.passed:
            actions |= dl.ACTION_APPRAISED
            if r.keyid is not None:
                actions |= dl.ACTION_APPRAISED_DIGSIG
    return actions


def load(engine, ns, subject: Subject, f: FileRef, *, label: str | None = None,
         origin: dict | None = None) -> ListInfo:
    """``digest_list_add``: the list file ``f`` (opened read-only by the caller, who
    closes its fd) goes into namespace ``ns``'s lists. It is opened through the engine
    as DIGEST_LIST_CHECK, decided for ``ns`` and its ancestors (``subject`` is taken
    to be in ``ns``: the writer may be an ancestor writing a child's file); a refused
    appraisal refuses the load (EACCES). The bytes parsed are checked to be those the
    engine hashed. DigestListRefused on any refusal; nothing is loaded then."""
    idx = ns.digest_lists
    if idx is None:
        raise DigestListRefused(errno.EOPNOTSUPP, f"namespace {ns.path} keeps no digest lists")
    path = os.fsdecode(f.path)
    label = label or os.path.basename(path.rstrip("/"))
    size = f.st.st_size
    _admissible(idx, path, label, size, f"namespace {ns.path}")
    try:
        admit_digest_list(ns, idx, size, engine.audit)
    except QuotaExceeded as e:
        raise DigestListRefused(errno.ENOSPC, f"{path}: {e}") from None
    state = None
    try:
        with engine.tree.acting_as(subject.pid, ns):
            state = settle(engine.file_open(subject, f, OpenMode(),
                                            funcs=[(DIGEST_LIST_CHECK, MAY_READ)]))
        data = read_all(f.fd, size)
        actions = list_actions(ns, state) if state is not None else 0
        _same_bytes(engine, state, f, data, path)
    except AccessDenied as e:       # appraisal refused it, or its entry cannot be stored
        raise DigestListRefused(e.errno or errno.EACCES, e.reason if path in e.reason
                                else f"{path}: {e.reason}") from None
    except OSError as e:
        raise DigestListRefused(e.errno or errno.EIO, f"{path}: {e.strerror or e}") from None
    finally:
        if state is not None:
            engine.file_release(state)
    info = _add(idx, path, label, data, actions, origin)
    engine.audit.record("digest_list_add", ns=ns.path, path=path, label=label,
                        digest=f"{info.algo}:{info.digest.hex()}",
                        actions=dl.format_actions(actions), pid=subject.pid, uid=subject.uid)
    log.info("namespace %s: digest list %s loaded from %s (%s, %d digests)", ns.path, label,
             path, dl.format_actions(actions), info.count)
    return info


def load_offline(idx, path: str, data: bytes, *, measured: bool, appraisals,
                 label: str | None = None, origin: dict | None = None) -> ListInfo:
    """A list loaded without a mount (``imafs verify --digest-list``), into ``idx``
    (e.g. a :func:`imafs.ima.digest_index.scratch_index`), as :func:`load` loads it:
    ``data`` is the file's content, read (at most MAX_LIST_SIZE + 1 bytes) from
    ``path``; the caller has matched its policy for a DIGEST_LIST_CHECK open of it by
    root: ``measured``, a rule measures it; ``appraisals``, the results of the
    appraising decisions (``ap.AppraiseResult``, computed over ``data``), a failure of
    which refuses the load, as in an enforcing mount (EACCES). The same size and name
    checks, the same actions (:func:`actions_of`), the same parser and index.
    DigestListRefused naming ``path`` on any refusal; nothing is loaded then."""
    label = label or os.path.basename(path.rstrip("/"))
    _admissible(idx, path, label, len(data), "the lists given")
    appraisals = list(appraisals)
    for r in appraisals:
        if not r.passed:
            raise DigestListRefused(errno.EACCES, f"{path}: {r}")
    return _add(idx, path, label, data, actions_of(measured, appraisals), origin)


def _admissible(idx, path: str, label: str, size: int, where: str) -> None:
    """A list of ``size`` bytes may be loaded as ``label``: not too big, and no list
    of that name is loaded -- checked before it is measured: nothing to undo."""
    if size > dl.MAX_LIST_SIZE:
        raise DigestListRefused(errno.EFBIG, f"{path}: a digest list is at most "
                                             f"{dl.MAX_LIST_SIZE} bytes ({size})")
    if idx.get(label) is not None:
        raise DigestListRefused(errno.EEXIST, f"a digest list named {label!r} is already "
                                              f"loaded in {where}")


def _add(idx, path: str, label: str, data: bytes, actions: int, origin) -> ListInfo:
    """The list into the index (parsed there: a malformed list is refused whole, with
    the byte offset), with how it was loaded."""
    rec = dict(origin or {})
    rec.setdefault("path", path)
    rec.setdefault("time", int(time.time()))
    try:
        return idx.add(label, data, actions=actions, origin=rec)
    except IndexError_ as e:
        raise DigestListRefused(e.errno, f"{path}: {e}" if path not in str(e) else str(e)) \
            from None


def unload(engine, ns, subject: Subject, label: str, f: FileRef | None = None) -> ListInfo:
    """``digest_list_del``: remove the list ``label`` from ``ns``; its digests go unless
    another loaded list holds them. With ``f`` (the list file, named by path): its
    content must be the loaded list's. Not measured: from its entry on, a verifier
    takes a list to vouch for its files; unloading only narrows that here."""
    idx = ns.digest_lists
    if idx is None:
        raise DigestListRefused(errno.EOPNOTSUPP, f"namespace {ns.path} keeps no digest lists")
    info = idx.get(label)
    if info is None:
        raise DigestListRefused(errno.ENOENT, f"no digest list named {label!r} is loaded in "
                                              f"namespace {ns.path}")
    if f is not None:
        try:
            data = read_all(f.fd, min(f.st.st_size, dl.MAX_LIST_SIZE + 1))
        except OSError as e:
            raise DigestListRefused(e.errno or errno.EIO, f"{os.fsdecode(f.path)}: "
                                                          f"{e.strerror or e}") from None
        if hashing.hash_algo(info.algo).new(data).digest() != info.digest:
            raise DigestListRefused(errno.EINVAL, f"{os.fsdecode(f.path)} is not the list "
                                                  f"loaded as {label!r} (its content differs)")
    try:
        info = idx.remove(label)
    except IndexError_ as e:
        raise DigestListRefused(e.errno, str(e)) from None
    engine.audit.record("digest_list_del", ns=ns.path, label=label,
                        digest=f"{info.algo}:{info.digest.hex()}", pid=subject.pid,
                        uid=subject.uid)
    log.info("namespace %s: digest list %s removed by pid %d", ns.path, label, subject.pid)
    return info


def read_all(fd: int, size: int) -> bytes:
    """The file's first ``size`` bytes (and no more: a file that grew is checked by
    its digest)."""
    parts, off = [], 0
    while off < size:
        chunk = os.pread(fd, min(size - off, 1 << 20), off)
        if not chunk:
            break
        parts.append(chunk)
        off += len(chunk)
    return b"".join(parts)


def _same_bytes(engine, state, f: FileRef, data: bytes, path: str) -> None:
    """The bytes read are those the engine measured and appraised (each digest it
    computed of this version, verity ones aside), and the file did not change since
    (size, times): else a writer between the hashing and the read would slip another
    list in. A list no rule measured nor appraised was not hashed: nothing to check."""
    st = os.fstat(f.fd)
    if (st.st_size, st.st_mtime_ns, st.st_ctime_ns) != (len(data), f.st.st_mtime_ns,
                                                        f.st.st_ctime_ns):
        raise DigestListRefused(errno.EAGAIN, f"{path} changed while it was loaded")
    if state is None:
        return
    ii = state.iint
    with ii.lock:
        digests = {a: d for a, d in ii.digests.items() if not a.startswith("verity-")}
    for algo, digest in digests.items():
        try:
            h = hashing.hash_algo(algo).new(data).digest()
        except (ValueError, hashing.HashAlgoError):
            continue
        if h != digest:
            raise DigestListRefused(errno.EAGAIN, f"{path} changed while it was loaded "
                                                  f"(its {algo} is not the one appraised)")


# --------------------------------------------------------------------------- the host

class HostLists:
    """The control socket's digest-list operations (``imafs digest-list load/unload``,
    imafs/ctl/server.py): the namespace named by its path from the root ("" or "/":
    the root; "web", "web/db"), the list file as the requesting process sees it --
    only the host's root reaches the socket, so with uid 0, in that process's root
    (``open_as``, as for digest_list_add). ``pidfd`` (the requester's own, optional)
    pins it: a pid reused meanwhile is refused."""

    def __init__(self, engine, open_as):
        self.engine = engine
        self.open_as = open_as

    def namespace(self, path: str):
        ns = self.engine.tree.root
        for part in (path or "").strip("/").split("/"):
            if not part:
                continue
            child = ns.children.get(part)
            if child is None:
                raise DigestListRefused(errno.ENOENT, f"no namespace {part!r} under "
                                                      f"{ns.path}")
            ns = child
        return ns

    def _open(self, path: str, pid: int, pidfd: int | None) -> FileRef:
        from imafs.ima.hostns import pidfd_pid
        if pidfd is not None and pidfd_pid(pidfd) != pid:
            raise DigestListRefused(errno.ESRCH, f"pid {pid} is not the process whose "
                                                 f"pidfd came with the request")
        try:
            f = self.open_as(pid, 0, 0, path)
        except OSError as e:
            raise DigestListRefused(e.errno or errno.EIO,
                                    f"{path}: {e.strerror or e}") from None
        if pidfd is not None and pidfd_pid(pidfd) != pid:
            os.close(f.fd)
            raise DigestListRefused(errno.ESRCH, f"pid {pid} exited while {path} was "
                                                 f"opened")
        return f

    def add(self, ns_path: str, path: str, pid: int, pidfd: int | None = None) -> dict:
        ns = self.namespace(ns_path)
        f = self._open(path, pid, pidfd)
        try:
            info = load(self.engine, ns, Subject(pid, 0, 0), f,
                        origin={"path": path, "file": os.fsdecode(f.path), "pid": pid,
                                "uid": 0, "via": "control socket"})
        finally:
            os.close(f.fd)
        return {"namespace": ns.path, "label": info.label,
                "digest": f"{info.algo}:{info.digest.hex()}",
                "actions": dl.format_actions(info.actions), "digests": info.count}

    def remove(self, ns_path: str, what: str, pid: int, pidfd: int | None = None) -> dict:
        ns = self.namespace(ns_path)
        if not what.startswith("/"):
            info = unload(self.engine, ns, Subject(pid, 0, 0), what)
        else:
            f = self._open(what, pid, pidfd)
            try:
                info = unload(self.engine, ns, Subject(pid, 0, 0),
                              os.path.basename(what.rstrip("/")), f)
            finally:
                os.close(f.fd)
        return {"namespace": ns.path, "label": info.label}
