"""The control files (``MNT/.imafs/``), as the kernel's ima_fs.c serves
``/sys/kernel/security/ima/``: which files there are (:data:`FILES`), which namespace's
files a process may see, who may open what (:meth:`Securityfs.open`), and per open a
session that reads and writes (ima/securityfs_read.py: the ``Session`` interface and the
files that are only read; ima/securityfs_write.py: policy, keys, query, ns-*;
ima/evm_secfs.py: evm).

Nothing here knows FUSE: fs/control.py gives the tree node ids, serves lookups and
directory listings from :data:`FILES`, and hands each open to :meth:`Securityfs.open`
and each read, write and release to the session (in a worker thread). Refusals
are :class:`SecurityfsError` (errno and reason, already logged and audited).

A new control file is a :class:`Node` row appended to :data:`FILES` (append only: a
row's index is part of its node id) and a ``Session`` subclass (see securityfs_read.py):
``contents`` for what a read shows, ``write``/``close`` for what a write does.
The row says the rest: its mode, who writes it (nobody, root, anyone), whether it is
only in a process's own view, whether a write moves the opener, the audit record of a
refused write, whether only the root namespace has it. A row with ``entries`` stands
for every file its directory lists: the session's ``entries(fs, ns)`` gives their
names and keys (name -> key, an int from 1), each file is that row opened with its key
(``digest_lists_loaded/``: one file per loaded list).
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

from imafs.ima.evm_secfs import EvmFile
from imafs.ima.securityfs_digest import (DigestListAdd, DigestListDel, DigestQuery,
                                         DigestsCount, LoadedList)
from imafs.ima.model_secfs import (ModelControl, ModelEvents, ModelExport, ModelForensics,
                                   ModelMeasurement, ModelState, ModelStats,
                                   ModelTrajectory)
from imafs.ima.securityfs_read import (ListFile, MeasurementCount, PcrBank, Session,
                                       SecurityfsError, Stats, Violations, log)
from imafs.ima.securityfs_write import (KeysFile, NsCreate, NsJoin, NsRemove, PolicyFile,
                                        QueryFile)

__all__ = ["FILES", "Node", "Securityfs", "SecurityfsError", "Session", "children"]


@dataclass(frozen=True)
class Node:
    """A file or directory of the control tree."""
    name: str
    parent: int | None              # index in FILES of its directory (None: the top)
    mode: int
    session: type | None = None     # the Session subclass serving it; None: a directory
    writers: str | None = None      # who may open it for writing: None, "root", "any"
    # only in a process's own view, never under namespaces/NAME/ (ns-create or ns-join
    # there would move the opener, an ancestor's process, relative to a namespace not
    # its own)
    own_only: bool = False
    moves_opener: bool = False      # a write moves the process that opened it
    rejected: str | None = None     # the audit record of a refused write (None: none)
    root_ns_only: bool = False      # the root namespace's only (mount-wide counters)
    namespaces: bool = False        # a directory of the child namespaces
    entries: bool = False           # one file per entry session.entries() lists

    @property
    def is_dir(self) -> bool:
        return self.session is None


TOP, NAMESPACES, PCRS, MODEL = 0, 1, 2, 27
# index -> node; the index is part of the node id fs/control.py gives it: append only
FILES: tuple[Node, ...] = (
    Node("", None, 0o555),
    Node("namespaces", TOP, 0o555, namespaces=True),
    Node("pcrs", TOP, 0o550),
    Node("policy", TOP, 0o600, PolicyFile, writers="root", rejected="policy_rejected"),
    Node("ascii_runtime_measurements", TOP, 0o440, ListFile),
    Node("ascii_runtime_measurements_sha1", TOP, 0o440, ListFile),
    Node("ascii_runtime_measurements_sha256", TOP, 0o440, ListFile),
    Node("binary_runtime_measurements", TOP, 0o440, ListFile),
    Node("binary_runtime_measurements_sha1", TOP, 0o440, ListFile),
    Node("binary_runtime_measurements_sha256", TOP, 0o440, ListFile),
    Node("runtime_measurements_count", TOP, 0o440, MeasurementCount),
    Node("violations", TOP, 0o440, Violations),
    Node("sha1", PCRS, 0o440, PcrBank),
    Node("sha256", PCRS, 0o440, PcrBank),
    Node("keys", TOP, 0o600, KeysFile, writers="root", rejected="key_rejected"),
    Node("query", TOP, 0o600, QueryFile, writers="any"),
    Node("ns-create", TOP, 0o600, NsCreate, writers="root", own_only=True,
         moves_opener=True, rejected="ns_create_rejected"),
    Node("ns-remove", TOP, 0o200, NsRemove, writers="root", rejected="ns_remove_rejected"),
    Node("stats", TOP, 0o440, Stats, root_ns_only=True),
    Node("ns-join", TOP, 0o200, NsJoin, writers="root", own_only=True, moves_opener=True,
         rejected="ns_join_rejected"),
    # digest lists (DIGLIM's files; docs/digest-lists.md): who writes add/del as policy
    Node("digest_list_add", TOP, 0o200, DigestListAdd, writers="root",
         rejected="digest_list_rejected"),
    Node("digest_list_del", TOP, 0o200, DigestListDel, writers="root",
         rejected="digest_list_rejected"),
    Node("digest_query", TOP, 0o600, DigestQuery, writers="any"),
    Node("digests_count", TOP, 0o440, DigestsCount),
    Node("digest_lists_loaded", TOP, 0o550),
    Node("", 24, 0o440, LoadedList, entries=True),  # digest_lists_loaded/LABEL
    Node("evm", TOP, 0o660, EvmFile, writers="root", rejected="evm_rejected"),
    # the behaviour model (imafs/ima/model_secfs.py; docs/models.md)
    Node("model", TOP, 0o550),
    Node("state", MODEL, 0o440, ModelState),
    Node("measurement", MODEL, 0o440, ModelMeasurement),
    Node("trajectory", MODEL, 0o440, ModelTrajectory),
    Node("forensics", MODEL, 0o440, ModelForensics),
    Node("events", MODEL, 0o440, ModelEvents),
    Node("control", MODEL, 0o200, ModelControl, writers="root", rejected="model_rejected"),
    Node("export", MODEL, 0o440, ModelExport),
    Node("stats", MODEL, 0o440, ModelStats),
)
assert FILES[24].name == "digest_lists_loaded"
assert FILES[MODEL].name == "model" and FILES[MODEL].is_dir


def children(index: int) -> dict[str, int]:
    """The entries of directory FILES[index]: name -> index (the child namespaces of
    a ``namespaces`` directory, and the files of an ``entries`` row, are not in the
    table)."""
    return {n.name: i for i, n in enumerate(FILES) if n.parent == index and not n.entries}


def entries_row(index: int) -> int | None:
    """The ``entries`` row under directory FILES[index], if it has one."""
    return next((i for i, n in enumerate(FILES) if n.parent == index and n.entries), None)


def _no_paths(path: str):
    raise OSError(errno.ENOENT, "no mount to open paths in")


class Securityfs:
    """The control files of one mount over ``engine``. ``open_file(path)``: a path
    inside the mount (or a host path below the mount point) opened read-only as a
    ``FileRef``, regular files only, OSError otherwise (EINVAL with the reason for what
    is no path of a regular file); the caller closes its ``fd``. The policy, keys and
    query files read the paths written to them through it."""

    def __init__(self, engine, *, open_file=None, open_as=None):
        """``open_as(pid, uid, gid, path)``: ``path`` as process ``pid`` sees it, opened
        with its credentials, as a ``FileRef`` (what digest_list_add reads)."""
        self.engine = engine
        self.open_file = open_file or _no_paths
        self.open_as = open_as or (lambda pid, uid, gid, path: _no_paths(path))
        self.last_query: dict[tuple[int, int], bytes] = {}  # (ns id, uid) -> answer
        self.policy_lock = threading.Lock()     # one policy load at a time
        self.keys_lock = threading.Lock()       # one keyring transaction at a time

    def target(self, pid: int, ns_id: int | None = None):
        """The namespace whose files process ``pid`` sees: its own (``ns_id`` None), or
        namespace ``ns_id`` if it is that namespace or an ancestor of it (EACCES
        otherwise, ENOENT when there is none)."""
        own = self.engine.tree.of_pid(pid)
        if own is None:     # a process we cannot place sees nothing
            raise SecurityfsError(errno.EACCES, f"pid {pid} is in no known namespace")
        if ns_id is None:
            return own
        ns = self.engine.tree.by_id.get(ns_id)
        if ns is None:
            raise SecurityfsError(errno.ENOENT, f"no namespace id {ns_id}")
        if own not in ns.chain():
            raise SecurityfsError(errno.EACCES, f"namespace {ns.path} is not "
                                                f"{own.path} nor below it")
        return ns

    def open(self, node: Node, ns, caller, flags: int, key: int = 0) -> Session:
        """Who may open what: ``caller`` (a Subject: pid, uid, gid) opens file ``node``
        of namespace ``ns`` (what :meth:`target` gave) with ``flags``. A session, or
        SecurityfsError (logged; audited for a file whose refusals are). As securityfs,
        permissions are checked at open, for the opener: a descriptor root opened still
        writes after a setuid()."""
        if node.is_dir:
            raise SecurityfsError(errno.EISDIR, f"{node.name} is a directory")
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing and node.writers is None:
            log.warning("open of %s for writing by pid %d (uid %d) refused: it is read-only",
                        node.name, caller.pid, caller.uid)
            raise SecurityfsError(errno.EACCES, f"{node.name} is read-only")
        if writing and node.writers == "root" and caller.uid != 0:
            # the kernel's default_permissions lets through a caller with
            # CAP_DAC_OVERRIDE: the check that counts is this one, on the opener's uid
            msg = f"uid {caller.uid} may not write {node.name}: only uid 0 writes it"
            log.warning("open of %s in namespace %s for writing by pid %d refused: %s",
                        node.name, ns.path, caller.pid, msg)
            if node.rejected:
                self.engine.audit.record(node.rejected, ns=ns.path, pid=caller.pid,
                                         uid=caller.uid, error=msg)
            raise SecurityfsError(errno.EACCES, msg)
        if node.root_ns_only and ns.parent is not None:
            # mount-wide counters: they count the host's and the siblings' hashing too
            raise SecurityfsError(errno.EACCES, f"{node.name}: root namespace only")
        if node.entries:
            return node.session(self, node, ns, caller, flags, key=key)
        return node.session(self, node, ns, caller, flags)

    def size(self, node: Node, ns, uid: int, key: int = 0) -> int:
        """The size getattr reports for file ``node`` of ``ns`` (what a read by ``uid``
        would return now: sendfile()/splice stop at i_size on a FUSE file)."""
        if node.is_dir:
            return 0
        if node.entries:
            return node.session.size(self, node, ns, uid, key=key)
        return node.session.size(self, node, ns, uid)

    def entries(self, node: Node, ns) -> dict[str, int]:
        """The files an ``entries`` row stands for in namespace ``ns``: name -> key."""
        return node.session.entries(self, ns)

    def trim(self) -> None:
        """A list read leaves the LMDB pages it touched mapped in the daemon
        (Store.trim): unmap them, so a million-entry list read end to end costs no
        more resident memory than a few reads of it (about 0.1 ms a call)."""
        store = getattr(self.engine, "store", None)
        if store is not None:
            store.trim()
