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
The row says the rest: its mode, who writes it, whether it is only in a process's own
view, whether a write moves the opener, the audit record of a refused write, whether
only the root namespace has it. A row with ``entries`` stands for every file its
directory lists: the session's ``entries(fs, ns)`` gives their names and keys (name ->
key, an int from 1), each file is that row opened with its key
(``digest_lists_loaded/``: one file per loaded list).

**Who may open what** (:meth:`Securityfs.open`, :meth:`Securityfs.target`), as the
kernel's securityfs decides it -- at open, from the opener's capabilities and
namespaces (ima/capability.py), never from its uid alone:

- ``policy``, ``keys``, ``ns-remove``, ``ns-join``, ``digest_list_add``,
  ``digest_list_del``, ``evm``, ``model/control`` of namespace T (``writers="admin"``):
  CAP_SYS_ADMIN in the initial user namespace; or, when T and every namespace between
  the opener's own and T were created from inside (``ns-create``, ``origin`` inside),
  CAP_SYS_ADMIN in the opener's own user namespace. Besides:
    - the root namespace's ``policy``, ``keys``, ``ns-remove``, digest lists, ``evm``
      and ``model/control`` (``root_host``) are written by **the host** only: a process
      of the root namespace whose pid and user namespaces are the daemon's, with
      CAP_SYS_ADMIN. A process of the root namespace in a container (another pid
      namespace, or a user namespace of its own) is not the host, whatever its uid or
      capabilities;
    - the ``policy``, ``keys``, digest lists, ``evm`` and ``model/control`` of a
      namespace made from the host (hook, CLI, control socket: ``origin`` host) are
      never written from within it (``host_given``);
- ``ns-create``, ``query`` and ``digest_query`` (``writers="self"``): CAP_SYS_ADMIN in
  the opener's own user namespace (ns-create only adds rules; query shows the rules and
  digests of the namespace, which the kernel's policy file shows only to CAP_SYS_ADMIN);
- reading: a process sees its own namespace's files, and a descendant's under
  ``namespaces/NAME/``; a process of the root namespace that is not the host sees the
  descendants' files only with CAP_SYS_ADMIN in the initial user namespace (a container
  without a namespace of its own does not read its siblings').

Every refusal is EACCES, one log line and an audit record (``Node.rejected``, else
``control_rejected``).
"""
from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

from imafs.ima.capability import CredsError, creds_of
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
    # who may open it for writing: None (nobody), "admin" (the namespace's
    # administrator), "self" (CAP_SYS_ADMIN in the opener's user namespace)
    writers: str | None = None
    # only in a process's own view, never under namespaces/NAME/ (ns-create or ns-join
    # there would move the opener, an ancestor's process, relative to a namespace not
    # its own)
    own_only: bool = False
    moves_opener: bool = False      # a write moves the process that opened it
    rejected: str | None = None     # the audit record of a refused write (None: none)
    root_ns_only: bool = False      # the root namespace's only (mount-wide counters)
    namespaces: bool = False        # a directory of the child namespaces
    entries: bool = False           # one file per entry session.entries() lists
    root_host: bool = False         # the root namespace's is written by the host only
    host_given: bool = False        # a host-made namespace's is never written from within

    @property
    def is_dir(self) -> bool:
        return self.session is None


TOP, NAMESPACES, PCRS, MODEL = 0, 1, 2, 27
# index -> node; the index is part of the node id fs/control.py gives it: append only
FILES: tuple[Node, ...] = (
    Node("", None, 0o555),
    Node("namespaces", TOP, 0o555, namespaces=True),
    Node("pcrs", TOP, 0o550),
    Node("policy", TOP, 0o600, PolicyFile, writers="admin", rejected="policy_rejected",
         root_host=True, host_given=True),
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
    Node("keys", TOP, 0o600, KeysFile, writers="admin", rejected="key_rejected",
         root_host=True, host_given=True),
    Node("query", TOP, 0o600, QueryFile, writers="self", rejected="query_rejected"),
    Node("ns-create", TOP, 0o600, NsCreate, writers="self", own_only=True,
         moves_opener=True, rejected="ns_create_rejected"),
    Node("ns-remove", TOP, 0o200, NsRemove, writers="admin", rejected="ns_remove_rejected",
         root_host=True),
    Node("stats", TOP, 0o440, Stats, root_ns_only=True),
    Node("ns-join", TOP, 0o200, NsJoin, writers="admin", own_only=True, moves_opener=True,
         rejected="ns_join_rejected"),
    # digest lists (DIGLIM's files; docs/digest-lists.md): who writes add/del as policy
    Node("digest_list_add", TOP, 0o200, DigestListAdd, writers="admin",
         rejected="digest_list_rejected", root_host=True, host_given=True),
    Node("digest_list_del", TOP, 0o200, DigestListDel, writers="admin",
         rejected="digest_list_rejected", root_host=True, host_given=True),
    Node("digest_query", TOP, 0o600, DigestQuery, writers="self",
         rejected="query_rejected"),
    Node("digests_count", TOP, 0o440, DigestsCount),
    Node("digest_lists_loaded", TOP, 0o550),
    Node("", 24, 0o440, LoadedList, entries=True),  # digest_lists_loaded/LABEL
    Node("evm", TOP, 0o660, EvmFile, writers="admin", rejected="evm_rejected",
         root_host=True, host_given=True),
    # the behaviour model (imafs/ima/model_secfs.py; docs/models.md)
    Node("model", TOP, 0o550),
    Node("state", MODEL, 0o440, ModelState),
    Node("measurement", MODEL, 0o440, ModelMeasurement),
    Node("trajectory", MODEL, 0o440, ModelTrajectory),
    Node("forensics", MODEL, 0o440, ModelForensics),
    Node("events", MODEL, 0o440, ModelEvents),
    Node("control", MODEL, 0o200, ModelControl, writers="admin", rejected="model_rejected",
         root_host=True, host_given=True),
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
        self.creds_of = creds_of                # pid -> Creds (capability.py)

    def target(self, pid: int, ns_id: int | None = None):
        """The namespace whose files process ``pid`` sees: its own (``ns_id`` None), or
        namespace ``ns_id`` if it is that namespace or an ancestor of it (EACCES
        otherwise, ENOENT when there is none); a process of the root namespace that is
        not the host sees a descendant's files only with CAP_SYS_ADMIN in the initial
        user namespace."""
        own = self.engine.tree.of_pid(pid)
        if own is None:     # a process we cannot place sees nothing
            self._refuse(None, self.engine.tree.root, pid, None,
                         f"pid {pid} is in no known namespace: it sees no control file")
        if ns_id is None or ns_id == own.id:
            return own
        ns = self.engine.tree.by_id.get(ns_id)
        if ns is None:
            raise SecurityfsError(errno.ENOENT, f"no namespace id {ns_id}")
        if own not in ns.chain():
            self._refuse(None, ns, pid, None, f"namespace {ns.path} is not {own.path} nor "
                                              f"below it")
        if own.parent is None:
            try:
                creds = self.creds_of(pid)
            except CredsError as e:
                raise SecurityfsError(errno.EACCES, e.strerror) from None
            if not (creds.host_namespaces or creds.admin):
                self._refuse(None, ns, pid, None,
                             f"pid {pid} is in the root namespace but not the host "
                             f"({creds.describe()}): it does not read namespace {ns.path}")
        return ns

    def _refuse(self, node: Node | None, ns, pid: int, uid: int | None, msg: str):
        """One log line, one audit record, EACCES."""
        what = "namespaces/" if node is None else node.name
        log.warning("open of %s of namespace %s by pid %d refused: %s", what, ns.path, pid,
                    msg)
        rec = (node.rejected if node is not None else None) or "control_rejected"
        self.engine.audit.record(rec, ns=ns.path, pid=pid, uid=uid, file=what, error=msg)
        raise SecurityfsError(errno.EACCES, msg)

    def may_write(self, node: Node, ns, caller) -> None:
        """Who may open file ``node`` of namespace ``ns`` for writing (see the module);
        raises SecurityfsError (logged, audited) when ``caller`` may not."""
        if node.writers is None:
            self._refuse(node, ns, caller.pid, caller.uid, f"{node.name} is read-only")
        try:
            creds = self.creds_of(caller.pid)
        except CredsError as e:
            self._refuse(node, ns, caller.pid, caller.uid, e.strerror)
        own = self.engine.tree.of_pid(caller.pid)
        if own is None:
            self._refuse(node, ns, caller.pid, caller.uid,
                         f"pid {caller.pid} is in no known namespace")
        who = f"pid {caller.pid} (uid {caller.uid}; {creds.describe()})"
        if node.writers == "self":
            if not creds.sys_admin:
                self._refuse(node, ns, caller.pid, caller.uid,
                             f"{who} may not write {node.name}: it takes CAP_SYS_ADMIN")
            return
        # writers == "admin"
        if ns.parent is None:
            if node.root_host and not (own is ns and creds.host_namespaces and creds.admin):
                self._refuse(node, ns, caller.pid, caller.uid,
                             f"{who} may not write the root namespace's {node.name}: only "
                             f"the host does (a process of the root namespace in the "
                             f"daemon's pid and user namespaces, with CAP_SYS_ADMIN)")
            if not creds.admin:
                self._refuse(node, ns, caller.pid, caller.uid,
                             f"{who} may not write the root namespace's {node.name}: it "
                             f"takes CAP_SYS_ADMIN in the initial user namespace")
            return
        if node.host_given and own is ns and getattr(ns, "origin", "inside") == "host":
            self._refuse(node, ns, caller.pid, caller.uid,
                         f"{who} may not write {node.name} of namespace {ns.path}: it was "
                         f"made from the host, and is never changed from within")
        if creds.admin:
            return
        chain = ns.chain()
        inside = own.parent is not None and own in chain and all(
            getattr(n, "origin", "inside") == "inside" for n in chain[:chain.index(own) + 1])
        if creds.sys_admin and inside:
            return
        self._refuse(node, ns, caller.pid, caller.uid,
                     f"{who} may not write {node.name} of namespace {ns.path}: it takes "
                     f"CAP_SYS_ADMIN in the initial user namespace"
                     + ("" if not creds.sys_admin else ", or being inside a namespace "
                        "created from inside"))

    def open(self, node: Node, ns, caller, flags: int, key: int = 0) -> Session:
        """Who may open what: ``caller`` (a Subject: pid, uid, gid) opens file ``node``
        of namespace ``ns`` (what :meth:`target` gave) with ``flags``. A session, or
        SecurityfsError (logged and audited). As securityfs, permissions are checked at
        open, for the opener: a descriptor opened by a privileged process still writes
        after it dropped its privileges."""
        if node.is_dir:
            raise SecurityfsError(errno.EISDIR, f"{node.name} is a directory")
        writing = flags & os.O_ACCMODE != os.O_RDONLY
        if writing:
            # the kernel's default_permissions lets through a caller with
            # CAP_DAC_OVERRIDE: the check that counts is this one
            self.may_write(node, ns, caller)
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
