"""Verity trees in memory, bounded by bytes.

A verity tree is 1/128 of its file (sha256, 4 KiB blocks): a user who can open big
(sparse) files could make the daemon hold gigabytes of them (issue 14: ten 3 GiB
files took RSS from 40 to 465 MiB). The trees IInts hold -- the current version's
(``IInt.tree``) and those open handles verify against (``IInt.live``) -- are counted
here, and past ``budget`` bytes the least recently held are **spilled**: their leaf
level leaves memory, and reads read back the leaf blocks they need from the tree
cache (LMDB ``trees``, which has every tree a pass stored), each checked against
the level above it, which stays in memory (1/128 of the leaves: a spilled tree of a
3 GiB file keeps 190 KiB). A tree the cache does not hold (its file changed while
it was hashed, or the cache could not store it) is let go from an idle IInt instead
(the next open hashes again); one that open handles verify against stays, over the
budget, and the log says so once.

A stored leaf block that is gone (the file was measured again under a new version
and the cache entry replaced) or does not match the level above fails the read
closed: EIO (``AccessDenied``), as a read that does not verify.
"""
from __future__ import annotations

import errno
import logging
import threading
from collections import OrderedDict

from imafs.ima.iint import COUNTS, AccessDenied, IInt

log = logging.getLogger("imafs.engine")

DEFAULT_BUDGET = 64 << 20       # bytes of leaf levels kept in memory
MIN_SPILL = 64 << 10            # trees smaller than this are never spilled


class StoredLeaves:
    """A spilled tree's leaf level: slices are read back from the tree cache, one
    leaf block (``block_size`` bytes of hashes) at a time, and checked against the
    level above (``above``: that level's hashes, or the root for a one-block level)."""
    __slots__ = ("_len", "_above", "_hash_blocks", "_bs", "_ds", "_read", "_what")

    def __init__(self, tree, read, what: str):
        levels = tree.levels
        self._len = len(tree.leaves)
        self._above = levels[-2] if len(levels) >= 2 else tree.root_hash
        self._hash_blocks = tree.spec.block_hasher()
        self._bs, self._ds = tree.block_size, tree.digest_size
        self._read = read               # (offset, size) -> bytes | None
        self._what = what

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, sl):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("stored leaves are read by contiguous slices")
        start, stop, _ = sl.indices(self._len)
        if stop <= start:
            return b""
        bs, ds = self._bs, self._ds
        first, last = start // bs, (stop - 1) // bs
        off = first * bs
        end = min((last + 1) * bs, self._len)
        raw = self._read(off, end - off)
        if raw is None or len(raw) != end - off or \
                self._hash_blocks(memoryview(raw)) != self._above[first * ds:(last + 1) * ds]:
            log.warning("%s: its stored verity tree is gone or does not match: read refused",
                        self._what)
            raise AccessDenied(errno.EIO, f"{self._what}: verity tree no longer available")
        return raw[start - off:stop - off]


class TreeMemory:
    """The trees of one engine, at most ``budget`` bytes of leaf levels in memory."""

    def __init__(self, trees, budget: int = DEFAULT_BUDGET):
        self.trees = trees              # cache.TreeCache
        self.budget = budget
        self._lock = threading.Lock()
        self._held: OrderedDict = OrderedDict()   # id(tree) -> [tree, ii, version, stored, n]
        self.resident = 0
        self.spilled = 0
        self._warned = False

    def hold(self, ii: IInt, tree, *, stored: bool) -> None:
        """``ii`` now holds ``tree`` (a new pass, or a load from the cache); ``stored``:
        the tree cache has it under ``ii.version``."""
        if tree is None:
            return
        with self._lock:
            rec = self._held.get(id(tree))
            if rec is not None:
                self._held.move_to_end(id(tree))
                rec[3] = rec[3] or stored
                return
            n = len(tree.leaves) if isinstance(tree.leaves, (bytes, bytearray)) else 0
            self._held[id(tree)] = [tree, ii, ii.version, stored, n]
            self.resident += n
            if self.resident > self.budget:
                self._trim()

    def _trim(self) -> None:
        """Spill or let go, least recently held first, until under the budget
        (lock held)."""
        over = False
        for tid in list(self._held):
            if self.resident <= self.budget:
                return
            tree, ii, version, stored, n = self._held[tid]
            with COUNTS:
                live = tid in ii.live
            current = ii.tree is tree
            if not live and not current:            # nobody holds it any more
                del self._held[tid]
                self.resident -= n
                continue
            if n < MIN_SPILL:
                continue
            if stored:
                what = f"file {ii.key[0]}:{ii.key[1]}"
                tree.spill(StoredLeaves(
                    tree, lambda off, size, k=ii.key, v=version, t=tree:
                    self.trees.read_leaves(k, v, t, off, size), what))
                del self._held[tid]
                self.resident -= n
                self.spilled += 1
            elif not live and ii.lock.acquire(blocking=False):
                try:                                # an open may be using it: its lock
                    if ii.tree is tree:
                        ii.tree = None              # hashed again when needed
                finally:
                    ii.lock.release()
                del self._held[tid]
                self.resident -= n
            else:
                over = True
        if over and not self._warned:
            self._warned = True
            log.warning("verity trees in memory: %d bytes, over the budget of %d: trees "
                        "of open files that the tree cache could not store stay",
                        self.resident, self.budget)

    def stats(self) -> dict:
        with self._lock:
            return {"tree_bytes": self.resident, "trees_spilled": self.spilled}
