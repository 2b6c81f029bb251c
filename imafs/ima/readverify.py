"""Read-time verification (beyond the kernel): every read of a file that handles
verify is checked, block by block, against the verity trees those handles were
measured with; a block that does not match is EIO and a violation.

The kernel's page cache of an inode is shared by every handle of it, and a handle
whose pages are cached reads them without asking the daemon. So a page must not
enter the cache unless it matches every tree a handle open now verifies against:
while any verified handle of the file is open, every read of it -- through any
handle, verified or not -- is checked against all those trees (normally one; two
after the file changed behind the mount and was measured again while a handle of
the old version is still open: then only unchanged blocks are served).

The trees live on the IInt (``IInt.live``); this module registers and drops them,
answers reads, and records failures.
"""
from __future__ import annotations

import errno
import logging
import os

from imafs.ima.verity import VerifyResult
from imafs.ima.collect import Stats
from imafs.ima.iint import COUNTS, AccessDenied, IInt, OpenState, Pending, Subject
from imafs.ima.record import Recorder

log = logging.getLogger("imafs.engine")


def verifiers_of(decided) -> tuple:
    """The namespaces whose policy measured or appraised an open, in chain order:
    the ones whose reads are verified, and that record a read-verify violation."""
    out = []
    for n, _ev, d in decided:
        if (d.measure or (d.appraise and n.appraise_mode != "off")) and n not in out:
            out.append(n)
    return tuple(out)


class ReadVerifyError(AccessDenied):
    """A read that does not match the tree the file was measured with (EIO)."""


class ReadVerifier:
    """The verified handles of a mount and the reads through them."""

    def __init__(self, recorder: Recorder, caches, stats: Stats):
        self.recorder = recorder
        self.caches = caches            # (digests, trees, verdicts): forgotten on a failure
        self.stats = stats
        self._live_keys: dict = {}      # file identity -> IInt, while a handle verifies reads

    # ------------------------------------------------------------------ handles
    def add(self, ii: IInt, state: OpenState) -> None:
        """Register a verifying handle (with ii.lock held)."""
        with COUNTS:
            if ii.live_wgen != ii.wgen:
                ii.live, ii.live_wgen = {}, ii.wgen
            rec = ii.live.get(id(state.tree))
            if rec is None:
                ii.live[id(state.tree)] = [state.tree, state.verifiers, 1]
                self._live_keys[ii.key] = ii
            else:
                rec[2] += 1

    def drop(self, state: OpenState) -> None:
        """A verifying handle was released (with COUNTS held)."""
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

    def measured_size(self, key) -> int | None:
        """The size the kernel must be shown for a file while handles verifying it are
        open (the size their trees were built over), or None: reads past a shorter
        backing file then reach the daemon and fail, instead of the kernel clipping them
        at the new end without asking."""
        ii = self._live_keys.get(key)
        if ii is None:
            return None
        sizes = {t.data_size for t, _v in ii.live_trees()}
        return sizes.pop() if len(sizes) == 1 else None

    # ------------------------------------------------------------------ reads
    def read(self, state: OpenState, fd: int, off: int, size: int):
        """The inline attempt (event loop, never blocks): ``size`` bytes at ``off``
        checked against every tree of the file's verifying handles -- when they are
        all in the backing page cache and match; else a Pending whose ``finish()``
        reads and checks in a worker thread (and records a failure: that takes the
        IInt lock). None when no handle of the file verifies reads (or this handle
        is writable)."""
        ii = state.iint
        if state.writable:
            return None
        trees = ii.live_trees()
        if not trees:
            return None
        self.stats.bump("reads_verified")
        pread = state.file.pread_nowait
        if pread is None:
            return Pending(self.read_blocking, state, fd, off, size)
        if len(trees) == 1:
            # the common case on the event loop: one tree, a read within the measured
            # size, all of it in the backing page cache and unchanged
            t = trees[0][0]
            bs, dsize = t.block_size, t.data_size
            if off % bs == 0 and off + size <= dsize:
                end = off + size
                end = min(end + (-end % bs), dsize)
                buf = pread(fd, end - off, off)
                if buf is not None and len(buf) == end - off and t.verify_range(off, buf).ok:
                    return buf if len(buf) == size else buf[:size]
                return Pending(self.read_blocking, state, fd, off, size)
        try:
            return self._read(state, trees, fd, off, size, pread)
        except BlockingIOError:
            return Pending(self.read_blocking, state, fd, off, size)

    def read_blocking(self, state: OpenState, fd: int, off: int, size: int):
        """The same read from a worker thread (``Pending.finish`` of :meth:`read`): the
        bytes, None when no handle verifies the file any more, or
        :class:`ReadVerifyError` (EIO; the failure recorded)."""
        trees = state.iint.live_trees() if not state.writable else []
        if not trees:
            return None
        return self._read(state, trees, fd, off, size, None)

    def _read(self, state: OpenState, trees, fd: int, off: int, size: int, pread):
        """Read ``size`` bytes at ``off`` from ``fd`` (the handle's backing descriptor)
        and check them against ``trees`` (this handle's first). A block that does not
        match a tree, a file shorter than a tree, or bytes past a tree's end raise
        :class:`ReadVerifyError` -- no byte of such a read is returned.

        ``pread`` (the inline attempt): read with it from the page cache only, and
        raise BlockingIOError when the data is not all there or does not verify (the
        worker thread then records the failure).

        Cost: one pread of the whole blocks covering the request (FUSE reads are
        page-aligned, so normally exactly the request) and one hash per 4 KiB block
        per tree (normally one); leaf lookups are O(1), nothing touches LMDB."""
        nowait = pread is not None
        ii = state.iint
        own = state.tree if state.wgen == ii.wgen else None
        if own is not None:
            trees.sort(key=lambda tv: tv[0] is not own)
        bs = trees[0][0].block_size
        start = off - off % bs
        spans = []          # per tree: (whole-block length to check, request past its end)
        for t, _v in trees:
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
                buf = pread(fd, want, start)
                if buf is None or len(buf) < longest:
                    raise BlockingIOError(errno.EAGAIN, "not all in the page cache")
            elif want > 0:
                buf = os.pread(fd, want, start)
            else:
                buf = b""
            # a request at or past a tree's end: is there a byte at that end?
            grown = [pr and ln == 0 and os.pread(fd, 1, t.data_size) != b""
                     for (t, _v), (ln, pr) in zip(trees, spans)]
        except OSError as e:
            if nowait:
                raise BlockingIOError(errno.EAGAIN, f"read error: {e}") from None
            raise ReadVerifyError(e.errno or errno.EIO, f"read error: {e}") from None
        served = longest
        for (t, verifiers), (length, probe), grew in zip(trees, spans, grown):
            part = buf[:length]
            res = t.verify_range(start, part) if part else VerifyResult(True)
            short = len(part) < length
            extra = grew or (probe and length > 0 and len(buf) > length)
            if nowait and (not res.ok or short or extra):
                raise BlockingIOError(errno.EAGAIN, "verification failed: retry in a thread")
            if not res.ok:
                self._failure(state, t, verifiers, off, res.first_bad_block,
                              res.expected, res.found, "content")
            if short:
                bad = (start + len(part)) // bs
                self._failure(state, t, verifiers, off, bad, t.block_hash(bad), b"", "short")
            if extra:
                self._failure(state, t, verifiers, off, t.data_size // bs, b"", b"",
                              "past-end")
            served = min(served, length)
        if len(buf) > served:
            buf = buf[:served]
        lo = off - start
        if lo == 0 and len(buf) <= size:
            return buf
        return buf[lo:lo + size]

    def _failure(self, state: OpenState, tree, verifiers, off: int, block: int,
                 expected: bytes, found: bytes, what: str) -> None:
        """A read through ``state`` does not match ``tree`` (this handle's, or another
        open handle's): the file changed behind the mount. Record a violation (list,
        PCRs, audit) in every namespace that measured or appraised the file against
        that tree -- once per reading handle and tree -- forget the file's verdicts and
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
                for cache in self.caches:
                    cache.delete(ii.key)
        detail = {"offset": off, "block": block, "what": what, "expected": expected.hex(),
                  "found": found.hex()}
        if first:
            self.stats.add(read_failures=1)
            subject = state.subject or Subject(0, 0, 0)
            for n in verifiers:
                self.recorder.violation(n, f, subject, "read-verify", state.ns.id, **detail)
        else:
            log.debug("read-verify: %s offset %d block %d (%s) again", os.fsdecode(f.path),
                      off, block, what)
        raise ReadVerifyError(errno.EIO, f"{os.fsdecode(f.path)}: block {block} at offset "
                                         f"{off} does not match the measured file ({what})")
