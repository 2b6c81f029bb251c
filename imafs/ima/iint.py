"""File identity and per-inode integrity state (the kernel's ima_iint.c), and the
value types every step of the engine passes around.

- :class:`Subject`: the process behind a request (its ids read from /proc on demand).
- :class:`FileRef`: a file as the FUSE adapter opened it -- identity (``key``) and
  version (``version``), plus what the engine may do with it (read, reopen, xattrs).
- :class:`IInt`: per-inode state (the kernel's ``integrity_iint_cache``): the version
  last seen, its digests and verity tree, per namespace what was measured, appraised
  and audited, the verdicts of read-only opens, the open counts.
- :class:`IIntTable`: every IInt of a mount, least recently used forgotten first
  (never one with open handles).
- :class:`OpenState`: what the engine remembers about one open handle until release.
- :class:`Pending`: the one way the engine says "not on the event loop": it carries
  what the inline attempt computed, and ``finish()`` completes that same work in a
  worker thread.
- :class:`AccessDenied`: the refusal of an access (an errno and a reason).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

IINT_CACHE_SIZE = 65536
#: guards every IInt's readers/writers/wgen and live trees (held briefly, never
#: while waiting for anything else)
COUNTS = threading.Lock()


class AccessDenied(Exception):
    """An access refused: ``errno`` is what the request fails with."""

    def __init__(self, err: int, reason: str):
        super().__init__(reason)
        self.errno = err
        self.reason = reason


class Pending:
    """Work the event loop must not do (hashing, waiting for a file's lock, reading
    from disk): ``args`` is what the inline attempt already computed, ``finish()``
    (called once, from a worker thread) completes the same work from there and
    returns what the call that gave this Pending would have returned, or raises as
    it would have.

    ``cost`` (bytes it may hash: 0 for a read, a release or a wait) and ``owner``
    (who asked: (uid, namespace id)) let the caller schedule it: the FUSE layer
    gives big hashing passes a lane of their own, shared fairly between owners
    (fs/lanes.py), so that one caller's big files never hold up another's small
    ones."""
    __slots__ = ("_fn", "args", "cost", "owner")

    def __init__(self, fn: Callable, *args, cost: int = 0, owner=None):
        self._fn = fn
        self.args = args
        self.cost = cost
        self.owner = owner

    def finish(self):
        return self._fn(*self.args)

    def __repr__(self) -> str:
        return f"Pending({getattr(self._fn, '__qualname__', self._fn)})"


def settle(result):
    """``result``, or what its Pending finishes to (for callers that may block)."""
    return result.finish() if type(result) is Pending else result


@dataclass
class Subject:
    """The process behind a request: pid and the fsuid/fsgid the request carries;
    real/effective ids are read from /proc only when a rule needs them."""
    pid: int
    uid: int
    gid: int
    _ids: dict | None = field(default=None, repr=False, compare=False)
    # (pid) -> whether that process runs a program from the mount (its executable is
    # a file of the mount), supplied by the adapter; None: it does not
    program_here: Callable[[int], bool] | None = field(default=None, repr=False,
                                                      compare=False)
    _here: bool | None = field(default=None, repr=False, compare=False)

    def runs_program_here(self) -> bool:
        """Does the process run a program from the mount (asked once per Subject)?"""
        if self._here is None:
            self._here = bool(self.program_here is not None and self.pid > 0
                              and self.program_here(self.pid))
        return self._here

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
    # sb->s_uuid, the 16 bytes EVM hashes into HMACs and type-3 signatures
    # (FS_IOC_GETFSUUID); None where the kernel does not say
    s_uuid: bytes | None = None


@dataclass
class FileRef:
    """A file as the adapter opened it. ``fd`` is the caller's descriptor (it may be
    write-only); ``reopen()`` gives a fresh read-only descriptor of the same inode
    (the engine closes it); ``getxattr``/``setxattr`` act on the backing inode
    (``getxattr`` may read through ``fd``: use it only while the open is decided).
    ``st``, ``fs`` (its ``s_uuid`` too) and ``generation`` are what EVM covers besides
    the xattrs."""
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
    # read-time verification on the event loop: (fd, size, offset) -> up to size bytes
    # from the page cache only (RWF_NOWAIT; short at EOF), or None when that would
    # block or cannot be done; None: every verified read goes to a worker thread
    pread_nowait: Callable[[int, int, int], bytearray | None] | None = None
    # removes an xattr of the backing inode (EVM: a security.evm nothing protected
    # is left for)
    removexattr: Callable[[str], None] | None = None
    # () -> a context manager giving ``gone() -> bool``: whether the process that
    # asked for this open is gone (a pidfd: no pid reuse). A hashing pass for nobody
    # is abandoned (pyfuse3 delivers no FUSE interrupts); None: never abandoned
    opener: Callable[[], object] | None = None
    # () -> None: have the kernel write back (or drop) the mount's dirty pages of this
    # file, and wait for it (a worker thread only: the WRITEs it causes are served
    # meanwhile); None when there is no page cache to sync
    writeback: Callable[[], None] | None = None
    # (pids) -> whether one of these processes maps the file shared (MAP_SHARED): the
    # kernel's "mmapped_writers" rather than "open_writers"; None: unknown
    shared_mapping: Callable[[list[int]], bool] | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.st.st_dev, self.st.st_ino)

    @property
    def version(self) -> tuple[int, int, int, int]:
        return (self.st.st_mtime_ns, self.st.st_ctime_ns, self.st.st_size, self.generation)


def stat_version(st: os.stat_result) -> tuple[int, int, int]:
    """The part of a version that fstat shows (the generation aside)."""
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size)


class IInt:
    """Per-inode integrity state (the kernel's iint)."""
    __slots__ = ("key", "version", "digests", "tree", "measured", "must_measure",
                 "appraised", "audited", "readers", "writers", "lock", "dirty", "wgen",
                 "update_xattr", "verdicts", "live", "live_wgen", "binfmt", "new_file",
                 "write_mark", "writer_pids", "settling")

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
        # the verdicts of read-only opens whose every action is done for this version
        # (the kernel's IMA_DONE_MASK flags): verdict key -> (epochs, decided, verifiers)
        self.verdicts: dict = {}
        # read-time verification: the verity trees open handles verify their reads
        # against, id(tree) -> [tree, verifiers, handles], valid while live_wgen == wgen
        # (a writable open ends every verification); kept across reset(): the handles
        # are still open, and the kernel's page cache of the inode is shared by all
        self.live: dict = {}
        self.live_wgen = 0
        self.binfmt = None      # (version, is ELF, PT_INTERP path or None)
        # the kernel's IMA_NEW_FILE: an appraised open created the file and found no
        # label, so it may be opened without one until the last writer closes it; kept
        # across reset() (attribute changes: the kernel since 6.14 keeps it across
        # ima_inode_post_setattr), lost with the IInt (as the kernel's with its inode)
        self.new_file = False
        # the file is marked in the verdict cache's write marks (a writer is or was open
        # through the mount and its last close has not been processed yet)
        self.write_mark = False
        # pid -> writable handles it opened through the mount (under COUNTS): whose
        # mappings to look at when a refusal names its cause
        self.writer_pids: dict[int, int] = {}
        # set while the last writer's close is processed (a worker thread): an open
        # that comes meanwhile waits for it, as the kernel's close finishes before
        # close(2) returns
        self.settling: threading.Event | None = None

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
        self.verdicts = {}
        self.binfmt = None

    def live_trees(self) -> list:
        """[(tree, verifiers)] of the handles that verify reads of this file now."""
        with COUNTS:
            if self.live_wgen != self.wgen or not self.live:
                return []
            return [(rec[0], rec[1]) for rec in self.live.values()]


class IIntTable:
    """Every IInt of a mount by file identity, at most ``size``: the least recently
    used idle one (no open handle) is forgotten first."""

    def __init__(self, size: int = IINT_CACHE_SIZE):
        self.size = size
        self._iints: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> IInt:
        """The IInt of ``key``, made when there is none."""
        with self._lock:
            ii = self._iints.get(key)
            if ii is None:
                ii = IInt(key)
                self._iints[key] = ii
                if len(self._iints) > self.size:
                    for k, old in self._iints.items():
                        if old.readers == 0 and old.writers == 0:
                            del self._iints[k]
                            break
            else:
                self._iints.move_to_end(key)
            return ii

    def find(self, key) -> IInt | None:
        """The IInt of ``key`` if there is one (none is made)."""
        with self._lock:
            return self._iints.get(key)


@dataclass(slots=True)
class OpenState:
    """What the engine remembers about one open handle until its release."""
    iint: IInt
    ns: object          # the opener's Namespace
    file: FileRef
    readable: bool
    writable: bool
    decisions: list = field(default_factory=list)   # [(ns, AccessEvent, Decision)]
    # read-time verification: the verity tree this handle's reads are checked against
    # (None: reads are not verified), the namespaces that measured/appraised the file
    # (its verifiers), the opener, and ii.wgen at open (a writable open through the
    # mount since stops it)
    tree: object = None
    verifiers: tuple = ()
    subject: Subject | None = None
    wgen: int = 0
    failed: set | None = None   # id()s of the trees this handle's reads failed
    ref: object = None      # the adapter's own data about the handle (opaque here)
