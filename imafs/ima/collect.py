"""ima_collect_measurement: the digests of one file version, and its verity tree when
reads are verified -- from the IInt (memory), from the LMDB caches, or from one
hashing pass over the file that computes every algorithm needed at once.

Also the engine's counters (:class:`Stats`), which this module updates the most.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading

from imafs.ima import hashing
from imafs.ima.verity import VeritySpec
from imafs.ima.appraise import get_hash_algo, needed_algo
from imafs.ima.cache import DigestCache, TreeCache
from imafs.ima.iint import AccessDenied, FileRef, IInt, stat_version
from imafs.ima.treemem import TreeMemory

log = logging.getLogger("imafs.engine")

VERITY_TREE_DIGEST = "verity-sha256"   # the fs-verity digest of ii.tree, in ii.digests
FILL_MAX = 1 << 30     # files up to this size go into the page cache as they are hashed
WATCH_AFTER = 4 << 20  # a pass watches its opener from here on (a smaller one just ends)


class Stats:
    """The engine's counters (the ``stats`` control file). Hashing runs in many
    worker threads: changes go through ``add`` (locked); ``snapshot()`` is a copy."""
    NAMES = ("hashed_files", "hashed_bytes", "cache_hits", "tree_loads", "read_failures",
             "reads_verified", "done_records", "hashing_abandoned")

    def __init__(self):
        self.counts = dict.fromkeys(self.NAMES, 0)
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                self.counts[k] += v

    def bump(self, name: str) -> None:
        """One more, without the lock: for a statistic on the hot path of reads,
        where a lost increment under contention does not matter."""
        self.counts[name] += 1

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def __getitem__(self, name: str) -> int:
        return self.counts[name]


def needed(decided, f: FileRef) -> tuple[dict, set]:
    """What the actions of one open read and need: the ``security.ima`` each deciding
    namespace appraises with (``Namespace.ima_xattr``; ns id -> value or None) and the set of digest algorithms the
    measurements, audits, hash rules and appraisals will ask for (computed in one
    pass)."""
    algos = set()
    xattrs: dict[int, bytes | None] = {}
    for n, _ev, d in decided:
        if n.id not in xattrs:
            xattrs[n.id] = n.ima_xattr(f.getxattr)
        if d.measure or d.audit:
            algos.add(get_hash_algo(xattrs[n.id], n.hash_algo))
        if d.hash:
            algos.add(n.hash_algo)
        if d.appraise:
            algos.add(needed_algo(xattrs[n.id]) or n.hash_algo)
    return xattrs, algos


class Collector:
    """Digests and verity trees of file versions (one per mount)."""

    def __init__(self, digests: DigestCache, trees: TreeCache, stats: Stats, *,
                 verify_reads: bool = False, memory: TreeMemory | None = None):
        self.digests = digests
        self.trees = trees
        self.stats = stats
        # the byte budget of the trees in memory (treemem.py)
        self.memory = memory if memory is not None else TreeMemory(trees)
        # read-time verification: every digest pass also builds the verity tree
        self.verify_reads = verify_reads

    def warm(self, ii: IInt, f: FileRef) -> bool:
        """Are this version's digests (and tree, when reads are verified) at hand
        without hashing -- in memory, or in the LMDB cache (loaded here, a few reads)?
        Called with ii.lock held."""
        if ii.version != f.version:
            ii.reset(f.version)
        need_tree = self.verify_reads
        if ii.digests:
            return ii.tree is not None or not need_tree
        cached = self.digests.get(ii.key, ii.version)
        if not cached:
            return False
        t = self.trees.get(ii.key, ii.version) if need_tree else None
        if need_tree and t is None:
            return False
        ii.digests.update(cached)
        ii.tree = t
        self.memory.hold(ii, t, stored=True)
        self.stats.add(cache_hits=1, tree_loads=t is not None)
        return True

    def digest(self, ii: IInt, f: FileRef, algo: str, algos, *, tree: bool = False) -> bytes:
        """The file's digest in ``algo``; computes every algorithm in ``algos`` that is
        missing in one pass (or takes them from the LMDB cache). Called with ii.lock
        held.

        ``algo`` may also be ``"verity-<alg>"``: the fs-verity file digest. With
        ``tree`` -- always when reads are verified -- the same pass also builds the
        verity tree (``ii.tree``, sha256, 4096-byte blocks, no salt), so the tree
        describes exactly the bytes the digests were computed from; a cached tree is
        only used together with the digests cached with it."""
        tree = tree or self.verify_reads
        d = ii.digests.get(algo)
        if d is not None and (ii.tree is not None or not tree):
            return d
        if not ii.digests and ii.tree is None:
            cached = self.digests.get(ii.key, ii.version)
            t = self.trees.get(ii.key, ii.version) if cached and tree else None
            if cached and (t is not None or not tree):
                ii.digests.update(cached)
                ii.tree = t
                self.memory.hold(ii, t, stored=True)
                self.stats.add(cache_hits=1, tree_loads=t is not None)
                d = ii.digests.get(algo)
                if d is not None:
                    return d
            # else: digests cached without their tree -- hash again, both in one pass
        need_tree = (tree and ii.tree is None) or (algo == VERITY_TREE_DIGEST
                                                   and algo not in ii.digests)
        want = sorted(a for a in set(algos) | {algo}
                      if a not in ii.digests and not a.startswith("verity-"))
        other_verity = (algo.startswith("verity-") and algo != VERITY_TREE_DIGEST
                        and algo not in ii.digests)
        # the bytes of this pass -- the bytes measured, and the ones the tree describes
        # -- go straight into the kernel's page cache of the file (FileRef.fill_cache):
        # reads of them are then served from there, never read or hashed a second
        # time (a first read of a measured file costs one pass); only while no other
        # handle verifies the file (its pages must match that handle's tree) and
        # nobody writes it
        sink = None
        if (f.fill_cache is not None and ii.writers == 0
                and 0 < f.st.st_size <= FILL_MAX and not ii.live_trees()):
            sink = f.fill_cache()
        fd = f.fd if f.readable else f.reopen()
        try:
            with self._watch(f) as progress:
                res = hashing.hash_fd(fd, want, sink=sink, progress=progress,
                                      verity=VeritySpec() if need_tree else None)
                if other_verity:   # fs-verity digest with another hash (sha512): own pass
                    vt = hashing.hash_fd(fd, [], verity=VeritySpec(algo[7:]),
                                         progress=progress).tree
                    ii.digests[algo] = vt.verity_digest
            st = os.fstat(fd)
        finally:
            if fd != f.fd:
                os.close(fd)
        self.stats.add(hashed_files=1)
        ii.digests.update(res.digests)
        if res.tree is not None:
            ii.tree = res.tree
            ii.digests[VERITY_TREE_DIGEST] = res.tree.verity_digest
        # a file that changed while it was hashed: keep the result for this open (the
        # bytes served are checked against this very tree), but never cache it under
        # an identity it may not belong to
        stored = False
        if ii.version is not None and ii.version[:3] == stat_version(st) \
                and res.size == st.st_size:
            self.digests.put(ii.key, ii.version, ii.digests)
            if res.tree is not None:
                stored = self.trees.put(ii.key, ii.version, res.tree)
        self.memory.hold(ii, res.tree, stored=stored)
        return ii.digests[algo]

    @contextlib.contextmanager
    def _watch(self, f: FileRef):
        """A hashing pass's ``progress``: counts the bytes hashed (``hashed_bytes``
        grows while a pass runs) and, past the first WATCH_AFTER bytes, abandons the
        pass once the process that asked for the open is gone (``FileRef.opener``):
        nobody waits for its answer, and pyfuse3 delivers no FUSE interrupts. The
        open then fails (EINTR, for nobody); the next open of the file starts a pass
        of its own."""
        done = [0]
        gone = [None]
        with contextlib.ExitStack() as stack:
            def progress(n: int) -> bool:
                done[0] += n
                self.stats.add(hashed_bytes=n)
                if done[0] < WATCH_AFTER or f.opener is None:
                    return False
                if gone[0] is None:
                    gone[0] = stack.enter_context(f.opener()) or (lambda: False)
                return gone[0]()
            try:
                yield progress
            except hashing.HashAbandoned:
                self.stats.add(hashing_abandoned=1)
                reason = (f"{os.fsdecode(f.path)}: hashing abandoned after {done[0]} bytes: "
                          f"the process that opened it is gone")
                log.info("%s", reason)
                raise AccessDenied(errno.EINTR, reason) from None

    def verity_digest(self, ii: IInt, f: FileRef, algo: str, algos) -> bytes | None:
        """The fs-verity file digest in ``algo`` (what ``fsverity digest`` prints),
        computed here whether or not the backing file has fs-verity enabled; None for
        an algorithm fs-verity does not have."""
        try:
            algo = hashing.hash_algo(algo).name
        except hashing.HashAlgoError:
            return None
        if algo not in hashing.VERITY_ALGOS:
            return None
        return self.digest(ii, f, "verity-" + algo, algos)
