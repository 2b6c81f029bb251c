"""The digest lists a namespace has loaded, indexed in LMDB (DIGLIM's hash tables).

Pure Python over :class:`imafs.store.Store`; no FUSE.  One :class:`DigestListIndex`
per namespace; every key starts with the namespace id (be32), so the namespaces of a
mount share four named databases and a child's lists never vouch for its parent:

``dl-lists``    ns | list id (be32) -> the list's record (JSON: label, its own digest,
                the actions it was loaded with, size, block headers, provenance)
``dl-names``    ns | "n" | label -> list id;  ns | "d" | algo id | list digest -> list id
``dl-digests``  (dupsort) ns | type | algo id | digest -> list id (be32) | actions |
                block index (be32): one value per block of a list that holds it
``dl-data``     ns | list id -> the list's compact blocks (what removal walks)
``dl-meta``     ns | "next" -> next list id;  ns | "count" | type -> distinct digests

A list is added or removed in one write transaction: a reader sees all of its
digests or none, and a crash leaves no half-loaded list.  A digest that several
loaded lists hold stays until the last of them is removed (each list has its own
value under the digest).  The index survives remounts (it is in the store).

Lookups (:meth:`lookup`) read one key with a cursor and return the OR of the actions
of the lists that hold the digest: a few microseconds (docs/digest-lists.md).

What verdicts depend on: :attr:`DigestListIndex.epoch` changes with every list added
or removed through this object (a verdict of this mount given because of a list must
not outlive it), :meth:`state` is the same for the same loaded lists across mounts
(verdicts kept in LMDB).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Iterator, NamedTuple

from imafs.ima import digest_lists as dl
from imafs.ima import hashing

__all__ = ["DigestListIndex", "ListInfo", "Ref", "Hit", "IndexError_", "MAX_LABEL",
           "scratch_index"]

MAX_LABEL = 255
_BE32 = struct.Struct(">I")
_VALUE = struct.Struct(">IBI")          # list id, actions, block index
_COUNT = struct.Struct(">Q")
_ALL_ACTIONS = dl.ACTION_MEASURED | dl.ACTION_APPRAISED | dl.ACTION_APPRAISED_DIGSIG
_DBS = ("dl-lists", "dl-names", "dl-data", "dl-meta")


class IndexError_(Exception):
    """A refused index operation (message for the user; ``errno`` for a control file)."""

    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True)
class ListInfo:
    """One loaded list."""
    id: int
    label: str
    algo: str                       # algorithm of the list's own digest
    digest: bytes                   # digest of the list file as loaded
    actions: int
    size: int
    count: int                      # digests in the list (with repeats)
    blocks: tuple                   # (type, modifiers, algo, count) per block
    provenance: dl.Provenance | None
    origin: dict | None = None      # how it was loaded: path, pid, uid, time (imafs)

    def package(self, block: int) -> dl.Package | None:
        return self.provenance.package_of_block(block) if self.provenance else None

    def describe_block(self, block: int) -> str:
        """DIGLIM's digest_query line for a block of this list."""
        typ, mods, algo, count = self.blocks[block]
        return (f"{self.label} (actions: {self.actions}): version: {dl.VERSION}, "
                f"algo: {algo}, type: {typ}, modifiers: {mods}, count: {count}, "
                f"datalen: {count * hashing.digest_size(algo)}")


@dataclass(frozen=True)
class Ref:
    """A list that holds a queried digest, and where."""
    list: ListInfo
    type: int
    block: int

    def describe(self) -> str:
        """``debian.list (from bash 5.2.15-2+b7)`` -- for query and audit lines."""
        p = self.list.package(self.block)
        return f"{self.list.label}" + (f" (from {p.name} {p.version})" if p else "")


class Hit(NamedTuple):
    """A lookup's answer: the OR of the actions of every list holding the digest, and
    the first such list (its id and block) for messages."""
    actions: int
    list_id: int
    block: int


class DigestListIndex:
    def __init__(self, store, ns_id: int):
        if not 0 <= ns_id <= 0xFFFFFFFF:
            raise ValueError(f"namespace id {ns_id} does not fit in 32 bits")
        self.store = store
        self.ns_id = ns_id
        self._ns = _BE32.pack(ns_id)
        self._env = store.env
        self._db = {n: store.db(n) for n in _DBS}
        self._dig = store.db("dl-digests", dupsort=True)
        self._lock = threading.Lock()           # one writer of this namespace at a time
        self._info_cache: dict[int, ListInfo] = {}
        self._prefix: dict[tuple[int, str], bytes] = {}
        #: changes with every list added or removed (verdicts depend on it)
        self.epoch = 0
        self._derived: tuple | None = None     # (epoch, state, algos, sorted algos)

    # ------------------------------------------------------------------ keys
    def _dkey(self, type: int, algo_id: int, digest: bytes) -> bytes:
        return self._ns + bytes((type, algo_id)) + digest

    def _label_key(self, label: str) -> bytes:
        return self._ns + b"n" + label.encode("utf-8", "surrogateescape")

    def _ldigest_key(self, algo: str, digest: bytes) -> bytes:
        return self._ns + b"d" + bytes((hashing.algo_id(algo),)) + digest

    # ------------------------------------------------------------------ writes
    def add(self, label: str, data: bytes, *, actions: int, algo: str = "sha256",
            parsed: dl.DigestList | None = None, origin: dict | None = None) -> ListInfo:
        """Load a list file's bytes under ``label`` with the ``actions`` done to it
        (ACTION_* bits).  Refuses (IndexError_) a malformed list (EINVAL, nothing
        added), a label already loaded or the same list content loaded under another
        label (EEXIST, as DIGLIM refuses a list whose digest it knows). ``origin``:
        how it was loaded (JSON-able: path, pid, uid, time), kept with it."""
        _check_label(label)
        if not 0 <= actions <= 0xFF:
            raise ValueError(f"actions {actions} do not fit in 8 bits")
        try:
            lst = parsed if parsed is not None else dl.parse(data)
        except dl.DigestListError as e:
            raise IndexError_(f"{label}: {e}", 22) from None
        ldigest = hashing.hash_algo(algo).new(data).digest()
        entries = []
        for b_i, b in enumerate(lst.blocks):
            head = bytes((b.type, b.algo_id))
            n = b.digest_size
            dg = b.digests
            for off in range(0, len(dg), n):
                entries.append(self._ns + head + dg[off:off + n])
        record = {
            "label": label, "algo": hashing.hash_algo(algo).name, "digest": ldigest.hex(),
            "actions": actions, "size": len(data), "count": lst.count,
            "blocks": [[b.type, b.modifiers, b.algo, b.count] for b in lst.blocks],
            "provenance": lst.provenance.to_json() if lst.provenance else None,
        }
        if origin is not None:
            record["origin"] = origin
        with self._lock, self._env.begin(write=True) as txn:
            names, meta = self._db["dl-names"], self._db["dl-meta"]
            if txn.get(self._label_key(label), db=names) is not None:
                raise IndexError_(f"a digest list named {label!r} is already loaded", 17)
            other = txn.get(self._ldigest_key(algo, ldigest), db=names)
            if other is not None:
                rec = self._record(txn, _BE32.unpack(other)[0])
                raise IndexError_(f"{label}: the same list is already loaded as "
                                  f"{rec['label']!r}", 17)
            nk = self._ns + b"next"
            raw = txn.get(nk, db=meta)
            list_id = _BE32.unpack(raw)[0] if raw else 1
            txn.put(nk, _BE32.pack(list_id + 1), db=meta)
            lid = _BE32.pack(list_id)
            txn.put(self._ns + lid, json.dumps(record, separators=(",", ":")).encode(),
                    db=self._db["dl-lists"])
            txn.put(self._label_key(label), lid, db=names)
            txn.put(self._ldigest_key(algo, ldigest), lid, db=names)
            txn.put(self._ns + lid, lst.compact_bytes(), db=self._db["dl-data"])
            new = [0] * len(dl.TYPE_NAMES)
            cur = txn.cursor(db=self._dig)
            # values in block order; keys sorted so LMDB writes mostly append
            order = _block_of_entries(lst)
            for i in sorted(range(len(entries)), key=entries.__getitem__):
                k = entries[i]
                if not cur.set_key(k):
                    new[k[4]] += 1
                cur.put(k, _VALUE.pack(list_id, actions, order[i]), dupdata=True)
            self._add_counts(txn, new, +1)
        self.epoch += 1         # after the commit: a reader of the new epoch sees it
        info = self._info(list_id, record)
        return info

    def remove(self, label: str, *, actions: int | None = None) -> ListInfo:
        """Unload a list by label; its digests go unless another loaded list holds
        them.  With ``actions``: refused (EPERM) unless they include every action the
        list was added with (DIGLIM: a removal is measured if the addition was)."""
        with self._lock, self._env.begin(write=True) as txn:
            names = self._db["dl-names"]
            raw = txn.get(self._label_key(label), db=names)
            if raw is None:
                raise IndexError_(f"no digest list named {label!r} is loaded", 2)
            list_id = _BE32.unpack(raw)[0]
            rec = self._record(txn, list_id)
            if actions is not None and rec["actions"] & ~actions:
                raise IndexError_(
                    f"{label} was loaded {dl.format_actions(rec['actions'])}; removing it "
                    f"{dl.format_actions(actions)} is refused", 1)
            lid = _BE32.pack(list_id)
            data = txn.get(self._ns + lid, db=self._db["dl-data"]) or b""
            lst = dl.parse(data)
            gone = [0] * len(dl.TYPE_NAMES)
            cur = txn.cursor(db=self._dig)
            for b_i, b in enumerate(lst.blocks):
                head = self._ns + bytes((b.type, b.algo_id))
                value = _VALUE.pack(list_id, rec["actions"], b_i)
                for d in b:
                    k = head + d
                    if cur.set_key_dup(k, value):
                        cur.delete()
                        if not cur.set_key(k):
                            gone[b.type] += 1
            self._add_counts(txn, gone, -1)
            txn.delete(self._ns + lid, db=self._db["dl-lists"])
            txn.delete(self._ns + lid, db=self._db["dl-data"])
            txn.delete(self._label_key(label), db=names)
            txn.delete(self._ldigest_key(rec["algo"], bytes.fromhex(rec["digest"])), db=names)
        self.epoch += 1
        info = self._info(list_id, rec)
        self._info_cache.pop(list_id, None)     # info() of a removed list: None
        return info

    def clear(self) -> int:
        """Unload every list of the namespace (the namespace is removed); returns how
        many lists there were."""
        n = 0
        with self._lock, self._env.begin(write=True) as txn:
            for name in _DBS + ("dl-digests",):
                db = self._dig if name == "dl-digests" else self._db[name]
                cur = txn.cursor(db=db)
                if not cur.set_range(self._ns):
                    continue
                while cur.key()[:4] == self._ns:      # b"" past the end
                    n += name == "dl-lists"
                    if not cur.delete(dupdata=True):
                        break
        self.epoch += 1
        self._info_cache.clear()
        return n

    def _add_counts(self, txn, delta: list[int], sign: int) -> None:
        meta = self._db["dl-meta"]
        for t, n in enumerate(delta):
            if n:
                k = self._ns + b"count" + bytes((t,))
                raw = txn.get(k, db=meta)
                v = (_COUNT.unpack(raw)[0] if raw else 0) + sign * n
                txn.put(k, _COUNT.pack(max(v, 0)), db=meta)

    # ------------------------------------------------------------------ reads
    def lookup(self, algo: str, digest: bytes, type: int = dl.COMPACT_FILE) -> Hit | None:
        """The hot path: is ``digest`` in a loaded list, as a ``type`` digest? Returns
        the OR of the holding lists' actions and the first one, or None."""
        prefix = self._prefix.get((type, algo))
        if prefix is None:
            prefix = self._prefix[(type, algo)] = \
                self._ns + bytes((type, hashing.hash_algo(algo).ima_id))
        key = prefix + digest
        with self._env.begin(db=self._dig) as txn:
            first = txn.get(key)                # the first list's value (dupsort)
            if first is None:
                return None
            actions = first[4]
            if actions & _ALL_ACTIONS != _ALL_ACTIONS:   # what other lists add
                cur = txn.cursor()
                cur.set_key(key)
                for v in cur.iternext_dup():
                    actions |= v[4]
        list_id, _, block = _VALUE.unpack(first)
        return Hit(actions, list_id, block)

    def query(self, algo: str, digest: bytes) -> list[Ref]:
        """Every (list, type, block) that holds ``digest``: what ``digest_query``
        prints, one line per reference."""
        a = hashing.hash_algo(algo)
        out = []
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._dig)
            for t in sorted(dl.TYPE_NAMES):
                if t == dl.COMPACT_DIGEST_LIST:
                    continue
                k = self._dkey(t, a.ima_id, bytes(digest))
                if not cur.set_key(k):
                    continue
                for v in cur.iternext_dup():
                    list_id, _, block = _VALUE.unpack(v)
                    out.append(Ref(self._load_info(txn, list_id), t, block))
            # the digest of a loaded list itself (DIGLIM's COMPACT_DIGEST_LIST refs)
            raw = txn.get(self._ldigest_key(a.name, bytes(digest)), db=self._db["dl-names"])
            if raw is not None:
                out.append(Ref(self._load_info(txn, _BE32.unpack(raw)[0]),
                               dl.COMPACT_DIGEST_LIST, -1))
        return out

    def get(self, label: str) -> ListInfo | None:
        with self._env.begin() as txn:
            raw = txn.get(self._label_key(label), db=self._db["dl-names"])
            return None if raw is None else self._load_info(txn, _BE32.unpack(raw)[0])

    def info(self, list_id: int) -> ListInfo | None:
        with self._env.begin() as txn:
            try:
                return self._load_info(txn, list_id)
            except KeyError:
                return None

    def lists(self) -> list[ListInfo]:
        """The loaded lists, in the order they were added."""
        out = []
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._db["dl-lists"])
            if cur.set_range(self._ns):
                for k, v in cur:
                    if k[:4] != self._ns:
                        break
                    out.append(self._info(_BE32.unpack(k[4:8])[0], json.loads(v)))
        return out

    def counts(self) -> dict[int, int]:
        """Distinct digests per type (DIGLIM's digests_count), the lists' own digests
        as COMPACT_DIGEST_LIST."""
        out = {}
        meta = self._db["dl-meta"]
        with self._env.begin() as txn:
            for t in sorted(dl.TYPE_NAMES):
                raw = txn.get(self._ns + b"count" + bytes((t,)), db=meta)
                out[t] = _COUNT.unpack(raw)[0] if raw else 0
            nlists = 0
            cur = txn.cursor(db=self._db["dl-lists"])
            if cur.set_range(self._ns):
                for k in cur.iternext(values=False):
                    if k[:4] != self._ns:
                        break
                    nlists += 1
        out[dl.COMPACT_DIGEST_LIST] = nlists
        return out

    def state(self) -> bytes:
        """What the loaded lists are, as content (empty when none is loaded): a
        digest of each list's own digest and actions, in load order -- the same lists
        give the same bytes at the next mount."""
        return self._derive()[1]

    def algos(self, type: int = dl.COMPACT_FILE) -> frozenset[str]:
        """The algorithms of the ``type`` digests the loaded lists hold (what a file
        must be hashed with to be looked up)."""
        return self._derive()[2].get(type, frozenset())

    def algos_sorted(self, type: int = dl.COMPACT_FILE) -> tuple[str, ...]:
        """:meth:`algos`, sorted (the order lookups try them in)."""
        return self._derive()[3].get(type, ())

    def _derive(self) -> tuple:
        d = self._derived
        if d is not None and d[0] == self.epoch:
            return d
        epoch = self.epoch
        h, algos = hashlib.sha256(), {}
        lists = self.lists()
        for info in lists:
            h.update(f"{info.algo}:{info.digest.hex()}:{info.actions};".encode())
            for typ, _mods, algo, _count in info.blocks:
                algos.setdefault(typ, set()).add(algo)
        d = (epoch, h.digest()[:16] if lists else b"",
             {t: frozenset(a) for t, a in algos.items()},
             {t: tuple(sorted(a)) for t, a in algos.items()})
        self._derived = d
        return d

    def count(self) -> int:
        """Distinct digests of every type (a digest in two lists counts once)."""
        c = self.counts()
        return sum(v for t, v in c.items() if t != dl.COMPACT_DIGEST_LIST)

    def describe(self, hit: Hit) -> str:
        """``debian.list (from bash 5.2.15-2+b7)`` for a lookup's first list."""
        info = self.info(hit.list_id)
        if info is None:
            return f"list {hit.list_id} (removed)"
        return Ref(info, dl.COMPACT_FILE, hit.block).describe()

    # ------------------------------------------------------------------ records
    def _record(self, txn, list_id: int) -> dict:
        raw = txn.get(self._ns + _BE32.pack(list_id), db=self._db["dl-lists"])
        if raw is None:
            raise KeyError(list_id)
        return json.loads(raw)

    def _load_info(self, txn, list_id: int) -> ListInfo:
        info = self._info_cache.get(list_id)
        if info is None:
            info = self._info(list_id, self._record(txn, list_id))
        return info

    def _info(self, list_id: int, rec: dict) -> ListInfo:
        info = self._info_cache.get(list_id)
        if info is not None and info.label == rec["label"]:
            return info
        prov = None
        if rec.get("provenance") is not None:
            raw = json.dumps(rec["provenance"]).encode()
            prov = dl.Provenance.from_bytes(raw, 0, len(rec["blocks"]))
        info = ListInfo(list_id, rec["label"], rec["algo"], bytes.fromhex(rec["digest"]),
                        rec["actions"], rec["size"], rec["count"],
                        tuple(tuple(b) for b in rec["blocks"]), prov, rec.get("origin"))
        if len(self._info_cache) > 1024:
            self._info_cache.clear()
        self._info_cache[list_id] = info
        return info


@contextlib.contextmanager
def scratch_index() -> Iterator[DigestListIndex]:
    """A :class:`DigestListIndex` of its own, in a private temporary LMDB store that is
    deleted on exit -- for lists loaded without a mount (``imafs verify
    --digest-list``): the same parser, checks and lookups as a mount's index."""
    from imafs.store import Store
    with tempfile.TemporaryDirectory(prefix="imafs-dl-") as d:
        store = Store(d, sync=False)
        try:
            yield DigestListIndex(store, 0)
        finally:
            store.close()


def _block_of_entries(lst: dl.DigestList) -> list[int]:
    out = []
    for i, b in enumerate(lst.blocks):
        out.extend([i] * b.count)
    return out


def _check_label(label: str) -> None:
    raw = label.encode("utf-8", "surrogateescape")
    if not raw or len(raw) > MAX_LABEL or "/" in label or "\0" in label \
            or label in (".", "..") or any(c < 0x20 or c == 0x7F for c in raw):
        raise IndexError_(f"{label!r} is not a digest list name (a file name of 1 to "
                          f"{MAX_LABEL} bytes, no control characters)", 22)
