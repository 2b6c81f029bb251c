"""The LMDB environment of one mount (``--state DIR``).

One environment holds every piece of persistent state as named databases:

``digests``   file identity -> cached digests (and fs-verity tree), see ima/engine
``log``       (namespace id, sequence) -> measurement entry, see ima/measurelog
``logidx``    per-view byte-offset checkpoints of the lists, see ima/measurelog
``loghash``   (namespace id, pcr, sha1 template hash) -> sequence (duplicate check)
``logmeta``   namespace id -> list banks, entry/violation counts, view sizes
``pcr``       (namespace id, bank) -> PCR registers
``ns``        namespace metadata
``keys``      (namespace id, key id) -> certificate DER
``meta``      small global values (schema version, epochs)
``dl-*``      each namespace's loaded digest lists and their digests, see
              ima/digest_index (dl-lists, dl-names, dl-digests, dl-data, dl-meta)

Writes are LMDB transactions: a crash never leaves a list whose PCR values disagree
with its entries, because an entry and its PCR extension commit together.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading

import lmdb

SCHEMA_VERSION = b"1"
DEFAULT_MAP_SIZE = 64 << 30  # sparse; LMDB only uses what it writes


class StoreError(Exception):
    pass


class Store:
    def __init__(self, path: str, *, map_size: int = DEFAULT_MAP_SIZE, sync: bool = True,
                 readonly: bool = False):
        self.path = path
        if not readonly:
            os.makedirs(path, mode=0o700, exist_ok=True)
        try:
            self.env = lmdb.open(
                path, map_size=map_size, max_dbs=64, max_readers=512, subdir=True,
                sync=sync, metasync=sync, readonly=readonly, lock=True,
            )
        except lmdb.Error as e:
            raise StoreError(f"cannot open state directory {path}: {e}") from e
        self._dbs: dict[str, object] = {}
        self._lock = threading.Lock()
        self._map_ranges: list[tuple[int, int]] | None = None   # see trim()
        self.trim()                     # no huge-page mappings of the map, from the start
        if not readonly:
            with self.env.begin(write=True, db=self.db("meta")) as txn:
                old = txn.get(b"schema")
                if old is None:
                    txn.put(b"schema", SCHEMA_VERSION)
                elif old != SCHEMA_VERSION:
                    raise StoreError(f"state directory {path} has schema {old!r}, "
                                     f"this imafs writes {SCHEMA_VERSION!r}")

    def db(self, name: str, *, dupsort: bool = False):
        """A named database handle (created on first use)."""
        h = self._dbs.get(name)
        if h is None:
            with self._lock:
                h = self._dbs.get(name)
                if h is None:
                    h = self.env.open_db(name.encode(), dupsort=dupsort,
                                         create=not self.env.flags()["readonly"])
                    self._dbs[name] = h
        return h

    def begin(self, *, write: bool = False, db: str | None = None) -> lmdb.Transaction:
        return self.env.begin(write=write, db=self.db(db) if db else None)

    @contextlib.contextmanager
    def write(self):
        """A write transaction, committed on success, aborted on exception."""
        with self.env.begin(write=True) as txn:
            yield txn

    def get_meta(self, key: bytes) -> bytes | None:
        with self.env.begin(db=self.db("meta")) as txn:
            return txn.get(key)

    def put_meta(self, key: bytes, value: bytes) -> None:
        with self.env.begin(write=True, db=self.db("meta")) as txn:
            txn.put(key, value)

    def trim(self) -> int:
        """Drop this process's mapping of the pages of the store it has read, and
        return how many bytes of mapping were advised.  LMDB reads through a
        read-only shared memory map, and every page a scan touches stays in the
        resident set until the map goes -- with the kernel's fault-around (16 pages
        a fault) and LMDB's copy-on-write layout (a list's pages lie between other
        databases' pages), reading a 128 KiB piece of a long list maps 3-25 MiB.
        ``madvise(MADV_DONTNEED)`` on a shared read-only file mapping only unmaps:
        the data stays in the page cache and the next access maps it again
        (committed pages never change under a reader), so this is safe at any time,
        from any thread.  The first call also asks for no huge-page mappings of the
        map (MADV_NOHUGEPAGE: a 2 MiB folio would be mapped whole)."""
        ranges = self._map_ranges
        if ranges is None:
            ranges = self._map_ranges = self._find_map()
            for lo, hi in ranges:
                _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_NOHUGEPAGE)
        done = 0
        for lo, hi in ranges:
            if _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
                done += hi - lo
            else:
                self._map_ranges = None     # remapped (never, unless the map size changes)
        return done

    def _find_map(self) -> list[tuple[int, int]]:
        data = os.path.realpath(os.path.join(self.path, "data.mdb"))
        try:
            with open("/proc/self/maps") as f:
                spans = [line.split(None, 1)[0] for line in f
                         if line.rstrip("\n").endswith(" " + data)]
        except OSError:
            return []
        return [tuple(int(x, 16) for x in r.split("-")) for r in spans]

    def close(self) -> None:
        self.env.close()


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_MADV_DONTNEED = 4
_MADV_NOHUGEPAGE = 15
