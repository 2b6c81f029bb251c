"""Behaviour-model events and how each one maps to a coefficient (TSEM's map.c).

A *security event* is one thing a task did through the mount (open a file, run one,
create, remove, rename, chmod ...). It is reduced to a **coefficient**, a sha256 over

    coefficient = H(name || parent_id || task_id || H(COE) || H(CELL))

* ``name``: the event's name in ASCII, as TSEM names its LSM hooks (``file_open``,
  ``inode_unlink`` ...; the list is :data:`EVENTS`), no length, no terminator (the
  four 32-byte values after it have a fixed size);
* ``parent_id``, ``task_id``: the task's identities (32 bytes each, see below);
* ``COE`` (context of execution): the credentials, ``uid euid suid gid egid sgid fsuid
  fsgid`` as little-endian u32 and ``capeff`` as a little-endian u64 (40 bytes);
* ``CELL``: what the event acted on, a sequence of typed parts per event (the table
  :data:`EVENTS`; the byte form of each part in :func:`encode_cell`).

A task's identity changes when it runs a program (TSEM's bprm_committing_creds):

    task_id' = H("bprm_committing_creds" || parent_id || 0^32 || H(COE) || H(CELL))

with the CELL of the program file (access, inode, path, digest) and ``parent_id`` the
identity its parent had when the task was first seen. A task first seen with no known
parent (the workload's first process) starts with both identities zero.

Everything here is pure: the model (:mod:`imafs.ima.model`) decides which path form
and which digest a part resolves to (files created inside the model and pseudonyms),
then calls :func:`encode_cell` and :func:`describe_cell`. docs/models.md is the
specification an independent verifier works from.
"""
from __future__ import annotations

import functools
import struct
from typing import Hashable, NamedTuple

from imafs.ima import hashing

_sha256 = hashing.hash_algo("sha256").constructor()
DIGEST_SIZE = 32
ZERO = bytes(DIGEST_SIZE)

# include/linux/fs.h MAY_* (the IMA policy's mask values)
MAY_EXEC, MAY_WRITE, MAY_READ, MAY_APPEND = 0x1, 0x2, 0x4, 0x8
# include/uapi/asm-generic/mman-common.h, mman.h
PROT_READ, PROT_WRITE, PROT_EXEC = 0x1, 0x2, 0x4
MAP_SHARED, MAP_PRIVATE = 0x1, 0x2
# include/linux/fs.h ATTR_* (iattr.ia_valid)
ATTR_MODE, ATTR_UID, ATTR_GID, ATTR_SIZE, ATTR_ATIME, ATTR_MTIME = 1, 2, 4, 8, 16, 32

IDENTITY_EVENT = "bprm_committing_creds"
_IDENTITY = IDENTITY_EVENT.encode()

# Part kinds. Byte forms (all integers little-endian):
U32, U64 = "u32", "u64"          # 4 / 8 bytes
INODE = "inode"                  # uid u32, gid u32, mode u32
OPT_INODE = "opt_inode"          # 0x00, or 0x01 then an inode
PATH = "path"                    # 0x00 len u32 name | 0x01 len u32 dir instance u64 owner
DIGEST = "digest"                # 32 bytes
STR = "str"                      # len u32, bytes (a name: JSON text)
BLOB = "blob"                    # len u32, bytes (a value: JSON hex)

_FILE = ((U32, "access"), (INODE, "inode"), (PATH, "path"), (DIGEST, "digest"))
# The CELL of each event: (kind, name) in byte order. The same table drives the byte
# form and the JSON description, so the two never disagree.
EVENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "file_open": _FILE,
    "bprm_check": _FILE,
    "mmap_file": ((INODE, "inode"), (PATH, "path"), (DIGEST, "digest"),
                  (U32, "prot"), (U32, "flags")),
    "inode_create": ((INODE, "dir"), (PATH, "path"), (U32, "mode")),
    "inode_mkdir": ((INODE, "dir"), (PATH, "path"), (U32, "mode")),
    "inode_unlink": ((INODE, "dir"), (INODE, "inode"), (PATH, "path")),
    "inode_rmdir": ((INODE, "dir"), (INODE, "inode"), (PATH, "path")),
    "inode_rename": ((INODE, "old_dir"), (INODE, "inode"), (PATH, "old_path"),
                     (INODE, "new_dir"), (OPT_INODE, "target"), (PATH, "new_path")),
    "inode_link": ((INODE, "inode"), (PATH, "old_path"), (INODE, "new_dir"),
                   (PATH, "new_path")),
    "inode_symlink": ((INODE, "dir"), (PATH, "path"), (STR, "target")),
    "inode_setattr": ((INODE, "inode"), (PATH, "path"), (U32, "valid"), (U32, "mode"),
                      (U32, "uid"), (U32, "gid"), (U64, "size")),
    "inode_setxattr": ((INODE, "inode"), (PATH, "path"), (STR, "name"), (BLOB, "value"),
                       (U32, "flags")),
    "inode_removexattr": ((INODE, "inode"), (PATH, "path"), (STR, "name")),
}
EVENTS[IDENTITY_EVENT] = _FILE
_BNAMES = {n: n.encode() for n in EVENTS}

_u32 = struct.Struct("<I").pack
_u64 = struct.Struct("<Q").pack
_inode = struct.Struct("<III").pack


class Coe(NamedTuple):
    """The context of execution: the credentials a task acts with (/proc/PID/status
    Uid:, Gid: and CapEff: lines, seen from the mount's user namespace)."""
    uid: int = 0
    euid: int = 0
    suid: int = 0
    gid: int = 0
    egid: int = 0
    sgid: int = 0
    fsuid: int = 0
    fsgid: int = 0
    capeff: int = 0

    def encode(self) -> bytes:
        return struct.pack("<8IQ", *self)

    def describe(self) -> dict:
        return self._asdict()


@functools.lru_cache(maxsize=4096)
def coe_digest(coe: Coe) -> bytes:
    """H(COE); a workload has few distinct credential sets, so this is a cache hit."""
    return _sha256(coe.encode()).digest()


class Inode(NamedTuple):
    """The inode fields a CELL carries: owner, group and mode (type and permission
    bits, as st_mode)."""
    uid: int
    gid: int
    mode: int

    @classmethod
    def of(cls, st) -> "Inode":
        return cls(st.st_uid, st.st_gid, st.st_mode)


class Event:
    """One security event, its CELL values as :data:`EVENTS` lists them.

    ``values`` holds each part as it resolves in a model with no created files and no
    pseudonyms: an int for u32/u64, an :class:`Inode` (or None for opt_inode), bytes
    for a path, the 32-byte digest (zero when the file has none), bytes for str and
    blob. ``refs`` lists what a model may substitute: ``(index, PATH, path, file_key)``
    and ``(index, DIGEST, path, file_key)``; ``file_key`` is the engine's stable
    identity of the file (it lets a model recognise files created inside it), None
    when unknown. ``identity``: a bprm_check after which the task runs this file (its
    identity changes). ``creates``: an inode_create (the new file is named by its
    instance, see the model)."""
    __slots__ = ("name", "bname", "values", "refs", "identity", "creates", "_cell",
                 "_cell_id", "_pseudonym")

    def __init__(self, name: str, values: tuple, refs: tuple = (), identity: bool = False,
                 creates: bool = False):
        if name not in EVENTS:
            raise ValueError(f"unknown model event {name!r}")
        if len(values) != len(EVENTS[name]):
            raise ValueError(f"{name}: {len(EVENTS[name])} values expected, got {len(values)}")
        self.name = name
        self.bname = _BNAMES[name]
        self.values = values
        self.refs = refs
        self.identity = identity
        self.creates = creates
        self._cell = None
        self._cell_id = None
        self._pseudonym = None

    def cell(self) -> bytes:
        """The CELL bytes with ``values`` as they are (computed once)."""
        c = self._cell
        if c is None:
            c = self._cell = encode_cell(self.name, self.values)
        return c

    def cell_id(self) -> bytes:
        """H(CELL) with ``values`` as they are (computed once: an engine that keeps
        an event for a file version maps each open of it with one sha256)."""
        c = self._cell_id
        if c is None:
            c = self._cell_id = _sha256(self.cell()).digest()
        return c

    def pseudonym(self) -> bytes | None:
        """The pseudonym of the path whose digest this event carries (None: it
        carries no file digest)."""
        p = self._pseudonym
        if p is None:
            for _, kind, path, _ in self.refs:
                if kind is DIGEST:
                    p = self._pseudonym = pseudonym(path)
                    break
        return p

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.values!r})"


def _path(path) -> bytes:
    if type(path) is not bytes:
        path = (path.encode("utf-8", "surrogateescape") if isinstance(path, str)
                else bytes(path))
    if path[:1] != b"/":
        raise ValueError(f"model paths are absolute inside the mount: {path!r}")
    return path


def _digest(digest: bytes | None) -> bytes:
    if digest is None:
        return ZERO
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"a file digest in a model is sha256 (32 bytes), not {len(digest)}")
    return digest if type(digest) is bytes else bytes(digest)


# --------------------------------------------------------------------------- events

def file_open(path, inode: Inode, digest: bytes | None, access: int,
              key: Hashable = None) -> Event:
    """An open (FILE_CHECK); ``access`` is the MAY_* mask (read, write, append);
    ``digest`` the sha256 of the file's content, None when it has none (not regular)."""
    p = _path(path)
    return Event("file_open", (access, inode, p, _digest(digest)),
                 ((2, PATH, p, key), (3, DIGEST, p, key)))


def bprm_check(path, inode: Inode, digest: bytes | None, key: Hashable = None,
               identity: bool = True) -> Event:
    """An exec open, seen with the identity the task had before it. ``identity``:
    this is the program the task now runs (TSEM's bprm->file: the ELF binary or a
    script's interpreter, not the dynamic loader nor the script itself)."""
    p = _path(path)
    return Event("bprm_check", (MAY_EXEC, inode, p, _digest(digest)),
                 ((2, PATH, p, key), (3, DIGEST, p, key)), identity=identity)


def mmap_file(path, inode: Inode, digest: bytes | None, prot: int = PROT_READ | PROT_EXEC,
              flags: int = MAP_PRIVATE, key: Hashable = None) -> Event:
    """An executable mapping. FUSE sees no mmap: the engine reports the loader's
    read-only open of an ELF file as this event (its MMAP_CHECK approximation)."""
    p = _path(path)
    return Event("mmap_file", (inode, p, _digest(digest), prot, flags),
                 ((1, PATH, p, key), (2, DIGEST, p, key)))


def inode_create(dir_inode: Inode, path, mode: int) -> Event:
    p = _path(path)
    return Event("inode_create", (dir_inode, p, mode), ((1, PATH, p, None),), creates=True)


def inode_mkdir(dir_inode: Inode, path, mode: int) -> Event:
    return Event("inode_mkdir", (dir_inode, _path(path), mode))


def inode_unlink(dir_inode: Inode, path, inode: Inode, key: Hashable = None) -> Event:
    p = _path(path)
    return Event("inode_unlink", (dir_inode, inode, p), ((2, PATH, p, key),))


def inode_rmdir(dir_inode: Inode, path, inode: Inode, key: Hashable = None) -> Event:
    p = _path(path)
    return Event("inode_rmdir", (dir_inode, inode, p), ((2, PATH, p, key),))


def inode_rename(old_dir: Inode, old_path, inode: Inode, new_dir: Inode, new_path,
                 target: Inode | None = None, key: Hashable = None,
                 target_key: Hashable = None) -> Event:
    """``target``: the inode the rename replaces, None when the new name is free."""
    old, new = _path(old_path), _path(new_path)
    return Event("inode_rename", (old_dir, inode, old, new_dir, target, new),
                 ((2, PATH, old, key), (5, PATH, new, target_key)))


def inode_link(old_path, inode: Inode, new_dir: Inode, new_path,
               key: Hashable = None) -> Event:
    old = _path(old_path)
    return Event("inode_link", (inode, old, new_dir, _path(new_path)), ((1, PATH, old, key),))


def inode_symlink(dir_inode: Inode, path, target: bytes) -> Event:
    return Event("inode_symlink", (dir_inode, _path(path), bytes(target)))


def inode_setattr(path, inode: Inode, *, mode: int | None = None, uid: int | None = None,
                  gid: int | None = None, size: int | None = None, atime: bool = False,
                  mtime: bool = False, key: Hashable = None) -> Event:
    """A chmod/chown/truncate/utimes: ``valid`` says which fields change (ATTR_*); a
    field not changed is 0. Times are flagged, their values left out (they differ at
    every run)."""
    valid = ((ATTR_MODE if mode is not None else 0) | (ATTR_UID if uid is not None else 0)
             | (ATTR_GID if gid is not None else 0) | (ATTR_SIZE if size is not None else 0)
             | (ATTR_ATIME if atime else 0) | (ATTR_MTIME if mtime else 0))
    p = _path(path)
    return Event("inode_setattr", (inode, p, valid, mode or 0, uid or 0, gid or 0, size or 0),
                 ((1, PATH, p, key),))


def inode_setxattr(path, inode: Inode, name: bytes, value: bytes, flags: int = 0,
                   key: Hashable = None) -> Event:
    p = _path(path)
    return Event("inode_setxattr", (inode, p, bytes(name), bytes(value), flags),
                 ((1, PATH, p, key),))


def inode_removexattr(path, inode: Inode, name: bytes, key: Hashable = None) -> Event:
    p = _path(path)
    return Event("inode_removexattr", (inode, p, bytes(name)), ((1, PATH, p, key),))


# --------------------------------------------------------------------------- CELL

class Created(NamedTuple):
    """A path as a file created inside the model names it: its directory (with the
    trailing slash), the instance number and the identity of the task that made it."""
    dir: bytes
    instance: int
    owner: bytes


def _enc_path(v) -> bytes:
    if type(v) is Created:
        return b"\x01" + _u32(len(v.dir)) + v.dir + _u64(v.instance) + v.owner
    return b"\x00" + _u32(len(v)) + v


def _enc_digest(v: bytes) -> bytes:
    if len(v) != DIGEST_SIZE:
        raise ValueError(f"a digest part is {DIGEST_SIZE} bytes, not {len(v)}")
    return v


_ENCODERS = {
    U32: _u32, U64: _u64, INODE: lambda v: _inode(*v),
    OPT_INODE: lambda v: b"\x00" if v is None else b"\x01" + _inode(*v),
    PATH: _enc_path, DIGEST: _enc_digest,
    STR: lambda v: _u32(len(v)) + v, BLOB: lambda v: _u32(len(v)) + v,
}
_PLANS = {name: tuple(_ENCODERS[kind] for kind, _ in parts) for name, parts in EVENTS.items()}
_FILE_HEAD = struct.Struct("<IIIIBI").pack     # access, inode, plain-path tag and length
_FILE_EVENTS = frozenset(n for n, parts in EVENTS.items() if parts is _FILE)


def encode_cell(name: str, values: tuple) -> bytes:
    """The CELL bytes of a resolved event: each part's byte form, concatenated (a path
    is bytes or :class:`Created`, a digest 32 bytes)."""
    try:
        if name in _FILE_EVENTS:               # the common case, in one pack
            access, inode, path, digest = values
            if type(path) is bytes and len(digest) == DIGEST_SIZE:
                return _FILE_HEAD(access, *inode, 0, len(path)) + path + digest
        return b"".join([f(v) for f, v in zip(_PLANS[name], values)])
    except struct.error as e:
        raise ValueError(f"{name}: a value does not fit its part: {e}") from None


def cell_id(name: str, values: tuple) -> bytes:
    """H(CELL) of a resolved event."""
    return _sha256(encode_cell(name, values)).digest()


def text(b: bytes) -> str:
    """A name as JSON text: UTF-8, an undecodable byte B as the code point U+DC00+B
    (Python's surrogateescape; JSON writes it \\udcXX). Never ambiguous: valid UTF-8
    holds no surrogate."""
    return b.decode("utf-8", "surrogateescape")


def describe_cell(name: str, values: tuple) -> dict:
    """The JSON description of a resolved CELL (the same parts, by name)."""
    out = {}
    for (kind, key), v in zip(EVENTS[name], values):
        if kind is INODE:
            v = v._asdict()
        elif kind is OPT_INODE:
            v = None if v is None else v._asdict()
        elif kind is PATH:
            v = ({"pathname": text(v.dir), "instance": v.instance, "owner": v.owner.hex()}
                 if type(v) is Created else {"pathname": text(v)})
        elif kind is DIGEST or kind is BLOB:
            v = v.hex()
        elif kind is STR:
            v = text(v)
        out[key] = v
    return out


# --------------------------------------------------------------------------- mapping

def coefficient(name: str | bytes, parent_id: bytes, task_id: bytes, coe_id: bytes,
                cell: bytes) -> bytes:
    if type(name) is str:
        name = name.encode()
    return _sha256(name + parent_id + task_id + coe_id + _sha256(cell).digest()).digest()


def coefficient_of(name: bytes, parent_id: bytes, task_id: bytes, coe_id: bytes,
                   cell_id: bytes) -> bytes:
    """:func:`coefficient` given H(CELL)."""
    return _sha256(name + parent_id + task_id + coe_id + cell_id).digest()


def task_identity(parent_id: bytes, coe_id: bytes, program_cell: bytes) -> bytes:
    """The identity of a task after it runs a program (the program's file CELL)."""
    return coefficient(_IDENTITY, parent_id, ZERO, coe_id, program_cell)


def task_identity_of(parent_id: bytes, coe_id: bytes, cell_id: bytes) -> bytes:
    """:func:`task_identity` given H(CELL) of the program."""
    return coefficient_of(_IDENTITY, parent_id, ZERO, coe_id, cell_id)


def pseudonym(path) -> bytes:
    """A pseudonym: H(len u32 || path), the path inside the mount."""
    p = _path(path)
    return _sha256(_u32(len(p)) + p).digest()


def extend(value: bytes, point: bytes, base: bytes = ZERO) -> bytes:
    """One step of a measurement or state: H(value || H(base || point))."""
    return _sha256(value + _sha256(base + point).digest()).digest()


def compute_state(aggregate: bytes, points, base: bytes = ZERO) -> bytes:
    """The state: from the aggregate, an extend over the unique points in ascending
    byte order (whatever order they came in)."""
    value = extend(ZERO, aggregate, base)
    for p in sorted(set(points)):
        value = extend(value, p, base)
    return value
