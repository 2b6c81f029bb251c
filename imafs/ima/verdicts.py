"""Steps 1 and 8 of process_measurement (engine.py): the verdict of a read-only open,
kept and taken again.

The kernel's ima_main.c clears from an open's actions those already done for the
inode (``action &= ~(iint->flags & IMA_DONE_MASK)``) and returns early when nothing
is left; a change of the file, its xattrs, the policy or the keys clears the flags.
imafs keeps the same fact per verdict key (hooks.verdict_key: namespace, the ids the
chain's rules look at, mask, exec and exec role), twice:

* in the file's IInt (``IInt.verdicts``: epochs, decisions, verifiers), for the
  life of this file version in this mount -- :meth:`KeptVerdicts.known`;
* in the verdict cache (cache.VerdictCache, LMDB), keyed by the chain's
  fingerprints, so a remount takes it without matching or appraising again --
  :meth:`KeptVerdicts.recorded`.

:meth:`KeptVerdicts.keep` writes both once an open's actions all ran (step 8).
The OpenState of a kept verdict is the engine's (``reopen``: the behaviour models
still decide, the handle is counted).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from imafs.ima.cache import VerdictCache
from imafs.ima.namespaces import chain_epochs, chain_fingerprints
from imafs.ima.readverify import verifiers_of

if TYPE_CHECKING:
    from imafs.ima.collect import Collector, Stats
    from imafs.ima.engine import OpenRequest
    from imafs.ima.iint import OpenState
    from imafs.ima.namespaces import NamespaceTree


class KeptVerdicts:
    """The verdicts of the opens of one mount: ``tree`` its namespaces, ``cache`` the
    verdict cache, ``collector`` (digests and verity trees at hand), ``stats`` (its
    ``done_records``), ``verify_reads`` (the mount's option), ``reopen(req,
    decided, verifiers) -> OpenState`` (with ``req.ii.lock`` held)."""

    def __init__(self, tree: NamespaceTree, cache: VerdictCache, collector: Collector,
                 stats: Stats, *, verify_reads: bool,
                 reopen: Callable[[OpenRequest, list, tuple], OpenState]):
        self.tree = tree
        self.cache = cache
        self.collector = collector
        self.stats = stats
        self.verify_reads = verify_reads
        self.reopen = reopen

    def known(self, req: OpenRequest, *, locked: bool = False):
        """A read-only open like one already decided for this file version: measured,
        appraised (passed) and audited as it needs, nothing writing the file -- as the
        kernel's process_measurement() returns when no action is left out of
        iint->flags. Its OpenState, or None to decide. ``locked``: ii.lock is held
        (else it is taken without waiting, and None when busy)."""
        ii, f = req.ii, req.f
        hit = ii.verdicts.get(req.verdict_key)
        if hit is None or ii.version != f.version or ii.writers:
            return None
        if not locked and not ii.lock.acquire(blocking=False):
            return None
        try:
            if ii.verdicts.get(req.verdict_key) is not hit or ii.version != f.version \
                    or ii.writers or hit[0] != chain_epochs(req.chain):
                return None
            _epochs_then, decided, verifiers = hit
            if verifiers and ii.tree is None:
                return None
            return self.reopen(req, decided, verifiers)
        finally:
            if not locked:
                ii.lock.release()

    def recorded(self, req: OpenRequest, *, locked: bool = False):
        """The verdict of an earlier mount (VerdictCache): this version, this kind of
        open, the chain's policies, keys and options as they are now -- decided then,
        measured (the list has the entry), passed. Its OpenState (and the verdict is
        this mount's), or None to decide. ``locked`` as for :meth:`known`."""
        ii, f = req.ii, req.f
        if req.recorded is None:
            req.recorded = self.cache.get(VerdictCache.record_key(
                f.key, f.version, req.verdict_key, chain_fingerprints(req.chain)))
            if req.recorded is None:
                return None
        measuring, verifier_ids = req.recorded
        by_id = self.tree.by_id
        if any(i not in by_id for i in measuring + verifier_ids):
            return None
        verifiers = tuple(by_id[i] for i in verifier_ids) if self.verify_reads else ()
        if not locked and not ii.lock.acquire(blocking=False):
            return None
        try:
            if ii.version != f.version:
                ii.reset(f.version)
            if ii.writers or (verifiers and not self.collector.warm(ii, f)) or \
                    (verifiers and ii.tree is None):
                return None
            ii.must_measure.update(measuring)
            state = self.reopen(req, [], verifiers)
            ii.verdicts[req.verdict_key] = (chain_epochs(req.chain), [], verifiers)
            self.stats.add(done_records=1)
            return state
        finally:
            if not locked:
                ii.lock.release()

    def keep(self, req: OpenRequest, epochs: tuple, verifiers) -> None:
        """Step 8 (ii.lock held): the verdict of a read-only open whose actions all
        ran, nobody writing the file, for the next open like it (unless policy or
        keys change) and, after a remount, in the verdict cache."""
        ii, f, chain = req.ii, req.f, req.chain
        ii.verdicts[req.verdict_key] = (epochs, req.decided, verifiers)
        # a pass owed to the new-file allowance is kept in memory only, as the kernel
        # keeps IMA_NEW_FILE: a remount does not inherit it
        if req.decided and epochs == chain_epochs(chain) and not ii.new_file:
            self.cache.put(
                VerdictCache.record_key(f.key, f.version, req.verdict_key,
                                        chain_fingerprints(chain)),
                sorted(ii.must_measure & {n.id for n in chain}),
                [n.id for n in verifiers_of(req.decided)])
