"""The integrity engine's one entry point: an access event in, a verdict out.

The FUSE adapter describes an open (who, which file, which hook and mask) with
:class:`Subject` and :class:`FileRef`; :meth:`Engine.file_open` measures, appraises
and audits it under the caller's namespace **and every ancestor's** policy, as the
kernel's ``process_measurement()`` does for one namespace, and returns an
:class:`OpenState` to hand back at release, or raises :class:`AccessDenied`.

Per file (``IInt``, the kernel's ``integrity_iint_cache``): the version it was last
seen at, its digests for that version, and per namespace what was measured (per
PCR), appraised (per policy/keyring epoch) and audited; plus the counts of readers
and writers through the mount, for the kernel's open-writers and ToMToU violations.
Digests are also kept in LMDB under the file's identity, so a remount does not
rehash an unchanged file.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from imafs.ima import appraise as ap
from imafs.ima import binfmt, hashing
from imafs.ima.audit import AuditLog
from imafs.ima.namespaces import Namespace, NamespaceError, NamespaceTree
from imafs.ima.policy import DEFAULT_PCR, AccessEvent, Decision
from imafs.ima.templates import TEMPLATES, build_entry, violation_entry

log = logging.getLogger("imafs.engine")

MAY_EXEC, MAY_WRITE, MAY_READ, MAY_APPEND = 1, 2, 4, 8
IINT_CACHE_SIZE = 65536


class AccessDenied(Exception):
    def __init__(self, err: int, reason: str):
        super().__init__(reason)
        self.errno = err
        self.reason = reason


@dataclass
class Subject:
    """The process behind a request: pid and the fsuid/fsgid the request carries;
    real/effective ids are read from /proc only when a rule needs them."""
    pid: int
    uid: int
    gid: int
    _ids: dict | None = field(default=None, repr=False, compare=False)

    def ids(self) -> dict:
        """uid, euid, suid, gid, egid, sgid (from /proc/PID/status, else fsuid/fsgid);
        read once per Subject (one request)."""
        if self._ids is None:
            self._ids = self._read_ids()
        return self._ids

    def _read_ids(self) -> dict:
        out = {"uid": self.uid, "euid": self.uid, "suid": self.uid,
               "gid": self.gid, "egid": self.gid, "sgid": self.gid, "cap_setuid": False,
               "cap_setgid": False}
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        r, e, s, _ = line.split()[1:5]
                        out.update(uid=int(r), euid=int(e), suid=int(s))
                    elif line.startswith(b"Gid:"):
                        r, e, s, _ = line.split()[1:5]
                        out.update(gid=int(r), egid=int(e), sgid=int(s))
                    elif line.startswith(b"CapEff:"):
                        caps = int(line.split()[1], 16)
                        out.update(cap_setuid=bool(caps & (1 << 7)),
                                   cap_setgid=bool(caps & (1 << 6)))
                        break
        except (OSError, ValueError):
            pass
        return out


@dataclass
class FsInfo:
    magic: int | None = None
    name: str | None = None        # sb->s_type->name: "ext4", "fuse", ...
    subtype: str | None = None     # a FUSE file system's subtype ("sshfs"), or None
    uuid: str | None = None


@dataclass
class FileRef:
    """A file as the adapter opened it. ``fd`` is the caller's descriptor (it may be
    write-only); ``reopen()`` gives a fresh read-only descriptor of the same inode
    (the engine closes it); ``getxattr``/``setxattr`` act on the backing inode
    (``getxattr`` may read through ``fd``: use it only while the open is decided)."""
    fd: int
    st: os.stat_result
    path: bytes
    readable: bool
    reopen: Callable[[], int]
    getxattr: Callable[[str], bytes | None]
    setxattr: Callable[[str, bytes], None]
    fs: FsInfo = field(default_factory=FsInfo)
    # read-time verification: () -> sink(offset, data) that stores the bytes of the
    # digest pass in the kernel's page cache of this file (dropping what it held), or
    # None when it cannot; the open then lets the kernel keep them
    fill_cache: Callable[[], Callable[[int, memoryview], None] | None] | None = None
    # (pid, path) -> the identity (st_dev, st_ino) of the file that process opens by
    # that absolute path through the mount: None unless its root is the mount's (a
    # process that is not chrooted into the mount finds its PT_INTERP elsewhere)
    resolve: Callable[[int, bytes], tuple[int, int] | None] | None = None
    # the inode's generation (FS_IOC_GETVERSION) where the file system has one: an
    # inode number reused for a new file within one timestamp tick is a new version
    generation: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.st.st_dev, self.st.st_ino)

    @property
    def version(self) -> tuple[int, int, int, int]:
        return (self.st.st_mtime_ns, self.st.st_ctime_ns, self.st.st_size, self.generation)


class IInt:
    """Per-inode integrity state (the kernel's iint)."""
    __slots__ = ("key", "version", "digests", "tree", "measured", "must_measure",
                 "appraised", "audited", "readers", "writers", "lock", "dirty", "wgen",
                 "update_xattr", "done", "live", "live_wgen", "binfmt")

    def __init__(self, key):
        self.key = key
        self.version = None
        self.digests: dict[str, bytes] = {}
        self.tree = None
        self.measured: dict[int, set[int]] = {}      # ns id -> PCRs measured into
        self.must_measure: set[int] = set()          # ns ids whose policy measured a read
        self.appraised: dict = {}                    # (ns id, flags) -> (epoch, result)
        self.audited: set[int] = set()
        self.readers = 0
        self.writers = 0
        self.lock = threading.Lock()
        self.dirty = False                           # written through the mount
        self.wgen = 0                                # writable opens through the mount
        # ns ids where a writable open passed appraisal (the kernel's IMA_UPDATE_XATTR):
        # the last writer's close relabels the file; kept across reset()
        self.update_xattr: set[int] = set()
        # read-only opens whose every action is done for this version (the kernel's
        # IMA_DONE_MASK flags): (ns id, who, mask, exec) -> (epochs, decided, watchers)
        self.done: dict = {}
        # read-time verification: the trees open handles verify their reads against,
        # id(tree) -> [tree, watchers, handles], valid while live_wgen == wgen (a
        # writable open ends every verification); kept across reset(): the handles
        # are still open, and the kernel's page cache of the inode is shared by all
        self.live: dict = {}
        self.live_wgen = 0
        self.binfmt = None      # (version, is ELF, PT_INTERP path or None)

    def reset(self, version) -> None:
        self.version = version
        self.digests = {}
        self.tree = None
        self.measured = {}
        if self.readers == 0:
            # the kernel's IMA_MUST_MEASURE belongs to the open readers: a writer
            # that truncates the file on open (O_TRUNC) must still see it (ToMToU)
            self.must_measure = set()
        self.appraised = {}
        self.audited = set()
        self.done = {}
        self.binfmt = None


@dataclass(slots=True)
class OpenState:
    """What the engine remembers about one open handle until its release."""
    iint: IInt
    ns: Namespace
    file: FileRef
    readable: bool
    writable: bool
    decisions: list = field(default_factory=list)   # [(ns, Decision)] of this open
    # read-time verification: the Merkle tree this handle's reads are checked against
    # (None: reads are not verified), the namespaces that measured/appraised the file,
    # the opener, and ii.wgen at open (a writable open through the mount since stops it)
    tree: object = None
    watchers: tuple = ()
    subject: Subject | None = None
    wgen: int = 0
    failed: set | None = None   # id()s of the trees this handle's reads failed
    ref: object = None      # the adapter's own data about the handle (opaque here)


class ReadVerifyError(AccessDenied):
    """A read that does not match the tree the file was measured with (EIO)."""


_DIGEST_KEY = struct.Struct(">QQ")
_DIGEST_VER = struct.Struct(">QQQQ")   # mtime_ns, ctime_ns, size, generation


class DigestCache:
    """file identity -> digests of one version, in LMDB (db ``digests``)."""

    def __init__(self, store):
        self.store = store
        self.db_name = "digest"
        self.db = store.db("digests") if store is not None else None

    def get(self, key, version) -> dict[str, bytes] | None:
        if self.db is None:
            return None
        with self.store.env.begin(db=self.db) as txn:
            raw = txn.get(_DIGEST_KEY.pack(*key))
        if raw is None:
            return None
        raw = bytes(raw)
        if _DIGEST_VER.unpack_from(raw, 0) != tuple(version):
            return None
        out, off = {}, _DIGEST_VER.size
        try:
            while off < len(raw):
                n = raw[off]
                name = raw[off + 1:off + 1 + n].decode()
                off += 1 + n
                d = raw[off]
                out[name] = raw[off + 1:off + 1 + d]
                off += 1 + d
        except (IndexError, UnicodeDecodeError):
            return None
        return out

    def put(self, key, version, digests: dict[str, bytes]) -> None:
        if self.db is None:
            return
        blob = bytearray(_DIGEST_VER.pack(*version))
        for name, d in sorted(digests.items()):
            nb = name.encode()
            blob += bytes([len(nb)]) + nb + bytes([len(d)]) + d
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.put(_DIGEST_KEY.pack(*key), bytes(blob))
        except Exception as e:  # noqa: BLE001 - a cache: a full disk only costs a rehash
            log.warning("digest cache: cannot store an entry: %s", e)

    def delete(self, key) -> None:
        if self.db is None:
            return
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.delete(_DIGEST_KEY.pack(*key))
        except Exception as e:  # noqa: BLE001 - entries are checked against the version
            log.warning("%s cache: cannot delete an entry: %s", self.db_name, e)


class DoneCache:
    """The done record across remounts (LMDB db ``done`` of the cache environment):
    that a read-only open of one file version, by one kind of caller (the done key:
    namespace, ids the rules look at, mask, hook), under the policies, keyrings and
    options of its namespace chain as they are now (their fingerprints), was measured,
    appraised with a pass and audited -- the verdict, cached by inode version, so a
    remount decides such an open without matching or appraising again. Key: the file
    identity (16 bytes, so that all of a file's records go together) + 16 bytes of
    sha256 over version, done key and fingerprints; value: the ids of the namespaces
    that measured (their readers count for ToMToU) and of those whose reads are
    verified (u32 count + ids, twice)."""

    def __init__(self, store):
        self.store = store
        self.db = store.db("done") if store is not None else None

    @staticmethod
    def record_key(key, version, done_key, fp) -> bytes:
        h = hashlib.sha256(repr((tuple(version), done_key, fp)).encode()).digest()[:16]
        return _DIGEST_KEY.pack(*key) + h

    def get(self, rk: bytes):
        if self.db is None:
            return None
        try:
            with self.store.env.begin(db=self.db) as txn:
                raw = txn.get(rk)
        except Exception:  # noqa: BLE001 - a cache: decide afresh
            return None
        if raw is None:
            return None
        raw = bytes(raw)
        try:
            n = struct.unpack_from("<I", raw, 0)[0]
            measuring = struct.unpack_from(f"<{n}I", raw, 4)
            m = struct.unpack_from("<I", raw, 4 + 4 * n)[0]
            watchers = struct.unpack_from(f"<{m}I", raw, 8 + 4 * n)
        except struct.error:
            return None
        return measuring, watchers

    def put(self, rk: bytes, measuring, watchers) -> None:
        if self.db is None:
            return
        blob = struct.pack(f"<I{len(measuring)}I", len(measuring), *measuring) + \
            struct.pack(f"<I{len(watchers)}I", len(watchers), *watchers)
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.put(rk, blob)
        except Exception as e:  # noqa: BLE001 - a cache: a full disk only costs a decision
            log.warning("done cache: cannot store an entry: %s", e)

    def delete(self, key) -> None:
        """Every record of a file (a read of it failed verification)."""
        if self.db is None:
            return
        prefix = _DIGEST_KEY.pack(*key)
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                cur = txn.cursor()
                if cur.set_range(prefix):
                    while cur.key()[:len(prefix)] == prefix:
                        if not cur.delete():
                            break
        except Exception as e:  # noqa: BLE001
            log.warning("done cache: cannot delete entries: %s", e)


class TreeCache:
    """file identity -> fs-verity Merkle tree of one version, in LMDB (db ``trees``):
    value = version (3 x u64) + ``MerkleTree.to_bytes()`` (leaf level only; the upper
    levels are rebuilt on load and must reproduce the stored fs-verity digest)."""

    def __init__(self, store):
        self.store = store
        self.db_name = "tree"
        self.db = store.db("trees") if store is not None else None

    def get(self, key, version):
        if self.db is None or version is None:
            return None
        with self.store.env.begin(db=self.db) as txn:
            raw = txn.get(_DIGEST_KEY.pack(*key))
            if raw is None:
                return None
            raw = bytes(raw)
        if _DIGEST_VER.unpack_from(raw, 0) != tuple(version):
            return None
        try:
            return hashing.MerkleTree.from_bytes(raw[_DIGEST_VER.size:])
        except hashing.TreeFormatError as e:
            log.warning("tree cache: dropping a bad entry: %s", e)
            return None

    def put(self, key, version, tree) -> None:
        if self.db is None or version is None:
            return
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.put(_DIGEST_KEY.pack(*key), _DIGEST_VER.pack(*version) + tree.to_bytes())
        except Exception as e:  # noqa: BLE001 - a cache: a full disk only costs a rehash
            log.warning("tree cache: cannot store an entry: %s", e)

    def delete(self, key) -> None:
        if self.db is None:
            return
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.delete(_DIGEST_KEY.pack(*key))
        except Exception as e:  # noqa: BLE001 - entries are checked against the version
            log.warning("%s cache: cannot delete an entry: %s", self.db_name, e)


class Engine:
    def __init__(self, tree: NamespaceTree, *, store=None, audit: AuditLog | None = None,
                 binder=None, verify_reads: bool = False, cache_store=None):
        """``store`` holds what must survive a crash (lists, PCRs, namespaces, keys;
        synchronous commits). ``cache_store`` holds digests and Merkle trees, which
        are only a cache: a lost entry is rehashed, so its commits need not wait for
        the disk (default: ``store``)."""
        self.tree = tree
        self.binder = binder
        self.store = store
        self.audit = audit or AuditLog(None)
        cache_store = cache_store if cache_store is not None else store
        self.cache = DigestCache(cache_store)
        self.trees = TreeCache(cache_store)
        self.done = DoneCache(cache_store)
        # read-time verification (docs/internals.md): every digest pass also builds the
        # file's Merkle tree, and reads of measured/appraised files are checked with it
        self.verify_reads = bool(verify_reads)
        self._iints: OrderedDict = OrderedDict()
        self._live_keys: dict = {}  # file identity -> IInt, while a handle verifies reads
        # exec of a dynamically linked ELF: pid -> (identity of its PT_INTERP, deadline);
        # that pid's next exec open of that file is the loader's (binfmt_elf open_exec)
        self._interp: dict[int, tuple] = {}
        self._interp_lock = threading.Lock()
        self._recorded = 0          # entries this engine appended (trims the store's map)
        self._iints_lock = threading.Lock()
        self.stats = {"hashed_files": 0, "hashed_bytes": 0, "cache_hits": 0,
                      "tree_loads": 0, "read_failures": 0, "reads_verified": 0,
                      "done_records": 0}
        self._stats_lock = threading.Lock()   # hashing runs in many worker threads

    # ------------------------------------------------------------------ state
    def iint(self, key) -> IInt:
        with self._iints_lock:
            ii = self._iints.get(key)
            if ii is None:
                ii = IInt(key)
                self._iints[key] = ii
                if len(self._iints) > IINT_CACHE_SIZE:
                    # forget the oldest idle inode (never one with open handles)
                    for k, old in self._iints.items():
                        if old.readers == 0 and old.writers == 0:
                            del self._iints[k]
                            break
            else:
                self._iints.move_to_end(key)
            return ii

    def active(self) -> bool:
        """Whether any namespace has rules (the open hooks are needed at all)."""
        if len(self.tree.root.policy):
            return True
        return any(len(ns.policy) for ns in self.tree.by_id.values())

    def namespace_of(self, subject: Subject) -> Namespace:
        """The caller's namespace; a process that cannot be placed is refused, never
        treated as the host."""
        ns = self.tree.of_pid(subject.pid)
        if ns is None:
            raise AccessDenied(errno.EACCES, f"pid {subject.pid}: integrity namespace unknown")
        return ns

    # ------------------------------------------------------------------ events
    def _events(self, ns_chain, subject: Subject, f: FileRef, flags_mask: int, exec_: bool,
                funcs=None, role: str | None = None):
        """The (func, mask) hooks an open triggers (README: hook mapping), as the kernel
        runs them: an exec open (``__FMODE_EXEC``) is FILE_CHECK with MAY_EXEC (do_open)
        and BPRM_CHECK; the file an exec finally runs, an ELF, also gets CREDS_CHECK
        (with the credentials the exec computes) and MMAP_CHECK_REQPROT / MMAP_CHECK
        (its PROT_EXEC segments); the ELF interpreter (``role`` "interp") gets FILE_CHECK
        and the mmap hooks only, no BPRM_CHECK (load_elf_binary opens it with
        open_exec). A read-only open of an ELF file that is not an exec stands for the
        dynamic loader's open of a library: the mmap hooks follow it."""
        if funcs:
            hooks = list(funcs)
        else:
            library = (not exec_ and flags_mask == MAY_READ and stat.S_ISREG(f.st.st_mode)
                       and f.st.st_size >= 4
                       and any(_has_func(ns.policy, "MMAP_CHECK") for ns in ns_chain)
                       and self._binfmt(self.iint(f.key), f)[0])
            hooks = open_hooks(flags_mask, exec_, role, library)
        needs = set()
        for ns in ns_chain:
            needs |= ns.policy.needs
        ids = subject.ids() if needs & _SUBJECT_FIELDS else {
            "uid": subject.uid, "euid": subject.uid, "gid": subject.gid, "egid": subject.gid}
        out = []
        for func, mask in hooks:
            who = hook_ids(func, exec_, ids, f.st, role, subject.pid)
            out.append(AccessEvent(
                func=func, mask=mask, uid=who["uid"], euid=who["euid"], gid=who["gid"],
                egid=who["egid"], suid=who.get("suid"), sgid=who.get("sgid"),
                cap_setuid=who.get("cap_setuid", False), cap_setgid=who.get("cap_setgid", False),
                fowner=f.st.st_uid, fgroup=f.st.st_gid, fsmagic=f.fs.magic, fsname=f.fs.name,
                fs_subtype=f.fs.subtype, fsuuid=f.fs.uuid, path=os.fsdecode(f.path)))
        return out

    # ------------------------------------------------------------------ exec roles
    @staticmethod
    def _binfmt(ii: IInt, f: FileRef) -> tuple[bool, bytes | None]:
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

    def _exec_role(self, subject: Subject, f: FileRef, ii: IInt) -> str:
        """What an exec open is: "interp" (the loader a dynamically linked ELF just
        exec'd by this very task asks for), "elf" (a binary the exec runs: a program,
        or a script's interpreter), or "other" (a #! script, anything not ELF)."""
        with self._interp_lock:
            pend = self._interp.get(subject.pid)
        if pend is not None and pend[0] == f.key and time.monotonic() < pend[1]:
            return "interp"
        return "elf" if self._binfmt(ii, f)[0] else "other"

    def _expect_interp(self, subject: Subject, f: FileRef, ii: IInt) -> None:
        """An ELF exec was allowed: if it names an interpreter, remember which file
        that is (resolved inside the mount, when the process's root is the mount's: a
        container chrooted into it), so that this task's next exec open -- in a real
        exec the very next open, of that file -- is taken for the loader's. A process
        whose root is elsewhere loads its interpreter from there, not through the
        mount: nothing is remembered, and every exec open of it stays BPRM_CHECK."""
        interp = self._binfmt(ii, f)[1]
        if interp is None or f.resolve is None:
            return
        key = f.resolve(subject.pid, interp)
        if key is None:
            return
        with self._interp_lock:
            if len(self._interp) > 4096:
                now = time.monotonic()
                for pid in [p for p, v in self._interp.items() if v[1] < now]:
                    del self._interp[pid]
                if len(self._interp) > 4096:
                    self._interp.clear()
            self._interp[subject.pid] = (key, time.monotonic() + INTERP_WINDOW)

    def decide(self, ns: Namespace, events) -> list[tuple[Namespace, AccessEvent, Decision]]:
        out = []
        for n in ns.chain():
            if not len(n.policy):
                continue
            for ev in events:
                d = n.policy.match(ev)
                if d.measure or d.appraise or d.audit or d.hash:
                    out.append((n, ev, d))
        return out

    # ------------------------------------------------------------------ open
    def file_open(self, subject: Subject, f: FileRef, *, readable: bool, writable: bool,
                  append: bool, exec_: bool, created: bool = False,
                  funcs: list[tuple[str, int]] | None = None, inline: bool = False,
                  direct: bool = False):
        """Measure/appraise/audit one open; raises AccessDenied to refuse it.
        ``funcs`` overrides the hooks derived from the open (e.g. POLICY_CHECK).

        ``inline``: the caller is an event loop that must not block. The open is then
        decided only if that needs no hashing and no waiting for the file's lock (a
        warm file: its digests for this version are known); otherwise nothing is done
        and WOULD_BLOCK is returned, for the caller to retry from a worker thread.

        ``direct``: an O_DIRECT open. The kernel does not hash those
        (ima_calc_file_hash: -EINVAL): a measurement records a zero digest and leaves
        the file unmeasured, an appraisal fails unless the rule says
        ``permit_directio``, and "collect_data" / "failed(directio)" is audited."""
        ns = self.namespace_of(subject)
        if not stat.S_ISREG(f.st.st_mode):
            return None
        mask = (MAY_READ if readable else 0) | (MAY_WRITE if writable else 0) | \
               (MAY_APPEND if append else 0)
        chain = ns.chain()
        ii = self.iint(f.key)
        if not exec_ or funcs is not None:
            return self._file_open(subject, ns, chain, ii, f, mask, readable, writable,
                                   exec_, created, funcs, inline, direct, None)
        role = self._exec_role(subject, f, ii)
        state = WOULD_BLOCK
        try:
            state = self._file_open(subject, ns, chain, ii, f, mask, readable, writable,
                                    exec_, created, funcs, inline, direct, role)
        finally:
            if state is not WOULD_BLOCK:
                # this task's next exec open was this one (decided, allowed or not)
                with self._interp_lock:
                    self._interp.pop(subject.pid, None)
        if role == "elf" and state is not WOULD_BLOCK:
            self._expect_interp(subject, f, ii)
        return state

    def _file_open(self, subject, ns, chain, ii, f, mask, readable, writable, exec_,
                   created, funcs, inline, direct, role):
        done_key = None
        if not writable and not created and funcs is None and not direct:
            done_key = self._done_key(chain, ns, subject, mask, exec_, role)
            if done_key is not None:
                state = self._open_done(ii, ns, chain, subject, f, readable, done_key)
                if state is None:
                    state = self._open_recorded(ii, ns, chain, subject, f, readable,
                                                done_key)
                if state is not None:
                    return state
        events = self._events(chain, subject, f, mask, exec_, funcs, role)
        decided = self.decide(ns, events)
        if inline:
            if not ii.lock.acquire(blocking=False):
                return WOULD_BLOCK
            if decided and not self._warm(ii, f):
                ii.lock.release()
                return WOULD_BLOCK
        else:
            ii.lock.acquire()
        try:
            if ii.version != f.version:
                ii.reset(f.version)
            epochs = _epochs(chain)
            writers = ii.writers
            self._violations(chain, events, subject, f, ii, decided, writable, ns.id)
            self._process(subject, ns, f, ii, decided, readable, writable, created, direct)
            # a refused open never gets a handle, so it is not counted.  Readers are
            # the read-only opens (the kernel's i_readcount).
            with _COUNTS:
                if readable and not writable:
                    ii.readers += 1
                if writable:
                    ii.writers += 1
                    ii.wgen += 1
            state = OpenState(ii, ns, f, readable, writable, decided, subject=subject,
                              wgen=ii.wgen)
            watchers = ()
            if self.verify_reads and readable and not writable and ii.writers == 0 \
                    and not direct:
                watchers = _watchers(decided)
                if watchers:
                    try:
                        self._digest(ii, f, watchers[0].hash_algo, {watchers[0].hash_algo},
                                     tree=True)
                    except BaseException:
                        with _COUNTS:
                            ii.readers -= 1
                        raise
                    state.tree, state.watchers = ii.tree, watchers
            if state.tree is not None:
                self._live_add(ii, state)
            if done_key is not None and writers == 0 and ii.version == f.version:
                # everything this kind of open needs is done for this version: the
                # next one like it takes _open_done (unless policy or keys change),
                # and after a remount _open_recorded
                ii.done[done_key] = (epochs, decided, watchers)
                if decided and epochs == _epochs(chain):
                    self.done.put(
                        DoneCache.record_key(f.key, f.version, done_key, _chain_fp(chain)),
                        sorted(ii.must_measure & {n.id for n in chain}),
                        [n.id for n in _watchers(decided)])
        finally:
            ii.lock.release()
        return state

    @staticmethod
    def _done_key(chain, ns: Namespace, subject: Subject, mask: int, exec_: bool, role):
        """What a read-only open's decisions depend on besides the file version and
        the policy/keyring epochs: the namespace, the caller's ids that some rule of
        the chain looks at, the mask and the hook."""
        for n in chain:
            if n.policy.needs & _SUBJECT_FIELDS:
                ids = subject.ids()
                who = (ids["uid"], ids["euid"], ids["suid"], ids["gid"], ids["egid"],
                       ids["sgid"], ids["cap_setuid"], ids["cap_setgid"])
                break
        else:
            who = (subject.uid, subject.gid)
        return (ns.id, who, mask, exec_, role)

    def _open_done(self, ii: IInt, ns: Namespace, chain, subject: Subject, f: FileRef,
                   readable: bool, done_key):
        """A read-only open like one already decided for this file version: measured,
        appraised (passed) and audited as it needs, nothing writing the file -- as the
        kernel's process_measurement() returns when no action is left out of
        iint->flags.  Returns its OpenState, or None to take the full path."""
        hit = ii.done.get(done_key)
        if hit is None or ii.version != f.version or ii.writers:
            return None
        if not ii.lock.acquire(blocking=False):
            return None
        try:
            if ii.done.get(done_key) is not hit or ii.version != f.version or ii.writers \
                    or hit[0] != _epochs(chain):
                return None
            epochs, decided, watchers = hit
            if watchers and ii.tree is None:
                return None
            if readable:
                with _COUNTS:
                    ii.readers += 1
            state = OpenState(ii, ns, f, readable, False, decided, subject=subject,
                              wgen=ii.wgen)
            if watchers:
                state.tree, state.watchers = ii.tree, watchers
                self._live_add(ii, state)
            return state
        finally:
            ii.lock.release()

    def _open_recorded(self, ii: IInt, ns: Namespace, chain, subject: Subject,
                       f: FileRef, readable: bool, done_key):
        """The done record of an earlier mount (DoneCache): this version, this kind of
        open, the chain's policies, keys and options as they are now -- decided then,
        measured (the list has the entry), passed. Returns its OpenState (and makes the
        record this mount's), or None to take the full path."""
        rec = self.done.get(DoneCache.record_key(f.key, f.version, done_key, _chain_fp(chain)))
        if rec is None:
            return None
        measuring, watcher_ids = rec
        by_id = self.tree.by_id
        if any(i not in by_id for i in measuring + watcher_ids):
            return None
        watchers = tuple(by_id[i] for i in watcher_ids) if self.verify_reads else ()
        if not ii.lock.acquire(blocking=False):
            return None
        try:
            if ii.version != f.version:
                ii.reset(f.version)
            if ii.writers or (watchers and not self._warm(ii, f)) or \
                    (watchers and ii.tree is None):
                return None
            ii.must_measure.update(measuring)
            if readable:
                with _COUNTS:
                    ii.readers += 1
            state = OpenState(ii, ns, f, readable, False, [], subject=subject, wgen=ii.wgen)
            if watchers:
                state.tree, state.watchers = ii.tree, watchers
                self._live_add(ii, state)
            ii.done[done_key] = (_epochs(chain), [], watchers)
            with self._stats_lock:
                self.stats["done_records"] += 1
            return state
        finally:
            ii.lock.release()

    def _warm(self, ii: IInt, f: FileRef) -> bool:
        """Are this version's digests (and tree, when reads are verified) at hand
        without hashing -- in memory, or in the LMDB cache (loaded here, a few reads)?
        Called with ii.lock held."""
        if ii.version != f.version:
            ii.reset(f.version)
        need_tree = self.verify_reads
        if ii.digests:
            return ii.tree is not None or not need_tree
        cached = self.cache.get(ii.key, ii.version)
        if not cached:
            return False
        t = self.trees.get(ii.key, ii.version) if need_tree else None
        if need_tree and t is None:
            return False
        ii.digests.update(cached)
        ii.tree = t
        with self._stats_lock:
            self.stats["cache_hits"] += 1
            self.stats["tree_loads"] += t is not None
        return True

    def _violations(self, chain, events, subject, f, ii: IInt, decided, writable,
                    subject_ns: int = 0) -> None:
        """ima_rdwr_violation_check, before anything is measured: for FILE_CHECK and
        MMAP_CHECK, in every namespace whose policy has a measure rule -- whether or
        not a rule matched this open (a writer matches no read rule, yet it is the
        one that causes a ToMToU)."""
        for n in chain:
            if not _has_measure(n.policy):
                continue
            for ev in events:
                if ev.func not in _VIOLATION_FUNCS:
                    continue
                if writable:
                    if n.id in ii.must_measure and ii.readers > 0:
                        self._violation(n, f, subject, "ToMToU", subject_ns)
                    break       # one per open: a writer triggers FILE_CHECK only
                must = any(d.measure for nn, e, d in decided if nn is n and e is ev)
                if must:
                    ii.must_measure.add(n.id)
                    if ii.writers > 0:
                        self._violation(n, f, subject, "open_writers", subject_ns)

    def _process(self, subject, ns, f, ii: IInt, decided, readable, writable, created,
                 direct=False):
        if not decided:
            return
        if direct:
            return self._process_direct(subject, ns, f, ii, decided)
        # which digests are needed
        algos = set()
        xattrs: dict[int, bytes | None] = {}
        for n, ev, d in decided:
            if n.id not in xattrs:
                xattrs[n.id] = f.getxattr(n.xattr_name)
            if d.measure or d.audit:
                algos.add(_measure_algo(n, xattrs[n.id]))
            if d.hash:
                algos.add(n.hash_algo)
            if d.appraise:
                want = ap.needed_algo(xattrs[n.id]) or n.hash_algo
                algos.add(want)
        denial = None
        for n, ev, d in decided:
            if d.measure:
                done = ii.measured.setdefault(n.id, set())
                if d.pcr not in done:
                    template = d.template or n.template
                    if d.digest_type == "verity":
                        # the fs-verity digest, in a d-ngv2 template ("verity:sha256:...")
                        template = _verity_template(template)
                        # the algorithm a v3 signature names (ima_get_hash_algo), so
                        # the signature in an ima-sigv2 entry covers the recorded digest
                        algo = _measure_algo(n, xattrs.get(n.id))
                        if algo not in hashing.VERITY_ALGOS:
                            algo = "sha256"
                        digest = self._verity_digest(ii, f, algo, algos)
                    else:
                        # the ima template records a sha1 digest whatever the hash algorithm
                        algo = ("sha1" if template == "ima"
                                else _measure_algo(n, xattrs.get(n.id)))
                        digest = self._digest(ii, f, algo, algos | {algo})
                    entry = _entry(template, f.path, ns.id, digest, xattrs.get(n.id), d.pcr, algo,
                                   "verity" if d.digest_type == "verity" else "ima")
                    self._record(n, entry, subject, f, "measurement")
                    done.add(d.pcr)
            if d.audit and n.id not in ii.audited:
                algo = _measure_algo(n, xattrs.get(n.id))
                digest = self._digest(ii, f, algo, algos | {algo})
                self.audit.record("audit", ns=n.path, path=f.path, hash=f"{algo}:{digest.hex()}",
                                  pid=subject.pid, uid=subject.uid, func=ev.func,
                                  rule=str(d.audit_rule).rstrip())
                ii.audited.add(n.id)
            if d.appraise and denial is None:
                denial = self._appraise(subject, n, ev, d, f, ii, xattrs.get(n.id), algos,
                                        writable, created)
        if denial is not None:
            raise denial

    def _process_direct(self, subject, ns, f, ii: IInt, decided) -> None:
        """An O_DIRECT open (see file_open): nothing is hashed."""
        denial = None
        audited = False
        for n, ev, d in decided:
            xattr = f.getxattr(n.xattr_name)
            algo = _measure_algo(n, xattr)
            zero = bytes(hashing.hash_algo(algo).digest_size)
            if (d.measure or d.appraise or d.audit) and not audited:
                self.audit.record("collect_data", ns=n.path, path=f.path, pid=subject.pid,
                                  uid=subject.uid, func=ev.func, cause="failed(directio)")
                audited = True
            if d.measure and d.pcr not in ii.measured.get(n.id, ()):
                template = d.template or n.template
                if template == "ima":
                    algo, zero = "sha1", bytes(20)
                entry = _entry(template, f.path, ns.id, zero, xattr, d.pcr, algo)
                self._record(n, entry, subject, f, "measurement")   # not marked measured
            if d.audit and n.id not in ii.audited:
                self.audit.record("audit", ns=n.path, path=f.path, hash=f"{algo}:{zero.hex()}",
                                  pid=subject.pid, uid=subject.uid, func=ev.func,
                                  rule=str(d.audit_rule).rstrip())
                ii.audited.add(n.id)
            if d.appraise and denial is None and n.appraise_mode == "enforce" \
                    and not d.permit_directio:
                denial = AccessDenied(errno.EACCES, f"{os.fsdecode(f.path)}: O_DIRECT open "
                                      f"of an appraised file (no permit_directio)")
        if denial is not None:
            raise denial

    def _appraise(self, subject, n: Namespace, ev, d: Decision, f: FileRef, ii: IInt,
                  xattr, algos, writable, created):
        if n.appraise_mode == "off":
            return None
        flags = (d.appraise_type, d.appraise_algos, d.digest_type)
        cache_key = (n.id, flags)
        cached = ii.appraised.get(cache_key)
        fresh = cached is None or cached[0] != n.epoch()
        if not fresh:
            result = cached[1]
        else:
            result = ap.appraise(
                xattr, lambda a: self._digest(ii, f, a, algos | {a}), n.keyring,
                require_sig=d.appraise_type in ("imasig", "imasig|modsig"),
                allowed_algos=d.appraise_algos,
                verity_digest=lambda a: self._verity_digest(ii, f, a, algos),
                sigv3_required=d.appraise_type == "sigv3",
                verity_required=d.digest_type == "verity",
                default_algo=n.hash_algo, new_file=created, file_size=f.st.st_size)
            ii.appraised[cache_key] = (n.epoch(), result)
        if result.passed:
            if writable and xattr and xattr[0] in (ap.EVM_IMA_XATTR_DIGSIG, ap.IMA_VERITY_DIGSIG) \
                    and n.appraise_mode == "enforce" and not created:
                # a signed file is immutable: the kernel refuses to open it for write
                self.audit.record("appraise", ns=n.path, path=f.path, pid=subject.pid,
                                  uid=subject.uid, func=ev.func, result="fail",
                                  cause="write-signed-file", mode=n.appraise_mode)
                return AccessDenied(errno.EACCES, f"{os.fsdecode(f.path)}: signed file opened for write")
            if writable:
                ii.update_xattr.add(n.id)
            return None
        if created:
            return None
        if fresh:   # as the kernel: audited when appraised, not on a cached status
            self.audit.record("appraise", ns=n.path, path=f.path, pid=subject.pid,
                              uid=subject.uid, func=ev.func, result=result.status,
                              cause=result.cause, detail=result.detail, mode=n.appraise_mode)
        if n.appraise_mode == "fix" and ap.may_fix(xattr) \
                and result.cause != "denied-hash-algorithm":
            # ima_fix_xattr(): the hash in the algorithm the file was appraised with
            # (the one its value names, else the default); a value refused only for
            # its algorithm (appraise_algos=, checked after the appraisal) is kept
            algo = result.algo or n.hash_algo
            digest = self._digest(ii, f, algo, algos | {algo})
            try:
                f.setxattr(n.xattr_name, ap.hash_xattr(algo, digest))
                log.info("fix: wrote %s hash of %s", n.xattr_name, os.fsdecode(f.path))
            except OSError as e:
                log.warning("fix: cannot write %s of %s: %s", n.xattr_name, os.fsdecode(f.path), e)
            return None
        if n.appraise_mode == "enforce":
            return AccessDenied(errno.EACCES, f"{os.fsdecode(f.path)}: {result}")
        return None

    def _record(self, n: Namespace, entry, subject: Subject, f: FileRef, what: str) -> None:
        """Append to a namespace's list, or fail closed: an entry that cannot be stored
        (LMDB map full, disk full, I/O error) refuses the access with EIO -- it never
        goes on unmeasured -- with the reason in the log and the audit log.  Nothing is
        marked measured, so the next open tries again (and succeeds once space
        returns)."""
        try:
            n.mlist.add(entry)
            self._recorded += 1
            if self._recorded % 1024 == 0 and hasattr(self.store, "trim"):
                self.store.trim()       # appends fault LMDB pages in too (Store.trim)
        except Exception as e:  # noqa: BLE001 - lmdb.Error and friends: fail closed
            reason = (f"{os.fsdecode(f.path)}: cannot record the {what} in namespace "
                      f"{n.path}: {e}")
            log.error("%s (pid %d): access refused", reason, subject.pid)
            self.audit.record("measurement_failed", ns=n.path, path=f.path, pid=subject.pid,
                              uid=subject.uid, what=what, error=str(e))
            raise AccessDenied(errno.EIO, reason) from None

    def _violation(self, n: Namespace, f: FileRef, subject: Subject, cause: str,
                   subject_ns: int = 0, **detail) -> None:
        # as ima_add_violation: the namespace's default template, PCR 10 (the
        # kernel's CONFIG_IMA_MEASURE_PCR_IDX), whatever the rule said; ``ns`` (ima-ns)
        # names the accessing process's namespace, as in a measurement
        self._record(n, violation_entry(n.template, f.path, pcr=DEFAULT_PCR, algo=n.hash_algo,
                                        ns_id=subject_ns), subject, f, f"{cause} violation")
        self.audit.record("violation", ns=n.path, path=f.path, pid=subject.pid, uid=subject.uid,
                          cause=cause, **detail)
        log.info("violation %s: %s (ns %s)", cause, os.fsdecode(f.path), n.path)

    def _digest(self, ii: IInt, f: FileRef, algo: str, algos, *, tree: bool = False) -> bytes:
        """The file's digest in ``algo``; computes every algorithm in ``algos`` that is
        missing in one pass (or takes them from the LMDB cache).

        ``algo`` may also be ``"verity-<alg>"``: the fs-verity file digest.  With
        ``tree`` -- always when reads are verified -- the same pass also builds the
        fs-verity Merkle tree (``ii.tree``, sha256, 4096-byte blocks, no salt), so the
        tree describes exactly the bytes the digests were computed from; a cached
        tree is only used together with the digests cached with it."""
        tree = tree or self.verify_reads
        d = ii.digests.get(algo)
        if d is not None and (ii.tree is not None or not tree):
            return d
        if not ii.digests and ii.tree is None:
            cached = self.cache.get(ii.key, ii.version)
            t = self.trees.get(ii.key, ii.version) if cached and tree else None
            if cached and (t is not None or not tree):
                ii.digests.update(cached)
                ii.tree = t
                with self._stats_lock:
                    self.stats["cache_hits"] += 1
                    self.stats["tree_loads"] += t is not None
                d = ii.digests.get(algo)
                if d is not None:
                    return d
            # else: digests cached without their tree -- hash again, both in one pass
        need_tree = (tree and ii.tree is None) or (algo == _VERITY_TREE_DIGEST
                                                   and algo not in ii.digests)
        want = sorted(a for a in set(algos) | {algo}
                      if a not in ii.digests and not a.startswith("verity-"))
        other_verity = (algo.startswith("verity-") and algo != _VERITY_TREE_DIGEST
                        and algo not in ii.digests)
        # the bytes of this pass, which the tree describes, may go straight into the
        # kernel's page cache of the file (FileRef.fill_cache): reads of them are then
        # served without a second hash; only while no other handle verifies the file
        # (its pages must match that handle's tree) and nobody writes it
        sink = None
        if (need_tree and f.fill_cache is not None and ii.writers == 0
                and 0 < f.st.st_size <= FILL_MAX and not self._live_trees(ii)):
            sink = f.fill_cache()
        fd = f.fd if f.readable else f.reopen()
        try:
            res = hashing.hash_fd(fd, want, verity=hashing.VeritySpec() if need_tree else None,
                                  sink=sink)
            if other_verity:   # fs-verity digest with another hash (sha512): its own pass
                vt = hashing.hash_fd(fd, [], verity=hashing.VeritySpec(algo[7:])).tree
                ii.digests[algo] = vt.verity_digest
            st = os.fstat(fd)
        finally:
            if fd != f.fd:
                os.close(fd)
        with self._stats_lock:
            self.stats["hashed_files"] += 1
            self.stats["hashed_bytes"] += res.size
        ii.digests.update(res.digests)
        if res.tree is not None:
            ii.tree = res.tree
            ii.digests[_VERITY_TREE_DIGEST] = res.tree.verity_digest
        # a file that changed while it was hashed: keep the result for this open (the
        # bytes served are checked against this very tree), but never cache it under
        # an identity it may not belong to
        if ii.version is not None and ii.version[:3] == _stat_version(st) \
                and res.size == st.st_size:
            self.cache.put(ii.key, ii.version, ii.digests)
            if res.tree is not None:
                self.trees.put(ii.key, ii.version, res.tree)
        return ii.digests[algo]

    def _verity_digest(self, ii: IInt, f: FileRef, algo: str, algos) -> bytes | None:
        """The fs-verity file digest in ``algo`` (what ``fsverity digest`` prints),
        computed here whether or not the backing file has fs-verity enabled; None for
        an algorithm fs-verity does not have."""
        try:
            algo = hashing.hash_algo(algo).name
        except hashing.HashAlgoError:
            return None
        if algo not in hashing.VERITY_ALGOS:
            return None
        return self._digest(ii, f, "verity-" + algo, algos)

    # ------------------------------------------------------------------ reads
    # The kernel's page cache of an inode is shared by every handle of it, and a handle
    # whose pages are cached reads them without asking the daemon.  So a page must not
    # enter the cache unless it matches every tree a handle open now verifies against:
    # while any verified handle of the file is open, every read of it -- through any
    # handle, verified or not -- is checked against all those trees (normally one; two
    # after the file changed behind the mount and was measured again while a handle of
    # the old version is still open: then only unchanged blocks are served).

    def _live_add(self, ii: IInt, state: OpenState) -> None:
        """Register a verifying handle (with ii.lock held)."""
        with _COUNTS:
            if ii.live_wgen != ii.wgen:
                ii.live, ii.live_wgen = {}, ii.wgen
            rec = ii.live.get(id(state.tree))
            if rec is None:
                ii.live[id(state.tree)] = [state.tree, state.watchers, 1]
                self._live_keys[ii.key] = ii
            else:
                rec[2] += 1

    def _live_drop(self, state: OpenState) -> None:
        """A verifying handle was released (with _COUNTS held)."""
        ii = state.iint
        if state.tree is None or state.wgen != ii.live_wgen:
            return
        rec = ii.live.get(id(state.tree))
        if rec is not None:
            rec[2] -= 1
            if rec[2] <= 0:
                del ii.live[id(state.tree)]
        if not ii.live:
            self._live_keys.pop(ii.key, None)

    @staticmethod
    def _live_trees(ii: IInt) -> list:
        with _COUNTS:
            if ii.live_wgen != ii.wgen or not ii.live:
                return []
            return [(rec[0], rec[1]) for rec in ii.live.values()]

    def verifies(self, state: OpenState) -> bool:
        """Whether reads through this handle are checked (its own tree, or the trees of
        other handles of the file open now). Cheap, for the event loop."""
        ii = state.iint
        if ii.live_wgen != ii.wgen or not ii.live:
            return False
        return not state.writable

    def measured_size(self, key) -> int | None:
        """The size the kernel must be shown for a file while handles verifying it are
        open (the size their trees were built over), or None: reads past a shorter
        backing file then reach the daemon and fail, instead of the kernel clipping them
        at the new end without asking."""
        ii = self._live_keys.get(key)
        if ii is None:
            return None
        sizes = {t.data_size for t, _w in self._live_trees(ii)}
        return sizes.pop() if len(sizes) == 1 else None

    def read_verified(self, state: OpenState, fd: int, off: int, size: int, *,
                      nowait: bool = False) -> bytes | None:
        """Read ``size`` bytes at ``off`` from ``fd`` (the handle's backing descriptor)
        and check them against the Merkle trees of the file's verifying handles (this
        one's first); returns the bytes, or None when no handle of the file verifies
        reads.  A block that does not match a tree, a file shorter than a tree, or
        bytes past a tree's end raise :class:`ReadVerifyError` (EIO) -- no byte of
        such a read is returned.

        ``nowait`` (for the event loop): read with RWF_NOWAIT and raise
        BlockingIOError when the data is not all in the page cache, or when the read
        fails verification (the caller retries in a worker thread, which records the
        failure: recording takes the IInt lock); other OSErrors (EOPNOTSUPP: no
        RWF_NOWAIT here) propagate as they are.

        Cost: one pread of the whole blocks covering the request (FUSE reads are
        page-aligned, so normally exactly the request) and one hash per 4 KiB block
        per tree (normally one); leaf lookups are O(1), nothing touches LMDB."""
        ii = state.iint
        if state.writable:
            return None
        trees = self._live_trees(ii)
        if not trees:
            return None
        self.stats["reads_verified"] += 1    # no lock: a statistic, not an invariant
        if len(trees) == 1 and nowait:
            # the common case on the event loop: one tree, a read within the measured
            # size, all of it in the backing page cache and unchanged
            t = trees[0][0]
            bs, dsize = t.block_size, t.data_size
            if off % bs == 0 and off + size <= dsize:
                end = off + size
                end = min(end + (-end % bs), dsize)
                buf = bytearray(end - off)
                if os.preadv(fd, [buf], off, os.RWF_NOWAIT) == len(buf) \
                        and t.verify_range(off, buf).ok:
                    return buf if len(buf) == size else buf[:size]
                raise BlockingIOError(errno.EAGAIN, "not cached, or not verified: a thread")
        own = state.tree if state.wgen == ii.wgen else None
        if own is not None:
            trees.sort(key=lambda tw: tw[0] is not own)
        bs = trees[0][0].block_size
        start = off - off % bs
        spans = []          # per tree: (whole-block length to check, request past its end)
        for t, _w in trees:
            dsize = t.data_size
            end = min(off + size, dsize)
            spans.append((min(end + (-end % bs), dsize) - start if end > off else 0,
                          off + size > dsize))
        # one read for all trees: the longest span, one byte more where a request
        # reaches past a tree's end (that byte shows a grown file)
        want = max((ln + pr for ln, pr in spans if ln > 0), default=0)
        longest = max(ln for ln, _pr in spans)
        try:
            if want > 0 and nowait:
                buf = bytearray(want)
                n = os.preadv(fd, [buf], start, os.RWF_NOWAIT)
                if n < longest:
                    raise BlockingIOError(errno.EAGAIN, "not all in the page cache")
                del buf[n:]
            elif want > 0:
                buf = os.pread(fd, want, start)
            else:
                buf = b""
            # a request at or past a tree's end: is there a byte at that end?
            grown = [pr and ln == 0 and os.pread(fd, 1, t.data_size) != b""
                     for (t, _w), (ln, pr) in zip(trees, spans)]
        except OSError as e:
            if nowait:
                raise
            raise ReadVerifyError(e.errno or errno.EIO, f"read error: {e}") from None
        served = longest
        for (t, watchers), (length, probe), grew in zip(trees, spans, grown):
            part = buf[:length]
            res = t.verify_range(start, part) if part else hashing.VerifyResult(True)
            short = len(part) < length
            extra = grew or (probe and length > 0 and len(buf) > length)
            if nowait and (not res.ok or short or extra):
                raise BlockingIOError(errno.EAGAIN, "verification failed: retry in a thread")
            if not res.ok:
                self._read_failure(state, t, watchers, off, res.first_bad_block,
                                   res.expected, res.found, "content")
            if short:
                bad = (start + len(part)) // bs
                self._read_failure(state, t, watchers, off, bad, t.block_hash(bad), b"",
                                   "short")
            if extra:
                self._read_failure(state, t, watchers, off, t.data_size // bs, b"", b"",
                                   "past-end")
            served = min(served, length)
        if len(buf) > served:
            buf = buf[:served]
        lo = off - start
        if lo == 0 and len(buf) <= size:
            return buf
        return buf[lo:lo + size]

    def _read_failure(self, state: OpenState, tree, watchers, off: int, block: int,
                      expected: bytes, found: bytes, what: str) -> None:
        """A read through ``state`` does not match ``tree`` (this handle's, or another
        open handle's): the file changed behind the mount.  Record a violation (list,
        PCRs, audit) in every namespace that measured or appraised the file against that
        tree -- once per reading handle and tree -- forget the file's verdicts and
        cached digests when the tree is the current one (the next open measures and
        appraises it again), and raise EIO."""
        ii = state.iint
        f = state.file
        with ii.lock:
            if state.failed is None:
                state.failed = set()
            first = id(tree) not in state.failed
            state.failed.add(id(tree))
            if ii.tree is tree:
                ii.reset(None)
                self.cache.delete(ii.key)
                self.trees.delete(ii.key)
                self.done.delete(ii.key)
        detail = {"offset": off, "block": block, "what": what, "expected": expected.hex(),
                  "found": found.hex()}
        if first:
            with self._stats_lock:
                self.stats["read_failures"] += 1
            subject = state.subject or Subject(0, 0, 0)
            for n in watchers:
                self._violation(n, f, subject, "read-verify", state.ns.id, **detail)
        else:
            log.debug("read-verify: %s offset %d block %d (%s) again", os.fsdecode(f.path),
                      off, block, what)
        raise ReadVerifyError(errno.EIO, f"{os.fsdecode(f.path)}: block {block} at offset "
                                         f"{off} does not match the measured file ({what})")

    # ------------------------------------------------------------------ release
    def file_release(self, state: OpenState):
        """A handle was released. Cheap and non-blocking, so the adapter calls it as
        soon as FUSE RELEASE arrives, before it handles any later request: the counts
        (the kernel's i_readcount / i_writecount) drop in order, and a
        ``close(w); open(r)`` is never seen as open-writers. Returns the slow part
        (the last writer's close: re-measure, relabel) as a callable for a worker
        thread, or None."""
        ii = state.iint
        with _COUNTS:
            self._live_drop(state)
            if state.readable and not state.writable:
                ii.readers -= 1
            if state.writable:
                ii.writers -= 1
                if ii.writers == 0 and ii.dirty:
                    ii.dirty = False
                    return lambda: self._last_writer_locked(state)
        return None

    def _last_writer_locked(self, state: OpenState) -> None:
        with state.iint.lock:
            self._last_writer(state)

    def file_written(self, state: OpenState) -> None:
        state.iint.dirty = True

    def _last_writer(self, state: OpenState) -> None:
        """The last writer closed a changed file: forget its verdicts (the next open
        re-measures), and update the hash xattr where policy says so (``hash`` rule,
        appraise in fix mode, or an appraised writer whose appraisal passed -- a new
        file, a file whose hash matched: ima_update_xattr; never over a signature)."""
        f = state.file
        update, state.iint.update_xattr = state.iint.update_xattr, set()
        try:
            fd = f.reopen()
        except OSError:
            state.iint.reset(None)
            return
        try:
            st = os.fstat(fd)
            state.iint.reset(_stat_version(st) + (f.generation,))
            for n, ev, d in state.decisions:
                if not (d.hash or (d.appraise and (n.appraise_mode == "fix"
                                                   or n.id in update))):
                    continue
                cur = _fgetxattr(fd, n.xattr_name)   # f.getxattr's descriptor is closed
                if cur and cur[0] in (ap.EVM_IMA_XATTR_DIGSIG, ap.IMA_VERITY_DIGSIG):
                    continue        # ima_update_xattr(): never over a signature (IMA_DIGSIG)
                digest = hashing.hash_fd(fd, [n.hash_algo]).digests[n.hash_algo]
                try:
                    f.setxattr(n.xattr_name, ap.hash_xattr(n.hash_algo, digest))
                except OSError as e:
                    log.warning("cannot update %s of %s: %s", n.xattr_name,
                                os.fsdecode(f.path), e)
        finally:
            os.close(fd)

    def file_changed(self, key, size: int | None = None) -> None:
        """Attributes or xattrs changed through the mount: verdicts are stale.
        ``size``: the file's size now; one that differs from the measured size is a
        content change through the mount (truncate), which, like a writable open,
        ends the read-time verification of the handles open now."""
        with self._iints_lock:
            ii = self._iints.get(key)
        if ii is not None:
            with ii.lock:
                if size is not None and (ii.version is None or ii.version[2] != size):
                    with _COUNTS:
                        ii.wgen += 1
                ii.reset(None)

    # ------------------------------------------------------------------ query
    def explain(self, subject: Subject, f: FileRef, *, exec_: bool = False) -> dict:
        """What the engine decides about a file for this subject, and why (the
        ``query`` control file): digest, matching rules, measurement and appraisal."""
        ns = self.namespace_of(subject)
        out = {"path": os.fsdecode(f.path), "namespace": ns.path, "namespaces": []}
        if not stat.S_ISREG(f.st.st_mode):
            out["error"] = "not a regular file: IMA measures and appraises regular files only"
            return out
        events = self._events(ns.chain(), subject, f, MAY_EXEC if exec_ else MAY_READ, exec_)
        ii = self.iint(f.key)
        with ii.lock:
            if ii.version != f.version:
                ii.reset(f.version)
            for n in ns.chain():
                entry = {"namespace": n.path, "appraise_mode": n.appraise_mode, "hooks": []}
                xv = f.getxattr(n.xattr_name)
                entry["xattr"] = ap.describe_xattr(xv) if xv else None
                algo = _measure_algo(n, xv)        # the digest a measurement records
                digest = self._digest(ii, f, algo, {algo})
                entry["digest"] = f"{algo}:{digest.hex()}"
                entry["measured_pcrs"] = sorted(ii.measured.get(n.id, ()))
                for ev in events:
                    d = n.policy.match(ev)
                    h = {"func": ev.func, "mask": ev.mask, "decision": d.to_dict()}
                    if d.appraise:
                        r = ap.appraise(
                            xv, lambda a: self._digest(ii, f, a, {a}), n.keyring,
                            require_sig=d.appraise_type in ("imasig", "imasig|modsig"),
                            allowed_algos=d.appraise_algos,
                            verity_digest=lambda a: self._verity_digest(ii, f, a, {a}),
                            sigv3_required=d.appraise_type == "sigv3",
                            verity_required=d.digest_type == "verity",
                            default_algo=n.hash_algo)
                        h["appraisal"] = {"status": r.status, "cause": r.cause,
                                          "detail": r.detail, "keyid": (f"{r.keyid:08x}"
                                                                        if r.keyid is not None else None),
                                          "allowed": r.passed or n.appraise_mode != "enforce"}
                    entry["hooks"].append(h)
                out["namespaces"].append(entry)
        return out

    # ------------------------------------------------------------------ namespaces
    def create_namespace(self, parent: Namespace, text: str, pid: int, uid: int, *,
                         check: Callable[[], None] | None = None,
                         bind: Callable[[Namespace], None] | None = None) -> Namespace:
        """``ns-create``: a child of ``parent``, into which process ``pid`` moves. The
        creation is measured in the parent's list (``ns-create``) and starts the
        child's (``ns-init``), with the same data, so a verifier ties them -- before
        anyone moves: a creation the parent's list cannot show (full disk) moves
        nobody. ``check()`` (raises NamespaceError) runs once the request is parsed;
        ``bind(child)`` moves the process (default: the binder moves ``pid``). When it
        cannot be moved, the child is removed again, through ``ns-remove`` once its
        creation is in the parent's list, so the list tells what happened."""
        name, opts = self.tree.parse_create(text)
        if check is not None:
            check()
        try:
            child = self.tree.create(parent, name, opts)
        except NamespaceError:
            raise
        except ValueError as e:     # options the list or the templates refuse
            raise NamespaceError(errno.EINVAL, f"namespace {name!r}: {e}") from None
        except Exception as e:  # noqa: BLE001 - lmdb.Error (full disk): nothing created
            raise NamespaceError(errno.EIO, f"cannot store namespace {name!r}: {e}") from None
        data = (f"ns-create name={child.path} id={child.id} uuid={child.uuid} "
                f"template={child.template} hash={child.hash_algo} "
                f"appraise={child.appraise_mode}").encode()
        recorded = False
        try:
            self.record_event(parent, "ns-create", data)
            recorded = True
            self.record_event(child, "ns-init", data)
        except Exception as e:  # noqa: BLE001 - fail closed, the process stays where it is
            self._undo_create(parent, child, recorded, pid, uid)
            raise NamespaceError(errno.EIO, f"cannot record the creation of {child.path}: "
                                            f"{e}") from None
        if bind is None and self.binder is not None:
            bind = lambda c: self.binder.bind(pid, c.id)  # noqa: E731
        if bind is not None:
            try:
                bind(child)
            except Exception as e:  # noqa: BLE001 - BindingError, OSError
                self._undo_create(parent, child, True, pid, uid)
                raise NamespaceError(errno.EPERM, f"{e}; namespace {child.path} removed "
                                                  f"again") from None
        self.audit.record("ns_create", ns=parent.path, child=child.path, id=child.id,
                          uuid=child.uuid, pid=pid, uid=uid)
        return child

    def _undo_create(self, parent: Namespace, child: Namespace, recorded: bool, pid: int,
                     uid: int) -> None:
        try:
            if recorded:
                self.remove_namespace(parent, child.name, pid, uid)
            else:
                self.tree.remove(parent, child.name)
                if self.binder is not None:
                    self.binder.remove(child.id)
        except Exception as e:  # noqa: BLE001 - report, the refusal stands
            log.error("namespace %s: cannot remove it after a failed creation: %s",
                      child.path, e)

    def remove_namespace(self, parent: Namespace, text: str, pid: int, uid: int) -> Namespace:
        name = text.strip()
        child = parent.children.get(name)
        if child is None:
            raise NamespaceError(errno.ENOENT, f"no namespace {name!r} under {parent.path}")
        if self.binder is not None and self.binder.members(child.id):
            raise NamespaceError(errno.EBUSY, f"namespace {child.path} still has processes")
        self.tree.remove(parent, name)
        if self.binder is not None:
            try:
                self.binder.remove(child.id)
            except Exception as e:  # noqa: BLE001 - the namespace is gone either way
                log.warning("namespace %s: %s", child.path, e)
        # The child's list stays in LMDB (its id is never given again) but is no longer
        # served; its final length and PCR 10 go into the parent's list.
        final = f"entries={child.mlist.count}"
        try:
            bank = "sha256" if "sha256" in child.mlist.banks else child.mlist.banks[0]
            final += f" pcr10={bank}:{child.mlist.pcr(bank, 10).hex()}"
        except Exception:  # noqa: BLE001 - a list without PCRs (tests)
            pass
        self.record_event(parent, "ns-remove", f"ns-remove name={child.path} id={child.id} "
                                               f"uuid={child.uuid} {final}".encode())
        self.audit.record("ns_remove", ns=parent.path, child=child.path, id=child.id, pid=pid,
                          uid=uid)
        return child

    def record_event(self, ns: Namespace, name: str, buf: bytes, *, pcr: int = 10) -> bool:
        """Measure a buffer (``ima-buf``) into a namespace's list (namespace creation,
        policy updates...)."""
        from imafs.ima.templates import buf_entry
        return ns.mlist.add(buf_entry(name, buf, algo=ns.hash_algo, pcr=pcr))


def _fgetxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


WOULD_BLOCK = object()       # file_open(inline=True): decide it in a worker thread
_COUNTS = threading.Lock()   # guards every IInt's readers/writers/wgen (held briefly)
_FUNC_ALIAS = {"FILE_MMAP": "MMAP_CHECK", "MMAP_CHECK_REQPROT": "MMAP_CHECK",
               "PATH_CHECK": "FILE_CHECK"}
_SUBJECT_FIELDS = {"uid", "euid", "gid", "egid", "suid", "sgid"}


_VERITY_TREE_DIGEST = "verity-sha256"   # the fs-verity digest of ii.tree, in ii.digests
_VIOLATION_FUNCS = ("FILE_CHECK", "MMAP_CHECK", "MMAP_CHECK_REQPROT")


def _measure_algo(n: Namespace, xattr: bytes | None) -> str:
    """The algorithm of a measurement (and of an audit record): the one the file's
    ``security.ima`` names, when this Python can compute it (the kernel's
    ima_get_hash_algo(), so a signature in an ima-sig entry covers the recorded
    digest); else the namespace's ``--hash``."""
    algo = ap.needed_algo(xattr)
    if algo is None or algo == n.hash_algo:
        return n.hash_algo
    try:
        hashing.hash_algo(algo).new()
    except (ValueError, hashing.HashAlgoError):
        return n.hash_algo
    return algo


INTERP_WINDOW = 2.0    # seconds between an ELF's exec open and its loader's
FILL_MAX = 1 << 30     # files up to this size go into the page cache as they are hashed
MMAP_HOOKS = (("MMAP_CHECK_REQPROT", MAY_EXEC), ("MMAP_CHECK", MAY_EXEC))


def open_hooks(mask: int, exec_: bool, role: str | None, library: bool
               ) -> list[tuple[str, int]]:
    """The (func, mask) hooks one open stands for (README: hook mapping), in the
    kernel's order. ``role`` of an exec open: "elf" (the binary the exec runs),
    "interp" (the ELF interpreter it loads) or "other" (a #! script, not ELF);
    ``library``: a read-only open of an ELF file that is not an exec (the loader's)."""
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
        return _exec_creds(ids, st, pid, role)
    return ids


def _stat_version(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _exec_creds(ids: dict, st: os.stat_result, pid=None, role=None) -> dict:
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


def _chain_fp(chain) -> tuple:
    """What the decisions of a namespace chain depend on, as content (epochs restart
    with a mount): each namespace's fingerprint."""
    return tuple(n.fingerprint() for n in chain)


def _epochs(chain) -> tuple:
    """The policy and keyring epochs of a namespace chain (verdicts depend on them)."""
    return tuple(n.epoch() for n in chain)


def _has_measure(policy) -> bool:
    """Does the policy have a measure rule (the kernel's ima_policy_flag & IMA_MEASURE)?"""
    cache = getattr(policy, "_imafs_measures", None)
    if cache is None:
        cache = any(r.action == "measure" for r in policy.rules)
        try:
            policy._imafs_measures = cache
        except AttributeError:
            pass
    return cache


def _has_func(policy, func: str) -> bool:
    cache = getattr(policy, "_imafs_funcs", None)
    if cache is None:
        cache = {_FUNC_ALIAS.get(r.func, r.func) for r in policy.rules}
        try:
            policy._imafs_funcs = cache
        except AttributeError:
            pass
    return func in cache or None in cache


def _entry(template: str, path: bytes, subject_ns: int, digest: bytes, xattr, pcr: int,
           algo: str, digest_type: str = "ima"):
    """``ns`` (template ima-ns) records the namespace of the process that accessed the
    file, so a host list tells containers apart."""
    return build_entry(template, name=path, algo=algo, digest=digest, pcr=pcr, xattr=xattr,
                       ns_id=subject_ns, digest_type=digest_type)


def _verity_template(template: str) -> str:
    """A template that can say "this is an fs-verity digest" (the d-ngv2 field):
    ``digest_type=verity`` without ``template=`` and a namespace default lacking it
    records with ima-ngv2 (ima-sigv2 when the default records signatures)."""
    fields = TEMPLATES.get(template, ())
    if "d-ngv2" in fields:
        return template
    return "ima-sigv2" if "sig" in fields else "ima-ngv2"


def _watchers(decided) -> tuple:
    """The namespaces whose policy measured or appraised an open, in chain order:
    the ones whose reads are verified, and that record a read-verify violation."""
    out = []
    for n, ev, d in decided:
        if (d.measure or (d.appraise and n.appraise_mode != "off")) and n not in out:
            out.append(n)
    return tuple(out)
