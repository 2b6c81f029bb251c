"""The last writer's close (the kernel's ``ima_check_last_writer``, ima_main.c, and
``ima_update_xattr``, ima_appraise.c): when the last handle open for write through
the mount is released, a file that changed -- or a new file -- is measured again at
its next open, its new-file allowance ends, and its ``security.ima`` hash is
rewritten in every namespace that asked for it (IMA_UPDATE_XATTR: an appraised
writable open that passed or was fixed, a ``hash`` rule; the closing handle's
fix-mode and ``hash`` decisions), never over a signature. What the caches hold about
the file is dropped, and so is its write mark (cache.WriteMarks: a crash before this
point leaves the mark, and the next mount drops the caches' entries then)."""
from __future__ import annotations

import logging
import os
from dataclasses import replace

from imafs.ima import appraise as ap
from imafs.ima import hashing
from imafs.ima.iint import COUNTS, OpenState, stat_version

log = logging.getLogger("imafs.engine")


class LastWriter:
    """``close(state, changed)``: the slow part of releasing the last writable handle
    (a worker thread; Engine.file_release returns it as a Pending)."""

    def __init__(self, tree, caches, marks, evm):
        self.tree = tree            # NamespaceTree: the namespaces by id
        self.caches = caches        # DigestCache, TreeCache, VerdictCache
        self.marks = marks          # WriteMarks
        self.evm = evm              # EvmHooks: HMACs follow a rewritten hash

    def close(self, state: OpenState, changed: bool = True, done=None) -> None:
        """``changed``: the file was written or truncated through the mount; ``done``:
        the IInt's ``settling`` event, set (and cleared from it) once finished."""
        ii, f = state.iint, state.file
        try:
            with ii.lock:
                try:
                    if changed or ii.new_file:
                        self._relabel(state)
                    else:       # test_and_clear_bit(IMA_UPDATE_XATTR) all the same
                        ii.update_xattr = set()
                finally:
                    if ii.writers == 0 and ii.write_mark:
                        self.marks.discard(f.key)
                        ii.write_mark = False
        finally:
            if done is not None:
                with COUNTS:
                    if ii.settling is done:
                        ii.settling = None
                done.set()

    def _relabel(self, state: OpenState) -> None:
        """ii.lock held."""
        ii, f = state.iint, state.file
        update, ii.update_xattr = ii.update_xattr, set()
        ii.new_file = False
        # what the caches hold describes the content before the writer: a file system
        # whose timestamps are coarser than the writes may show the same version
        for cache in self.caches:
            cache.delete(f.key)
        for n, _ev, d in state.decisions:
            if d.hash or (d.appraise and n.appraise_mode == "fix"):
                update.add(n.id)
        try:
            fd = f.reopen()
        except OSError:
            ii.reset(None)
            return
        try:
            st = os.fstat(fd)
            ii.reset(stat_version(st) + (f.generation,))
            for nid in sorted(update):
                n = self.tree.by_id.get(nid)
                if n is None:
                    continue
                # the value this namespace appraises with (f.getxattr's fd is
                # closed): a child without its own has the file's (the image's)
                cur = n.ima_xattr(lambda name: _fgetxattr(fd, name))
                if cur and cur[0] in (ap.EVM_IMA_XATTR_DIGSIG, ap.IMA_VERITY_DIGSIG):
                    continue    # ima_update_xattr(): never over a signature (IMA_DIGSIG)
                digest = hashing.hash_fd(fd, [n.hash_algo]).digests[n.hash_algo]
                try:
                    f.setxattr(n.xattr_name, ap.hash_xattr(n.hash_algo, digest))
                    self.evm.ima_written(n, replace(
                        f, fd=fd, st=st, getxattr=lambda name: _fgetxattr(fd, name)))
                except OSError as e:
                    log.warning("cannot update %s of %s: %s", n.xattr_name,
                                os.fsdecode(f.path), e)
        finally:
            os.close(fd)


def _fgetxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None
