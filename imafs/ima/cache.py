"""The LMDB-backed caches of the engine, kept in the cache environment of a mount's
state (``STATE/cache``: committed without waiting for the disk; a lost entry costs
a rehash or a decision, never a wrong answer):

===============  ==========  ====================================================
class            LMDB db     key -> value
===============  ==========  ====================================================
DigestCache      digests     file identity -> version + digests of that version
TreeCache        trees       file identity -> version + verity tree (leaf level)
VerdictCache     done        file identity + hash(version, verdict key, the
                             chain's fingerprints) -> namespaces that measured,
                             namespaces that verify reads
WriteMarks       writing     file identity -> b"" while a writer opened through
                             the mount has not been seen closing
===============  ==========  ====================================================

File identity: ``(st_dev, st_ino)`` as two big-endian u64; version: ``(mtime_ns,
ctime_ns, size, generation)`` as four big-endian u64. An entry of another version is
ignored. The verdict cache keeps the database name ``done`` of the layout before the
engine split, so a state directory written by it keeps its verdicts.

A version is what stat shows; a write within one timestamp tick that keeps the size
would not change it. Through the mount the engine sees every write itself, except
after a crash: a file marked in ``writing`` when a mount starts (a writer was open
when the daemon died) loses its entries in all three caches (:func:`purge_unfinished`),
so its next open is measured and appraised again.
"""
from __future__ import annotations

import hashlib
import logging
import struct

from imafs.ima.verity import MerkleTree, TreeFormatError

log = logging.getLogger("imafs.engine")

_IDENTITY = struct.Struct(">QQ")
_VERSION = struct.Struct(">QQQQ")   # mtime_ns, ctime_ns, size, generation


class _Cache:
    """One LMDB database keyed by file identity; a cache: failures only log."""
    DB = ""
    what = ""

    def __init__(self, store):
        self.store = store
        self.db = store.db(self.DB) if store is not None else None

    def delete(self, key) -> None:
        """The entry of a file (every version)."""
        if self.db is None:
            return
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.delete(_IDENTITY.pack(*key))
        except Exception as e:  # noqa: BLE001 - entries are checked against the version
            log.warning("%s cache: cannot delete an entry: %s", self.what, e)

    def _get(self, key, version) -> bytes | None:
        """The value stored for this version of the file, after the version."""
        with self.store.env.begin(db=self.db) as txn:
            raw = txn.get(_IDENTITY.pack(*key))
        if raw is None:
            return None
        raw = bytes(raw)
        if _VERSION.unpack_from(raw, 0) != tuple(version):
            return None
        return raw[_VERSION.size:]

    def _put(self, key, version, value: bytes) -> bool:
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.put(_IDENTITY.pack(*key), _VERSION.pack(*version) + value)
            return True
        except Exception as e:  # noqa: BLE001 - a cache: a full disk only costs a rehash
            log.warning("%s cache: cannot store an entry: %s", self.what, e)
            return False


class DigestCache(_Cache):
    """file identity -> digests of one version (db ``digests``): after the version,
    per algorithm u8 name length, name, u8 digest length, digest."""
    DB, what = "digests", "digest"

    def get(self, key, version) -> dict[str, bytes] | None:
        if self.db is None:
            return None
        raw = self._get(key, version)
        if raw is None:
            return None
        out, off = {}, 0
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
        blob = bytearray()
        for name, d in sorted(digests.items()):
            nb = name.encode()
            blob += bytes([len(nb)]) + nb + bytes([len(d)]) + d
        self._put(key, version, bytes(blob))


class TreeCache(_Cache):
    """file identity -> verity (Merkle) tree of one version (db ``trees``): after
    the version, ``MerkleTree.to_bytes()`` (leaf level only; the upper levels are
    rebuilt on load and must reproduce the stored fs-verity digest)."""
    DB, what = "trees", "tree"

    def get(self, key, version):
        if self.db is None or version is None:
            return None
        raw = self._get(key, version)
        if raw is None:
            return None
        try:
            return MerkleTree.from_bytes(raw)
        except TreeFormatError as e:
            log.warning("tree cache: dropping a bad entry: %s", e)
            return None

    def put(self, key, version, tree) -> bool:
        """Store the tree of this version; whether it is stored."""
        if self.db is None or version is None:
            return False
        return self._put(key, version, tree.to_bytes())

    def read_leaves(self, key, version, tree, off: int, size: int) -> bytes | None:
        """``size`` bytes of the stored leaf level of ``tree`` (this version of the
        file) from byte ``off``, read from the map without loading the rest; None
        when the entry is gone or is of another version."""
        if self.db is None:
            return None
        start = _VERSION.size + tree.blob_leaves_offset() + off
        try:
            with self.store.env.begin(db=self.db, buffers=True) as txn:
                raw = txn.get(_IDENTITY.pack(*key))
                if raw is None or len(raw) < start + size \
                        or _VERSION.unpack_from(raw, 0) != tuple(version):
                    return None
                return bytes(raw[start:start + size])
        except Exception as e:  # noqa: BLE001 - the caller fails closed
            log.warning("tree cache: cannot read leaves: %s", e)
            return None


class VerdictCache:
    """Verdicts across remounts (db ``done``): that a read-only open of one file
    version, by one kind of caller (the verdict key: namespace, ids the rules look
    at, mask, hook), under the policies, keyrings and options of its namespace
    chain as they are now (their fingerprints), was measured, appraised with a pass
    and audited -- so a remount decides such an open without matching or appraising
    again. Key: the file identity (16 bytes, so that all of a file's records go
    together) + 16 bytes of sha256 over version, verdict key and fingerprints;
    value: the ids of the namespaces that measured (their readers count for ToMToU)
    and of those whose reads are verified (u32 count + ids, twice)."""
    DB = "done"     # the name of the layout before the engine split: states keep working

    def __init__(self, store):
        self.store = store
        self.db = store.db(self.DB) if store is not None else None

    @staticmethod
    def record_key(key, version, verdict_key, fingerprints) -> bytes:
        h = hashlib.sha256(repr((tuple(version), verdict_key, fingerprints)).encode())
        return _IDENTITY.pack(*key) + h.digest()[:16]

    def get(self, rk: bytes):
        """(measuring ns ids, verifier ns ids), or None."""
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
            verifiers = struct.unpack_from(f"<{m}I", raw, 8 + 4 * n)
        except struct.error:
            return None
        return measuring, verifiers

    def put(self, rk: bytes, measuring, verifiers) -> None:
        if self.db is None:
            return
        blob = struct.pack(f"<I{len(measuring)}I", len(measuring), *measuring) + \
            struct.pack(f"<I{len(verifiers)}I", len(verifiers), *verifiers)
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                txn.put(rk, blob)
        except Exception as e:  # noqa: BLE001 - a cache: a full disk only costs a decision
            log.warning("verdict cache: cannot store an entry: %s", e)

    def delete(self, key) -> None:
        """Every verdict of a file (a read of it failed verification)."""
        if self.db is None:
            return
        prefix = _IDENTITY.pack(*key)
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                cur = txn.cursor()
                if cur.set_range(prefix):
                    while cur.key()[:len(prefix)] == prefix:
                        if not cur.delete():
                            break
        except Exception as e:  # noqa: BLE001
            log.warning("verdict cache: cannot delete entries: %s", e)


class WriteMarks:
    """Files a writer has open through the mount (db ``writing``): marked when a
    writable open is decided, unmarked when the last writer's close was processed.
    A mark found when a mount starts means the daemon died in between: what the
    caches hold about that file may describe a version the writer changed."""
    DB = "writing"

    def __init__(self, store):
        self.store = store
        self.db = store.db(self.DB) if store is not None else None

    def add(self, key) -> None:
        self._write(lambda txn: txn.put(_IDENTITY.pack(*key), b""), "mark")

    def discard(self, key) -> None:
        self._write(lambda txn: txn.delete(_IDENTITY.pack(*key)), "unmark")

    def _write(self, op, what: str) -> None:
        if self.db is None:
            return
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                op(txn)
        except Exception as e:  # noqa: BLE001 - logged; the caches check versions
            log.warning("write marks: cannot %s a file: %s", what, e)

    def take_all(self) -> list[tuple[int, int]]:
        """Every marked identity, the marks removed."""
        if self.db is None:
            return []
        out = []
        try:
            with self.store.env.begin(write=True, db=self.db) as txn:
                for k, _v in txn.cursor():
                    if len(k) == _IDENTITY.size:
                        out.append(_IDENTITY.unpack(bytes(k)))
                txn.drop(self.db, delete=False)
        except Exception as e:  # noqa: BLE001
            log.warning("write marks: cannot read them: %s", e)
        return out


def purge_unfinished(marks: WriteMarks, *caches) -> int:
    """At mount: forget what ``caches`` (DigestCache, TreeCache, VerdictCache) hold
    about the files a writer had open when the daemon last stopped without seeing it
    close. Returns how many files."""
    keys = marks.take_all()
    for key in keys:
        for c in caches:
            c.delete(key)
    if keys:
        log.info("%d file(s) were open for write when imafs stopped: their cached "
                 "digests and verdicts are dropped", len(keys))
    return len(keys)
