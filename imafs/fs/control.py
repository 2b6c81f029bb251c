"""The virtual control directory (``MNT/.imafs/``), like the kernel's securityfs
``/sys/kernel/security/ima/``.

Every process sees its own integrity namespace's files at the top; an ancestor sees
each descendant under ``namespaces/NAME/``. Node ids encode (namespace slot, file):
slot 0 is "the caller's own namespace" (resolved at open from the caller's pid), slot
``id + 1`` a named namespace (checked at open: the caller must be that namespace or
an ancestor). Entries are never cached by the kernel (timeout 0), so two processes of
different namespaces never share a resolved name.

Files are served here; what they say comes from the engine (lists stream from LMDB
with ``read(view, offset, size)``; nothing builds a whole list in memory).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import stat
import threading
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

from imafs.fs import sysio
from imafs.fs.resolve import resolve
from imafs.fs.overlay import CONTROL_BASE
from imafs.ima.binding import Opener
from imafs.ima.engine import AccessDenied, Engine, FileRef, OpenMode, Subject, settle
from imafs.ima.keys import KeyringError, check_certificate, parse_certificate
from imafs.ima.namespaces import NamespaceError
from imafs.ima.policy import MAY_READ, Policy, PolicyError, parse_policy, MAX_POLICY_BYTES
from imafs.ima.record import record_buffer
from imafs.logutil import PrintableLogFilter

log = logging.getLogger("imafs.control")


log.addFilter(PrintableLogFilter())

SLOT = 1024
DIR, FILE = "dir", "file"
MAX_QUERY_BYTES = 4096
MAX_NS_WRITE = 4096             # what one write to ns-create, ns-join or ns-remove may hold
TRIM_EVERY = 256 << 10      # list bytes served between two Store.trim() calls
# rules one namespace's policy may hold: every open is matched against the policy of
# its namespace and of every ancestor, rule by rule (about 1.5 us a rule here)
MAX_POLICY_RULES = 4096
MAX_KEY_BYTES = 64 * 1024       # one certificate (or an unfinished one waiting for more)
MAX_KEYS_WRITE = 1 << 20        # what one write() to keys may hold (FUSE's largest write)
SIGNED_POLICY_REQUIRED = "signed policy file (specified as an absolute pathname) required"

# idx: (name, parent idx, kind, mode)
ENTRIES: dict[int, tuple[str, int | None, str, int]] = {
    0: ("", None, DIR, 0o555),
    1: ("namespaces", 0, DIR, 0o555),
    2: ("pcrs", 0, DIR, 0o550),
    3: ("policy", 0, FILE, 0o600),
    4: ("ascii_runtime_measurements", 0, FILE, 0o440),
    5: ("ascii_runtime_measurements_sha1", 0, FILE, 0o440),
    6: ("ascii_runtime_measurements_sha256", 0, FILE, 0o440),
    7: ("binary_runtime_measurements", 0, FILE, 0o440),
    8: ("binary_runtime_measurements_sha1", 0, FILE, 0o440),
    9: ("binary_runtime_measurements_sha256", 0, FILE, 0o440),
    10: ("runtime_measurements_count", 0, FILE, 0o440),
    11: ("violations", 0, FILE, 0o440),
    12: ("sha1", 2, FILE, 0o440),
    13: ("sha256", 2, FILE, 0o440),
    14: ("keys", 0, FILE, 0o600),
    15: ("query", 0, FILE, 0o600),
    16: ("ns-create", 0, FILE, 0o600),
    17: ("ns-remove", 0, FILE, 0o200),
    18: ("stats", 0, FILE, 0o440),
    19: ("ns-join", 0, FILE, 0o200),
}
CHILDREN: dict[int, dict[bytes, int]] = {}
for _i, (_name, _parent, _kind, _mode) in ENTRIES.items():
    if _parent is not None:
        CHILDREN.setdefault(_parent, {})[_name.encode()] = _i
# Only in a process's own view (slot 0): ns-create or ns-join under namespaces/NAME/
# would move the opener, an ancestor's process, relative to a namespace not its own.
OWN_ONLY = {16, 19}
# files whose writes move their opener (see Opener): one move per open
MOVERS = ("ns-create", "ns-join")
WRITABLE = ("policy", "keys", "query", "ns-create", "ns-remove", "ns-join")
# the audit record of a refused write to each of them (query's are not audited)
_REJECTED = {"policy": "policy_rejected", "keys": "key_rejected",
             "ns-create": "ns_create_rejected", "ns-remove": "ns_remove_rejected",
             "ns-join": "ns_join_rejected"}
ROOT_WRITES = ("policy", "keys", "ns-create", "ns-remove", "ns-join")
# Every other file of one's own view is the namespace's own inode (slot id + 1, the
# same inode as the ancestors' namespaces/NAME/FILE): the kernel keeps file pages per
# inode, and splice/sendfile (busybox cat) read through the page cache even with
# direct_io, so two namespaces must never share a file inode. Each lookup and getattr
# reports a new mtime, so the kernel drops the pages it cached before (auto_inval_data):
# what a reader sees is never older than its open.
VIEWS = {
    "ascii_runtime_measurements": "ascii", "ascii_runtime_measurements_sha1": "ascii_sha1",
    "ascii_runtime_measurements_sha256": "ascii_sha256",
    "binary_runtime_measurements": "binary", "binary_runtime_measurements_sha1": "binary_sha1",
    "binary_runtime_measurements_sha256": "binary_sha256",
}


NS_CREATE_USAGE = """\
Write "NAME [template=T] [hash=ALGO] [appraise=enforce|log|fix|off]" here to create a
child integrity namespace of your own and move the process that opened this file (and
every process it creates afterwards) into it: for "echo NAME > ns-create" that is the
shell itself. One namespace per open. The child starts with an empty policy, an empty
keyring and its own measurement list and PCRs; your namespace's rules still apply to
it. Its files appear here under namespaces/NAME/. Remove it with "NAME" > ns-remove.
"""


class CtlHandle:
    __slots__ = ("name", "ns", "pid", "uid", "gid", "data", "pending", "result", "is_dir",
                 "slot", "idx", "dirty", "rules", "written", "refused", "why", "told",
                 "served", "trimmed", "lines", "opener", "moved")

    def __init__(self, name, ns, ctx, slot, idx, is_dir=False):
        self.name = name
        self.ns = ns
        self.pid, self.uid, self.gid = ctx.pid, ctx.uid, ctx.gid
        self.data: bytes | None = None
        self.pending = bytearray()
        self.result: bytes | None = None
        self.is_dir = is_dir
        self.slot, self.idx = slot, idx
        self.dirty = False
        self.rules: list = []       # policy rules, key changes: applied at flush (close)
        self.written = 0            # bytes written through this open
        self.refused = 0            # a write of this open was refused (its errno): load nothing
        self.why = ""               # ... and why
        self.told = False           # a close has said so (flush of an over-size open)
        self.served = 0             # list bytes read through this open
        self.trimmed = 0            # ... when the store's mapping was last trimmed
        self.lines = 0              # policy lines already parsed through this open
        self.opener: Opener | None = None   # ns-create/ns-join: who a write moves
        self.moved = False          # ns-create/ns-join: this open already moved it


class ControlDir:
    def __init__(self, engine: Engine, overlay, *, mountpoint: str = ""):
        self.engine = engine
        self.overlay = overlay
        self.mountpoint = os.path.realpath(mountpoint) if mountpoint else ""
        self.started = time.time_ns()
        self.last_query: dict[tuple[int, int], bytes] = {}
        self._policy_lock = threading.Lock()
        self._keys_lock = threading.Lock()

    # ------------------------------------------------------------------ nodes
    @staticmethod
    def nodeid(slot: int, idx: int) -> int:
        return CONTROL_BASE + slot * SLOT + idx

    @staticmethod
    def split(nodeid: int) -> tuple[int, int]:
        return divmod(nodeid - CONTROL_BASE, SLOT)

    def _target(self, slot: int, pid: int):
        """The namespace a node of ``slot`` shows to process ``pid``; EACCES when the
        process may not see it (not the namespace itself nor an ancestor)."""
        own = self.engine.tree.of_pid(pid)
        if own is None:
            raise FUSEError(errno.EACCES)   # a process we cannot place sees nothing
        if slot == 0:
            return own
        ns = self.engine.tree.by_id.get(slot - 1)
        if ns is None:
            raise FUSEError(errno.ENOENT)
        if own not in ns.chain():
            raise FUSEError(errno.EACCES)
        return ns

    def _size(self, name: str, ns, uid: int) -> int:
        """The size a file reports. securityfs says 0, but sendfile()/splice (busybox
        cat) stop at i_size on a FUSE file, so report what a read would return now."""
        if ns is None:
            return 0
        if name in VIEWS:
            return ns.mlist.size(VIEWS[name])
        if name == "query":
            return len(self.last_query.get((ns.id, uid), b""))
        h = CtlHandle.__new__(CtlHandle)
        h.name, h.ns, h.uid = name, ns, uid
        data = self._snapshot(h)
        return len(data) if data else 0

    def _attr(self, nodeid: int, ns=None, uid: int = 0) -> pyfuse3.EntryAttributes:
        slot, idx = self.split(nodeid)
        name, parent, kind, mode = ENTRIES[idx]
        a = pyfuse3.EntryAttributes()
        a.st_ino = nodeid
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_mode = (stat.S_IFDIR if kind == DIR else stat.S_IFREG) | mode
        a.st_nlink = 2 if kind == DIR else 1
        a.st_uid = 0
        a.st_gid = 0
        a.st_size = self._size(name, ns, uid) if kind == FILE else 0
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started
        if kind == FILE:
            a.st_mtime_ns = a.st_ctime_ns = max(time.time_ns(), self.started)
        return a

    async def lookup_root(self, ctx):
        return self._attr(self.nodeid(0, 0))

    async def lookup(self, parent_nodeid, name, ctx):
        slot, idx = self.split(parent_nodeid)
        ns = self._target(slot, ctx.pid)
        if name == b".":
            return self._attr(parent_nodeid)
        if idx == 1:  # namespaces/: the children of ns
            if name == b"..":
                return self._attr(self.nodeid(slot, 0))
            child = ns.children.get(os.fsdecode(name))
            if child is None:
                raise FUSEError(errno.ENOENT)
            return self._attr(self.nodeid(child.id + 1, 0))
        if name == b"..":
            parent = ENTRIES[idx][1]
            if parent is None:
                raise FUSEError(errno.ENOENT)  # handled by the overlay for the mount root
            return self._attr(self.nodeid(slot, parent))
        child_idx = CHILDREN.get(idx, {}).get(name)
        if child_idx is None or (slot and child_idx in OWN_ONLY):
            raise FUSEError(errno.ENOENT)
        return self._attr(self.nodeid(self._file_slot(slot, child_idx, ns), child_idx), ns,
                          ctx.uid)

    @staticmethod
    def _file_slot(slot: int, idx: int, ns) -> int:
        """The slot of a node of a directory of ``slot``: a file of one's own view is
        the namespace's own (see OWN_ONLY)."""
        if slot == 0 and ENTRIES[idx][2] == FILE and idx not in OWN_ONLY:
            return ns.id + 1
        return slot

    def forget(self, nodeid, n) -> None:
        pass

    async def getattr(self, nodeid, ctx):
        slot, idx = self.split(nodeid)
        if idx not in ENTRIES or (slot and idx in OWN_ONLY):
            raise FUSEError(errno.ENOENT)
        ns = self._target(slot, ctx.pid)
        return self._attr(nodeid, ns, ctx.uid)

    async def setattr(self, nodeid, attr, fields, fh, ctx):
        # truncation of a control file (O_TRUNC from a shell redirect) is a no-op
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise FUSEError(errno.EPERM)
        return await self.getattr(nodeid, ctx)

    # ------------------------------------------------------------------ files
    async def open(self, nodeid, flags, ctx):
        slot, idx = self.split(nodeid)
        if idx not in ENTRIES or ENTRIES[idx][2] != FILE:
            raise FUSEError(errno.EISDIR)
        if slot and idx in OWN_ONLY:
            raise FUSEError(errno.ENOENT)
        ns = self._target(slot, ctx.pid)
        name = ENTRIES[idx][0]
        acc = flags & os.O_ACCMODE
        writing = acc != os.O_RDONLY
        if writing and name not in WRITABLE:
            log.warning("open of %s for writing by pid %d (uid %d) refused: it is read-only",
                        name, ctx.pid, ctx.uid)
            raise FUSEError(errno.EACCES)
        if writing and name in ROOT_WRITES and ctx.uid != 0:
            # the kernel's default_permissions lets through a caller with
            # CAP_DAC_OVERRIDE: the check that counts is this one, on the opener's uid
            # (as securityfs, permissions are checked at open, for the opener)
            msg = f"uid {ctx.uid} may not write {name}: only uid 0 writes it"
            log.warning("open of %s in namespace %s for writing by pid %d refused: %s",
                        name, ns.path, ctx.pid, msg)
            self.engine.audit.record(_REJECTED[name], ns=ns.path, pid=ctx.pid, uid=ctx.uid,
                                     error=msg)
            raise FUSEError(errno.EACCES)
        if name == "stats" and ns.parent is not None:
            # mount-wide counters: they count the host's and the siblings' hashing too
            raise FUSEError(errno.EACCES)
        h = CtlHandle(name, ns, ctx, slot, idx)
        if writing and name in MOVERS:
            # the process a write will move: the opener (a write request has no
            # caller), held by a pidfd so that a reused pid is never taken for it
            h.opener = Opener(ctx.pid)
        if acc != os.O_WRONLY:
            h.data = await trio.to_thread.run_sync(self._snapshot, h)
        return h

    def _snapshot(self, h: CtlHandle) -> bytes | None:
        """Contents of small files, taken at open (lists are read in place)."""
        ns = h.ns
        if h.name in VIEWS:
            return None
        if h.name == "policy":
            return ns.policy.text().encode()
        if h.name == "runtime_measurements_count":
            return f"{ns.mlist.count}\n".encode()
        if h.name == "violations":
            return f"{ns.mlist.violations}\n".encode()
        if h.name in ("sha1", "sha256"):
            return ns.mlist.pcrs_text(h.name).encode()
        if h.name == "keys":
            return ns.keyring.list_text().encode()
        if h.name == "query":
            return self.last_query.get((ns.id, h.uid), b"")
        if h.name == "ns-create":
            return NS_CREATE_USAGE.encode()
        if h.name == "stats":
            # the engine's hashing counters (mount-wide, not per namespace)
            return (json.dumps(self.engine.stats(), sort_keys=True) + "\n").encode()
        return b""

    async def read(self, h: CtlHandle, off: int, size: int):
        if h.is_dir:
            raise FUSEError(errno.EISDIR)
        if h.name in VIEWS:
            view = VIEWS[h.name]
            return await trio.to_thread.run_sync(self._read_list, h, view, off, size)
        data = h.result if (h.name == "query" and h.result is not None) else h.data
        if data is None:
            raise FUSEError(errno.EBADF)
        return data[off:off + size]

    async def write(self, h: CtlHandle, off: int, buf: bytes) -> int:
        if h.name == "policy":
            return await trio.to_thread.run_sync(self._write_policy, h, bytes(buf))
        if h.name == "keys":
            return await trio.to_thread.run_sync(self._write_keys, h, bytes(buf), False)
        if h.name == "query":
            return await trio.to_thread.run_sync(self._write_query, h, bytes(buf))
        if h.name in ("ns-create", "ns-remove", "ns-join"):
            return await trio.to_thread.run_sync(self._write_ns, h, bytes(buf))
        raise FUSEError(errno.EACCES)

    async def flush(self, h: CtlHandle) -> None:
        if h.name in ("policy", "keys") and h.refused == errno.EFBIG:
            # over the size limit: the write(2) that crossed it may well have returned
            # a short count (the kernel reports what it passed on before the refusal),
            # so the close says it too. (Other refusals leave close(2) succeeding, as
            # the kernel's release of the policy file does: a later write on the open
            # fails, and a tool that retries the short write sees it.)
            if not h.told:
                h.told = True
                log.warning("%s open by pid %d in namespace %s closed with nothing %s: %s",
                            h.name, h.pid, h.ns.path,
                            "loaded" if h.name == "policy" else "applied", h.why)
            raise FUSEError(errno.EFBIG)
        if h.name == "policy":
            if h.pending and not h.refused:
                await trio.to_thread.run_sync(self._write_policy, h, b"\n", True)
            if h.rules:
                await trio.to_thread.run_sync(self._load_policy, h)
        elif h.name == "keys" and (h.pending or h.rules) and not h.refused:
            await trio.to_thread.run_sync(self._write_keys, h, b"", True)

    async def release(self, h: CtlHandle) -> None:
        try:
            if not h.refused:       # a refused open loads nothing, and its close told
                await self.flush(h)
        except FUSEError:
            pass
        finally:
            if h.opener is not None:
                h.opener.close()
                h.opener = None
        if h.served > h.trimmed:
            await trio.to_thread.run_sync(self._trim)

    def _read_list(self, h: CtlHandle, view: str, off: int, size: int) -> bytes:
        data = h.ns.mlist.read(view, off, size)
        h.served += len(data)
        if h.served - h.trimmed >= TRIM_EVERY:
            h.trimmed = h.served
            self._trim()
        return data

    def _trim(self) -> None:
        """A list read leaves the LMDB pages it touched mapped in the daemon
        (Store.trim): unmap them, so a million-entry list read end to end costs no
        more resident memory than a few reads of it (about 0.1 ms a call)."""
        store = getattr(self.engine, "store", None)
        if store is not None:
            store.trim()

    # --- policy: as the kernel's securityfs file, rules written through one open are
    # parsed as they come (a bad line fails its write with EINVAL) and loaded together
    # when the file is closed (flush), only if no write of that open was refused.  The
    # kernel splits a large write(2) into FUSE writes, so "the whole write" can only
    # be the whole open.  Over MAX_POLICY_BYTES through one open, or a policy over
    # MAX_POLICY_RULES rules: EFBIG.  A partial last line waits for the next write.
    # Line numbers in errors count from the first byte written through the open.
    # As the kernel's ima_write_policy: once the namespace's policy appraises
    # POLICY_CHECK (IMA_APPRAISE_POLICY), rules are taken only from a policy file
    # named by its absolute path (appraised as POLICY_CHECK); text is EACCES.
    def _refuse_policy(self, h: CtlHandle, err: int, msg: str, **extra):
        h.pending.clear()
        h.rules.clear()
        if not h.refused:
            h.refused, h.why = err, msg
        log.warning("policy write to namespace %s rejected (pid %d): %s", h.ns.path, h.pid, msg)
        self.engine.audit.record("policy_rejected", ns=h.ns.path, pid=h.pid, uid=h.uid,
                                 error=msg, **extra)
        raise FUSEError(err)

    def _write_policy(self, h: CtlHandle, buf: bytes, final: bool = False) -> int:
        """``final``: the newline flush adds to end a last line written without one
        (not the writer's: it does not count against the size limit)."""
        if h.refused:
            self._refuse_policy(h, h.refused, _after_refusal(h), cause="earlier refusal")
        if not final:
            h.written += len(buf)
        if h.written > MAX_POLICY_BYTES:
            self._refuse_policy(h, errno.EFBIG, f"over {MAX_POLICY_BYTES} bytes written "
                                                f"through one open")
        data = bytes(h.pending) + buf
        cut = data.rfind(b"\n")
        if cut < 0:
            h.pending[:] = data
            return len(buf)
        complete, rest = data[:cut + 1], data[cut + 1:]
        stripped = complete.strip()
        try:
            if stripped.startswith(b"/") and b"\n" not in stripped:
                rules = self._policy_from_file(h, os.fsdecode(stripped))
            elif stripped and _appraises_policy(h.ns.policy):
                self._refuse_policy(h, errno.EACCES, SIGNED_POLICY_REQUIRED,
                                    cause="signed policy required")
            else:
                rules = parse_policy(complete)
        except _PolicyDenied as e:
            self._refuse_policy(h, e.errno, str(e), cause="policy file refused")
        except PolicyError as e:
            if e.line and not e.source:       # a line of this write: count from the open
                e = PolicyError(e.msg, e.line + h.lines, e.col)
            self._refuse_policy(h, errno.EINVAL, str(e))
        h.lines += complete.count(b"\n")
        h.pending[:] = rest
        if len(h.ns.policy) + len(h.rules) + len(rules) > MAX_POLICY_RULES:
            self._refuse_policy(h, errno.EFBIG, f"a policy holds at most {MAX_POLICY_RULES} rules")
        h.rules.extend(rules)
        return len(buf)

    def _load_policy(self, h: CtlHandle) -> None:
        """Append the rules written through ``h`` to its namespace's policy: stored
        first, then in force (a state that cannot be written -- a full disk -- leaves
        the old policy in place: EIO)."""
        rules, h.rules = h.rules, []
        if h.refused or not rules:
            return
        ns = h.ns
        with self._policy_lock:
            if len(ns.policy) + len(rules) > MAX_POLICY_RULES:
                self._refuse_policy(h, errno.EFBIG,
                                    f"a policy holds at most {MAX_POLICY_RULES} rules")
            old = ns.policy
            ns.set_policy(Policy(list(old.rules) + rules))
            try:
                self.engine.tree.save_policy(ns)
            except Exception as e:  # noqa: BLE001 - lmdb.Error: keep the old policy
                ns.set_policy(old)
                log.error("policy of namespace %s not changed: cannot store it: %s", ns.path, e)
                self.engine.audit.record("policy_rejected", ns=ns.path, pid=h.pid, uid=h.uid,
                                         error=f"cannot store the policy: {e}")
                raise FUSEError(errno.EIO)
        self.engine.audit.record("policy_update", ns=ns.path, pid=h.pid, uid=h.uid,
                                 rules=len(rules), total=len(ns.policy))
        log.info("namespace %s: %d rule(s) added by pid %d (%d in all)", ns.path,
                 len(rules), h.pid, len(ns.policy))

    def _policy_from_file(self, h: CtlHandle, path: str):
        """A policy loaded by path (inside the mount), measured and appraised as
        POLICY_CHECK by the policies of the namespace it is loaded into and of its
        ancestors (the writer's own namespace is one of them); a refused appraisal is
        EACCES, as the kernel's ima_read_policy."""
        try:
            f, fd = self._open_in_mount(path)
        except OSError as e:
            raise PolicyError(f"{path}: {e.strerror}") from None
        size = f.st.st_size
        if size > MAX_POLICY_BYTES:     # before anything hashes it
            os.close(fd)
            raise _PolicyDenied(f"{path}: policy file over {MAX_POLICY_BYTES} bytes "
                                f"({size})", errno.EFBIG)
        state = None
        try:
            with self.engine.tree.acting_as(h.pid, h.ns):
                state = settle(self.engine.file_open(Subject(h.pid, h.uid, h.gid), f,
                                                     OpenMode(),
                                                     funcs=[("POLICY_CHECK", MAY_READ)]))
            text = os.pread(fd, size, 0)
        except AccessDenied as e:        # appraisal (EACCES), a list that is full (EIO)
            raise _PolicyDenied(f"{path}: {e}", e.errno) from None
        except OSError as e:
            raise PolicyError(f"{path}: {e.strerror}")
        except Exception as e:  # noqa: BLE001 - any other refusal
            raise PolicyError(f"{path}: {e}")
        finally:
            if state is not None:     # a reader no more (ToMToU, open_writers)
                self.engine.file_release(state)
            os.close(fd)
        try:
            return parse_policy(text)
        except PolicyError as e:
            raise e.with_source(path)

    # --- namespaces: "NAME [template=T] [hash=H] [appraise=M]" / "NAME" / "PATH"
    # ns-create and ns-join move the process that opened the file (Opener): a FUSE
    # write has no caller. One move per open; a write is refused (EPERM) when the
    # opener has exited (or is exiting) or is no longer in the namespace it was in at
    # open -- else a second write through a kept descriptor, or one by a child on an
    # inherited descriptor after its parent exited and its pid was reused, would
    # move a process out of its namespace or move an unrelated one.
    def _write_ns(self, h: CtlHandle, buf: bytes) -> int:
        text = buf.decode("utf-8", "replace").strip()
        try:
            if len(buf) > MAX_NS_WRITE:
                raise NamespaceError(errno.EINVAL, f"over {MAX_NS_WRITE} bytes written "
                                                   f"({len(buf)})")
            if b"\0" in buf:
                raise NamespaceError(errno.EINVAL, f"a NUL byte in {_quote(buf)}")
            if h.name in MOVERS and h.moved:
                raise NamespaceError(errno.EINVAL, f"this open of {h.name} has already moved "
                                                   f"its opener (pid {h.pid}); open it again")
            if h.name == "ns-create":
                ns = self._create_ns(h, text)
                log.info("namespace %s (id %d) created; pid %d moved into it", ns.path, ns.id,
                         h.pid)
            elif h.name == "ns-join":
                ns = self._join_ns(h, text)
                log.info("pid %d joined namespace %s (id %d) from %s", h.pid, ns.path, ns.id,
                         h.ns.path)
            else:
                ns = self.engine.tree.ns_remove(h.ns, text, h.pid, h.uid)
                log.info("namespace %s (id %d) removed by pid %d", ns.path, ns.id, h.pid)
        except NamespaceError as e:
            log.warning("%s by pid %d refused: %s", h.name, h.pid, e)
            self.engine.audit.record(h.name.replace("-", "_") + "_rejected", ns=h.ns.path,
                                     pid=h.pid, uid=h.uid, error=str(e))
            raise FUSEError(e.errno)
        return len(buf)

    def _check_opener(self, h: CtlHandle) -> None:
        """The opener may still be moved: it exists, is not exiting, and is in the
        namespace it was in at open (read afresh). Nothing to check without a binder
        (no process is moved then)."""
        binder = self.engine.tree.binder
        if binder is None:
            return
        op = h.opener
        if op is None or not op.alive():
            raise NamespaceError(errno.EPERM, f"the process that opened {h.name} (pid "
                                              f"{h.pid}) has exited: nobody to move")
        now = binder.read_ns(op.pid)
        if not op.alive():
            raise NamespaceError(errno.EPERM, f"the process that opened {h.name} (pid "
                                              f"{h.pid}) has exited: nobody to move")
        if now != h.ns.id:
            where = "an unknown namespace" if now is None else (
                self.engine.tree.by_id[now].path if now in self.engine.tree.by_id
                else f"namespace id {now}")
            raise NamespaceError(errno.EPERM, f"the process that opened {h.name} (pid "
                                              f"{h.pid}) has left namespace {h.ns.path} "
                                              f"(it is in {where})")

    def _bind_opener(self, h: CtlHandle, ns) -> None:
        """Move the opener into ns; BindingError-like exceptions when it did not move."""
        binder = self.engine.tree.binder
        if binder is None:
            return
        binder.bind(h.opener.pid, ns.id)     # checks that it is there
        if not h.opener.alive():
            raise OSError(errno.ESRCH, f"pid {h.pid} exited while it was moved")

    def _create_ns(self, h: CtlHandle, text: str):
        """ns-create: a child of the opener's namespace (h.ns); the opener moves into it
        (NamespaceTree.ns_create records it first, and removes it again when the
        opener cannot be moved)."""
        child = self.engine.tree.ns_create(
            h.ns, text, h.pid, h.uid, check=lambda: self._check_opener(h),
            bind=lambda c: self._bind_opener(h, c))
        h.moved = True
        return child

    def _join_ns(self, h: CtlHandle, text: str):
        """ns-join: move the opener into an existing descendant of its namespace (only
        deeper), recorded first in that namespace's parent's list (``ns-join``); a move
        that fails after that is recorded too (``ns-join-failed``)."""
        eng = self.engine
        target = eng.tree.descendant(h.ns, text)
        self._check_opener(h)
        data = (f"ns-join name={target.path} id={target.id} uuid={getattr(target, 'uuid', '')} "
                f"from={h.ns.path}").encode()
        try:
            record_buffer(target.parent, "ns-join", data)
        except Exception as e:  # noqa: BLE001 - fail closed: nobody moves unrecorded
            raise NamespaceError(errno.EIO, f"cannot record the join of {target.path}: "
                                            f"{e}") from None
        try:
            self._bind_opener(h, target)
        except Exception as e:  # noqa: BLE001 - BindingError, OSError
            try:
                record_buffer(target.parent, "ns-join-failed",
                              data.replace(b"ns-join ", b"ns-join-failed ", 1))
            except Exception as e2:  # noqa: BLE001
                log.error("cannot record the failed join of %s: %s", target.path, e2)
            raise NamespaceError(errno.EPERM, str(e)) from None
        h.moved = True
        eng.audit.record("ns_join", ns=h.ns.path, target=target.path, id=target.id,
                         pid=h.pid, uid=h.uid)
        return target

    # --- keys: certificates (DER -- several concatenated, each cut by its length
    # header --, PEM -- a bundle of several, also after text as ``openssl x509 -text``
    # prints it --), lines "/PATH" (a certificate file inside the mount, which may
    # hold several) and "remove KEYID [SHA256]". As the policy file: what one open
    # writes is checked as it comes (a certificate the keyring would refuse, a path
    # that cannot be read, a key that is not there: that write() fails with EINVAL,
    # the reason in the log and audit log, and nothing of the open is applied) and
    # applied when the file is closed, all of it or nothing. The kernel cuts a large
    # write(2) into several FUSE writes, and shells write line by line (bash's
    # printf), so one write could not be the unit. A certificate cut across writes
    # is taken when it is complete; what is still incomplete at close is refused.
    def _write_keys(self, h: CtlHandle, buf: bytes, final: bool) -> int:
        if h.refused:
            return self._key_error(h, _after_refusal(h), h.refused)
        h.written += len(buf)
        if h.written > MAX_KEYS_WRITE:
            return self._key_error(h, f"over {MAX_KEYS_WRITE} bytes written through one "
                                      f"open", errno.EFBIG)
        data = bytes(h.pending) + buf
        h.pending.clear()
        try:
            items, rest = _key_items(data, final)
        except _KeyInput as e:
            return self._key_error(h, str(e), e.errno)
        if len(rest) > MAX_KEY_BYTES:
            return self._key_error(h, f"an incomplete certificate of over {MAX_KEY_BYTES} "
                                      f"bytes", errno.EFBIG)
        if items:
            self._stage_keys(h, items)
        h.pending[:] = rest
        if final:
            self._commit_keys(h)
        return len(buf)

    def _present(self, h: CtlHandle, ops) -> dict:
        """The namespace's keys (fingerprint -> KeyInfo) once ``ops`` are applied; a
        removal that finds nothing to remove is a _KeyInput."""
        present = {k.fingerprint: k for k in h.ns.keyring}
        for op in ops:
            if op[0] == "add":
                present[op[1].fingerprint] = op[1]
            else:
                _, keyid, fp = op
                victims = [k for k in present.values() if k.keyid == keyid
                           and (fp is None or k.fingerprint == fp)]
                if not victims:
                    what = f"{keyid:08x}" + (f" with sha256 {fp.hex()}" if fp else "")
                    raise _KeyInput(f"remove {what}: no such key in namespace {h.ns.path}")
                for k in victims:
                    del present[k.fingerprint]
        return present

    def _stage_keys(self, h: CtlHandle, items) -> None:
        """Check the items one write completed; they join the open's changes."""
        ring = h.ns.keyring
        certs = sum(1 for kind, _ in items if kind == "cert")
        ops = []
        several = len(items) > 1 or bool(h.rules)
        n = 0
        for kind, val in items:
            if kind == "remove":
                ops.append(("remove", val[0], val[1]))
                continue
            if kind == "cert":
                n += 1
                blobs = [(val, f" (certificate {n} of {certs} in this write)"
                          if certs > 1 else "")]
            else:
                blobs = self._certs_of_file(h, val)
                several = several or len(blobs) > 1
            for blob, where in blobs:
                try:
                    info = check_certificate(parse_certificate(blob),
                                             require_digsig=ring.require_digsig)
                except (KeyringError, ValueError) as e:
                    self._key_error(h, f"{e}{where}" + (_NOTHING if several else ""))
                ops.append(("add", info))
        try:
            self._present(h, h.rules + ops)
        except _KeyInput as e:
            self._key_error(h, str(e) + (_NOTHING if several else ""))
        h.rules.extend(ops)

    def _commit_keys(self, h: CtlHandle) -> None:
        """At close: apply the open's changes together, checked again against the
        keyring as it is now; a store that fails half-way is undone (EIO)."""
        ops, h.rules = h.rules, []
        if not ops or h.refused:
            return
        ring = h.ns.keyring
        with self._keys_lock:
            try:
                self._present(h, ops)
            except _KeyInput as e:      # another open removed it meanwhile
                self._key_error(h, f"{e}" + (_NOTHING if len(ops) > 1 else ""))
            done = []
            try:
                for op in ops:
                    if op[0] == "add":
                        info = op[1]
                        new = all(k.fingerprint != info.fingerprint
                                  for k in ring.lookup(info.keyid))
                        ring.add(info.der)
                        if new:
                            done.append(("add", info))
                    else:
                        _, keyid, fp = op
                        gone = [k for k in ring.lookup(keyid)
                                if fp is None or k.fingerprint == fp]
                        if gone:
                            ring.remove(keyid, fp)
                            done.append(("remove", gone))
            except Exception as e:  # noqa: BLE001 - lmdb.Error (a full disk): undo
                for op in reversed(done):
                    try:
                        if op[0] == "add":
                            ring.remove(op[1].keyid, op[1].fingerprint)
                        else:
                            for k in op[1]:
                                ring.add(k.der)
                    except Exception:  # noqa: BLE001
                        pass
                self._key_error(h, f"keys not changed: cannot store them: {e}", errno.EIO)
        for op in done:
            if op[0] == "add":
                info = op[1]
                self.engine.audit.record("key_added", ns=h.ns.path, pid=h.pid, uid=h.uid,
                                         keyid=f"{info.keyid:08x}", subject=info.subject)
                log.info("namespace %s: key %08x added (%s)", h.ns.path, info.keyid,
                         info.subject)
            else:
                for k in op[1]:
                    self.engine.audit.record("key_removed", ns=h.ns.path, pid=h.pid,
                                             uid=h.uid, keyid=f"{k.keyid:08x}",
                                             subject=k.subject,
                                             fingerprint=k.fingerprint.hex())
                    log.info("namespace %s: key %08x removed (%s)", h.ns.path, k.keyid,
                             k.subject)

    def _certs_of_file(self, h: CtlHandle, raw: bytes) -> list[tuple[bytes, str]]:
        """The certificates of a file named in a keys write (DER, several DER, PEM or a
        PEM bundle), each with where it came from; refusals name the file."""
        path = os.fsdecode(raw)
        try:
            f, fd = self._open_in_mount(path)
            try:
                if f.st.st_size > MAX_KEYS_WRITE:
                    raise OSError(errno.EFBIG, f"over {MAX_KEYS_WRITE} bytes")
                data = os.pread(fd, MAX_KEYS_WRITE, 0)
            finally:
                os.close(fd)
        except OSError as e:
            self._key_error(h, f"{path}: {e.strerror}")
        try:
            items, _ = _key_items(data, True, commands=False)
        except _KeyInput as e:
            self._key_error(h, f"{path}: {e}")
        if not items:
            self._key_error(h, f"{path}: no certificate in it")
        if len(items) == 1:
            return [(items[0][1], f" ({path})")]
        return [(v, f" ({path}, certificate {i} of {len(items)})")
                for i, (_, v) in enumerate(items, 1)]

    def _key_error(self, h: CtlHandle, msg: str, err: int = errno.EINVAL):
        h.pending.clear()
        h.rules.clear()
        if not h.refused:
            h.refused, h.why = err, msg
        log.warning("key write to namespace %s rejected (pid %d): %s", h.ns.path, h.pid, msg)
        self.engine.audit.record("key_rejected", ns=h.ns.path, pid=h.pid, uid=h.uid, error=msg)
        raise FUSEError(err)

    # --- query: write a path, read what the engine decided and why
    def _query_error(self, h: CtlHandle, msg: str, err: int = errno.EINVAL):
        """A refused query write: one log line (queries are not audited)."""
        log.warning("query write to namespace %s rejected (pid %d): %s", h.ns.path, h.pid, msg)
        raise FUSEError(err)

    def _write_query(self, h: CtlHandle, buf: bytes) -> int:
        """One path (``exec PATH``: as executed) per write, on one line; a missing
        final newline is fine (printf). The answer is read back from the file."""
        if len(buf) > MAX_QUERY_BYTES:
            self._query_error(h, f"over {MAX_QUERY_BYTES} bytes written ({len(buf)}): "
                                 f"write one path inside the mount")
        given = [ln for ln in buf.split(b"\n") if ln.strip()]
        if not given:
            self._query_error(h, "nothing to query: write a path inside the mount, or "
                                 "'exec PATH'")
        if len(given) > 1:
            self._query_error(h, f"one path per write, got {len(given)} lines: "
                                 f"{_quote(buf)}")
        words = given[0].split()
        exec_ = False
        if words[0] == b"exec" and len(words) == 2:
            exec_, words = True, words[1:]
        if len(words) != 1:
            self._query_error(h, f"expected PATH or 'exec PATH', got {len(words)} words: "
                                 f"{_quote(given[0])}")
        path = os.fsdecode(words[0])
        try:
            f, fd = self._open_in_mount(path)
        except OSError as e:
            if e.errno == errno.EINVAL:       # not a path we answer for (not a file)
                self._query_error(h, f"{path}: {e.strerror}")
            result = {"path": path, "error": e.strerror}
        else:
            try:
                result = _own_view(self.engine.explain(Subject(h.pid, h.uid, h.gid), f,
                                                       exec_=exec_))
            except OSError as e:
                result = {"path": path, "error": e.strerror}
            finally:
                os.close(fd)
        out = (json.dumps(result, indent=2, default=str) + "\n").encode()
        h.result = out
        self.last_query[(h.ns.id, h.uid)] = out
        return len(buf)

    def _open_in_mount(self, path: str) -> tuple[FileRef, int]:
        """Open a path of the mount (absolute in the mount, or a host path below the
        mount point) read-only, resolving symlinks inside the mount only."""
        if self.mountpoint and (path == self.mountpoint or path.startswith(self.mountpoint + "/")):
            path = path[len(self.mountpoint):] or "/"
        if not path.startswith("/"):
            raise OSError(errno.EINVAL, "path must be absolute (inside the mount)")
        if "\0" in path:
            raise OSError(errno.EINVAL, "path contains a NUL byte")
        # Only a regular file is opened (a FIFO's open would wait for a writer forever,
        # a device's read may never end): the type is read from the O_PATH descriptor
        # the resolver returns, and the file is opened through it -- the same inode,
        # no second lookup by name -- non-blocking, and checked again.
        node_fd, rel = resolve(self.overlay.root.fd, path)
        try:
            _regular(os.fstat(node_fd))
            fd = os.open(sysio.proc_path(node_fd), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        finally:
            os.close(node_fd)
        try:
            st = _regular(os.fstat(fd))
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        p = sysio.proc_path(fd)

        def getxattr(name):
            try:
                return os.getxattr(p, name)
            except OSError:
                return None
        f = FileRef(fd=fd, st=st, path=rel.encode(), readable=True,
                    reopen=lambda: os.open(p, os.O_RDONLY | os.O_CLOEXEC),
                    getxattr=getxattr, setxattr=lambda n, v: os.setxattr(p, n, v),
                    fs=sysio.fs_info(fd, st.st_dev),
                    generation=sysio.generation(fd, st.st_dev))
        return f, fd

    # ------------------------------------------------------------------ directories
    async def opendir(self, nodeid, ctx):
        slot, idx = self.split(nodeid)
        if idx not in ENTRIES or ENTRIES[idx][2] != DIR:
            raise FUSEError(errno.ENOTDIR)
        ns = self._target(slot, ctx.pid)
        return CtlHandle(ENTRIES[idx][0], ns, ctx, slot, idx, is_dir=True)

    async def readdir(self, h: CtlHandle, start_id: int, token) -> None:
        if h.idx == 1:
            names = [(n.encode(), self.nodeid(c.id + 1, 0))
                     for n, c in sorted(h.ns.children.items())]
        else:
            names = [(n, self.nodeid(self._file_slot(h.slot, i, h.ns), i))
                     for n, i in CHILDREN.get(h.idx, {}).items()
                     if not (h.slot and i in OWN_ONLY)]
        for i in range(start_id, len(names)):
            name, nodeid = names[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(nodeid), i + 1):
                return


class _PolicyDenied(Exception):
    """A policy file the engine refused to open (its POLICY_CHECK appraisal)."""

    def __init__(self, msg: str, err: int):
        super().__init__(msg)
        self.errno = err or errno.EACCES


def _appraises_policy(policy) -> bool:
    """The kernel's IMA_APPRAISE_POLICY: some rule appraises POLICY_CHECK."""
    return any(r.action == "appraise" and r.func == "POLICY_CHECK" for r in policy.rules)


def _own_view(result: dict) -> dict:
    """What a query may tell: everything about the caller's own namespace; of each
    ancestor only whether its appraisal lets the access through. The ancestors'
    rules, labels and measurements are theirs (a child never reads its parent's
    policy or list), and the caller learns the verdict anyway by trying."""
    own = result.get("namespace")
    out = []
    for entry in result.get("namespaces", ()):
        if entry.get("namespace") == own:
            out.append(entry)
            continue
        allowed = all((hk.get("appraisal") or {}).get("allowed", True)
                      for hk in entry.get("hooks", ()))
        out.append({"namespace": entry.get("namespace"), "ancestor": True, "allowed": allowed})
    if "namespaces" in result:
        result["namespaces"] = out
    return result


_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFDIR: "a directory",
         stat.S_IFLNK: "a symbolic link"}


def _regular(st: os.stat_result) -> os.stat_result:
    """``st`` when it is a regular file's; else OSError(EINVAL) saying what it is (as
    the kernel's kernel_read_file refuses a policy file that is not regular)."""
    if not stat.S_ISREG(st.st_mode):
        kind = _KIND.get(stat.S_IFMT(st.st_mode), "of an unknown type")
        raise OSError(errno.EINVAL, f"not a regular file ({kind})")
    return st


def _quote(data: bytes, limit: int = 200) -> str:
    """What a writer sent, for a log line: quoted, cut at ``limit`` characters (the
    log's filter escapes what is not printable)."""
    text = bytes(data).decode("utf-8", "surrogateescape")
    return "'" + (text if len(text) <= limit else text[:limit] + "...") + "'"


def _after_refusal(h: CtlHandle) -> str:
    return (f"an earlier write through this open was refused ({h.why}); nothing of "
            f"this open is {'loaded' if h.name == 'policy' else 'applied'}")


class _KeyInput(ValueError):
    """Bytes written to keys that are no certificate, path or command."""

    def __init__(self, msg: str, err: int = errno.EINVAL):
        super().__init__(msg)
        self.errno = err


_NOTHING = "; nothing written through this open is applied"
_PEM_BEGIN, _PEM_END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
_SPACE = b" \t\r\n\v\f"


def _key_items(data: bytes, final: bool, *, commands: bool = True):
    """Cut what was written to keys into items: ("cert", DER or PEM bytes), ("path",
    bytes) and ("remove", (keyid, sha256 fingerprint or None)); returns (items, the
    incomplete rest). ``final``: nothing more will come (close), so an incomplete item
    is an error; ``commands``: path and remove lines are allowed (not in a file)."""
    items = []
    pos, n = 0, len(data)
    while True:
        while pos < n and data[pos] in _SPACE:
            pos += 1
        if pos >= n:
            return items, b""
        c = data[pos]
        if c == 0x30:                                  # DER: a SEQUENCE
            total = _der_total(data, pos)
            if total is not None and total > MAX_KEY_BYTES:
                raise _KeyInput(f"a DER certificate of {total} bytes (at most "
                                f"{MAX_KEY_BYTES})", errno.EFBIG)
            if total is None or pos + total > n:
                if final:
                    have = n - pos
                    raise _KeyInput("truncated DER certificate" +
                                    (f" ({have} of {total} bytes)" if total else ""))
                return items, data[pos:]
            items.append(("cert", data[pos:pos + total]))
            pos += total
            continue
        if commands and (c == 0x2F or (data.startswith(b"remove", pos) and (
                pos + 6 == n or data[pos + 6] in _SPACE))):
            nl = data.find(b"\n", pos)
            if nl < 0 and not final:
                return items, data[pos:]
            line = data[pos:nl if nl >= 0 else n].strip()
            pos = nl + 1 if nl >= 0 else n
            items.append(("path", line) if c == 0x2F else ("remove", _parse_remove(line)))
            continue
        # PEM, maybe after text (``openssl x509 -text``) or other PEM blocks
        b = data.find(_PEM_BEGIN, pos)
        if b < 0:
            rest = data[pos:]
            if b"-----END " in rest or final or b"\n" in rest or not _texty(rest):
                kinds = sorted({ln.strip()[11:-5].decode("ascii", "replace")
                                for ln in rest.splitlines() if ln.startswith(b"-----BEGIN ")})
                if kinds:
                    raise _KeyInput(f"PEM data holds no CERTIFICATE block (found: "
                                    f"{', '.join(kinds)})")
                raise _KeyInput("expected a DER or PEM certificate" +
                                (", the path of one, or 'remove KEYID [SHA256]'"
                                 if commands else ""))
            return items, rest
        e = data.find(_PEM_END, b)
        if e < 0:
            if final:
                raise _KeyInput("incomplete PEM certificate (no END CERTIFICATE line)")
            return items, data[pos:]
        stop = e + len(_PEM_END)
        items.append(("cert", data[b:stop] + b"\n"))
        pos = stop


def _texty(data: bytes) -> bool:
    """Printable ASCII and white space only (text that a PEM block may follow)."""
    return all(32 <= c < 127 or c in _SPACE for c in data)


def _parse_remove(line: bytes) -> tuple[int, bytes | None]:
    """``remove KEYID [SHA256]``: the key id as the keys file prints it (8 hex digits),
    optionally the sha256 fingerprint of the certificate (64 hex digits, colons
    allowed, as ``openssl x509 -fingerprint -sha256`` prints it)."""
    words = line.split()
    usage = "expected 'remove KEYID [SHA256]' (KEYID: 8 hex digits, SHA256: 64)"
    if len(words) not in (2, 3) or words[0] != b"remove":
        raise _KeyInput(usage)
    kid = words[1].lower()
    if kid.startswith(b"id:"):
        kid = kid[3:]
    if len(kid) != 8 or any(ch not in b"0123456789abcdef" for ch in kid):
        raise _KeyInput(f"remove: bad key id {words[1].decode('ascii', 'replace')!r}; "
                        + usage)
    fp = None
    if len(words) == 3:
        raw = words[2].lower().replace(b":", b"")
        if raw.startswith(b"sha256="):
            raw = raw[7:]
        if len(raw) != 64 or any(ch not in b"0123456789abcdef" for ch in raw):
            raise _KeyInput(f"remove: bad sha256 fingerprint "
                            f"{words[2].decode('ascii', 'replace')!r}; " + usage)
        fp = bytes.fromhex(raw.decode())
    return int(kid, 16), fp


def _der_total(data: bytes, pos: int = 0) -> int | None:
    """Total length of the DER element at data[pos:] (None while its header is not
    all there yet); _KeyInput for a length no certificate has."""
    if len(data) < pos + 2:
        return None
    first = data[pos + 1]
    if first < 0x80:        # short form: under 128 bytes, no certificate is that small
        raise _KeyInput(f"not a DER certificate (an element of {first} bytes)")
    k = first & 0x7F
    if k == 0 or k > 4:
        raise _KeyInput("not a DER certificate (bad length in its header)")
    if len(data) < pos + 2 + k:
        return None
    return 2 + k + int.from_bytes(data[pos + 2:pos + 2 + k], "big")
