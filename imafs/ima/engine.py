"""The integrity engine's entry points: an open, a read, a release in; a verdict out.

:meth:`Engine.file_open` is the kernel's ``process_measurement()`` (ima_main.c) for
one open, under the caller's namespace **and every ancestor's** policy, and reads
top to bottom the same way:

1. the verdict of an earlier open like this one, if nothing changed since
   (the kernel's IMA_DONE_MASK flags; also kept in LMDB across remounts: verdicts.py);
2. get action: the open's hooks (hooks.py) matched against each namespace's policy;
3. the inode's lock -- on the event loop only when nothing needs hashing or waiting:
   otherwise the open returns a :class:`Pending` that a worker thread finishes (so
   does an open of a file with writers through the mount: the kernel writes their
   dirty pages back first, and steps 2-3 run after that, in the worker thread);
4. violations (open_writers, ToMToU: ima_rdwr_violation_check; code opened while
   the file has writers through the mount: violations.writers_check);
5. per decision: collect (collect.py), store (record.py), audit, appraise
   (appraise.py; the metadata's EVM status from evm_hooks.py); 5b. the behaviour
   models of the chain decide (modelhooks.py): IMA measures and appraises, the
   model decides afterwards; either can refuse;
6. the handle counted; 7. its reads verified (readverify.py); 8. the verdict kept
   (verdicts.py).

The FUSE adapter describes an open with :class:`Subject`, :class:`FileRef` and
:class:`OpenMode`, and gets an :class:`OpenState` to hand back at read and release,
None (nothing to do: not a regular file), a :class:`Pending` (finish it in a worker
thread), or :class:`AccessDenied`. Reads (:meth:`Engine.file_read`) and releases
(:meth:`Engine.file_release`) answer the same way. A change of a file's attributes
or xattrs through the mount, and the names of the xattrs a caller sees, are the
inode hooks (appraise_hooks.py, mixed into :class:`Engine`). Nothing here imports
FUSE.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from dataclasses import dataclass

from imafs.ima import appraise as ap
from imafs.ima import digest_cache, hashing, query
from imafs.ima.appraise_hooks import InodeHooks
from imafs.ima.audit import AuditLog
from imafs.ima.cache import DigestCache, TreeCache, VerdictCache, WriteMarks, purge_unfinished
from imafs.ima.collect import Collector, Stats, needed
from imafs.ima.evm_hooks import Change, EvmHooks
from imafs.ima.hooks import (MMAP_CHECK_MODES, ExecRoles, OpenMode, events, load_role,
                             verdict_key)
from imafs.ima.modelhooks import Modelling, models_of
from imafs.ima.iint import (COUNTS, AccessDenied, FileRef, FsInfo, IInt, IIntTable,
                            OpenState, Pending, Subject, settle)
from imafs.ima.lastwriter import LastWriter
from imafs.ima.namespaces import Namespace, NamespaceTree, chain_epochs
from imafs.ima.nsxattr import XattrView
from imafs.ima.policy import AccessEvent, Decision
from imafs.ima.readverify import ReadVerifier, ReadVerifyError, verifiers_of
from imafs.ima.record import Recorder, measurement_spec
from imafs.ima.treemem import DEFAULT_BUDGET as DEFAULT_TREE_MEMORY
from imafs.ima.treemem import TreeMemory
from imafs.ima.verdicts import KeptVerdicts
from imafs.ima.violations import rdwr_violation_check, writers_check

log = logging.getLogger("imafs.engine")

# the engine's interface, for the FUSE adapter and the control directory
__all__ = ["AccessDenied", "Change", "Engine", "FileRef", "FsInfo", "OpenMode", "OpenState",
           "Pending", "ReadVerifyError", "Subject", "settle"]


@dataclass(slots=True)
class OpenRequest:
    """One open on its way through process_measurement: the request, and what has
    been worked out for it so far (a Pending carries it to the worker thread)."""
    subject: Subject
    f: FileRef
    mode: OpenMode
    funcs: list | None
    ns: Namespace
    chain: list
    ii: IInt
    role: str | None = None              # of an exec open: "elf", "interp", "other"
    verdict_key: tuple | None = None     # a read-only open's (step 1)
    recorded: tuple | None = None        # its verdict from LMDB, if any
    events: list | None = None           # step 2
    decided: list | None = None          # [(namespace, event, decision)]
    listed: dict | None = None           # ns id -> digest_cache.Found or None (step 5)
    models: list = ()                    # [(namespace, behaviour model)] of the chain
    actor: object = None                 # who acts, for them (when known on the loop)
    model_events: tuple | None = None    # the events this open is (when known on it)
    writeback: bool = False              # writers' dirty pages first (worker thread)


class Engine(InodeHooks):
    def __init__(self, tree: NamespaceTree, *, store=None, audit: AuditLog | None = None,
                 verify_reads: bool = False, cache_store=None,
                 tree_memory: int = DEFAULT_TREE_MEMORY, mmap_check: str = "all-elf"):
        """``store`` holds what must survive a crash (lists, PCRs, namespaces, keys;
        synchronous commits). ``cache_store`` holds digests, verity trees and
        verdicts, which are only a cache: a lost entry is rehashed or decided again,
        so its commits need not wait for the disk (default: ``store``).
        ``verify_reads``: every digest pass also builds the file's verity tree, and
        reads of measured/appraised files are checked with it. ``tree_memory``: the
        bytes of verity trees kept in memory (treemem.py). ``mmap_check``: which
        read-only opens of ELF files stand for a library load (hooks.MMAP_CHECK_MODES,
        docs/kernel-mapping.md)."""
        if mmap_check not in MMAP_CHECK_MODES:
            raise ValueError(f"mmap_check must be one of {MMAP_CHECK_MODES}")
        self.mmap_check = mmap_check
        self.tree = tree
        self.store = store
        self.audit = audit or AuditLog(None)
        self.verify_reads = bool(verify_reads)
        cache_store = cache_store if cache_store is not None else store
        self.digests = DigestCache(cache_store)
        self.trees = TreeCache(cache_store)
        self.verdicts = VerdictCache(cache_store)
        # files with a writer open through the mount: a crash in between leaves their
        # mark, and the next mount drops what the caches say about them
        self.write_marks = WriteMarks(cache_store)
        purge_unfinished(self.write_marks, self.digests, self.trees, self.verdicts)
        self._stats = Stats()
        self.iints = IIntTable()
        self.exec_roles = ExecRoles()
        self.tree_memory = TreeMemory(self.trees, tree_memory)
        self.collector = Collector(self.digests, self.trees, self._stats,
                                   verify_reads=self.verify_reads, memory=self.tree_memory)
        self.recorder = Recorder(store, self.audit)
        self.reads = ReadVerifier(self.recorder, (self.digests, self.trees, self.verdicts),
                                  self._stats)
        self.kept = KeptVerdicts(tree, self.verdicts, self.collector, self._stats,
                                 verify_reads=self.verify_reads, reopen=self._reopened)
        self.xattrs = XattrView(tree)
        self.evm = EvmHooks(tree, self.xattrs, self.audit)
        self.modelling = Modelling(self.collector)
        self.last_writer = LastWriter(tree, (self.digests, self.trees, self.verdicts),
                                      self.write_marks, self.evm)

    # ------------------------------------------------------------------ state
    def active(self) -> bool:
        """Whether any namespace has rules or a behaviour model (the open hooks are
        needed at all)."""
        if len(self.tree.root.policy):
            return True
        return any(len(ns.policy) or ns.model is not None for ns in self.tree.by_id.values())

    def modelled(self) -> bool:
        """Whether any namespace has a behaviour model (namespace operations are
        events: inode_event)."""
        return any(ns.model is not None for ns in self.tree.by_id.values())

    def watches_attrs(self) -> bool:
        """Whether changes of owner, group, mode and size must come through
        :meth:`inode_setattr`: some policy has rules, or some namespace has EVM on."""
        return self.active() or self.evm.active()

    def stats(self) -> dict:
        """A snapshot of the engine's counters (the ``stats`` control file), the
        behaviour models' included."""
        return {**self._stats.snapshot(), **self.tree_memory.stats(),
                **self.modelling.stats()}

    def namespace_of(self, subject: Subject) -> Namespace:
        """The caller's namespace; a process that cannot be placed is refused, never
        treated as the host."""
        ns = self.tree.of_pid(subject.pid)
        if ns is None:
            raise AccessDenied(errno.EACCES, f"pid {subject.pid}: integrity namespace unknown")
        return ns

    def get_action(self, ns: Namespace, evs) -> list[tuple[Namespace, AccessEvent, Decision]]:
        """ima_get_action over the namespace chain: each event matched against the
        policy of ``ns`` and every ancestor; the decisions that ask for anything."""
        out = []
        for n in ns.chain():
            if not len(n.policy):
                continue
            for ev in evs:
                d = n.policy.match(ev)
                if d.measure or d.appraise or d.audit or d.hash:
                    out.append((n, ev, d))
        return out

    # ------------------------------------------------------------------ open
    def file_open(self, subject: Subject, f: FileRef, mode: OpenMode, *,
                  funcs: list[tuple[str, int]] | None = None):
        """Measure/appraise/audit one open: its OpenState, None when IMA has nothing
        to do (not a regular file), or a Pending when the rest must not run on the
        event loop (hashing, or waiting for the file's lock): its ``finish()`` -- in a
        worker thread -- completes this same decision and returns the OpenState.
        Raises AccessDenied to refuse (here or from ``finish()``). ``funcs``
        overrides the hooks derived from the open (e.g. POLICY_CHECK).

        An O_DIRECT open (``mode.direct``) is not hashed, as the kernel's
        ima_calc_file_hash refuses it: a measurement records a zero digest and leaves
        the file unmeasured, an appraisal fails unless the rule says
        ``permit_directio``, and "collect_data" / "failed(directio)" is audited."""
        ns = self.namespace_of(subject)
        if not stat.S_ISREG(f.st.st_mode):
            return None
        req = OpenRequest(subject, f, mode, funcs, ns, ns.chain(), self.iints.get(f.key))
        if funcs is None:
            req.models = models_of(ns)
        if mode.exec_ and funcs is None:
            req.role = self.exec_roles.role(subject, f, req.ii)
        elif funcs is None:
            req.role = load_role(self.mmap_check, subject, False)
        state = self.process_measurement(req)
        if type(state) is Pending:
            return state
        return self._decided(req, state)

    def process_measurement(self, req: OpenRequest):
        """The inline attempt of an open (steps 1-3; the rest in ``_measure``)."""
        ii, f, mode = req.ii, req.f, req.mode
        # the last writer's close is being processed: its outcome first
        if ii.settling is not None:
            return Pending(self._after_close, req, cost=f.st.st_size,
                           owner=(req.subject.uid, req.ns.id))
        # what the models (step 5b) need and is not at hand -- who acts, from /proc;
        # the file's sha256 -- is read in a worker thread, and then the whole open is
        inline = not req.models or self.modelling.ready(req)
        # 1. the verdict of an open like this one (this version, this kind of caller)
        if not (mode.writable or mode.created or mode.direct or req.funcs is not None):
            req.verdict_key = verdict_key(req.chain, req.ns, req.subject, mode.mask,
                                          mode.exec_, req.role)
            if not inline:
                return self._pending_open(req)
            state = self.kept.known(req)
            if state is None:
                state = self.kept.recorded(req)
            if state is not None:
                return state
        # a writer through the mount may hold dirty pages the backing file does not
        # have yet: what decides (ELF or not, the hash) is read after they are written
        # back, in a worker thread
        if ii.writers and f.writeback is not None and self._reads_for_access(req):
            req.writeback = True
            return Pending(self._finish_open, req, cost=f.st.st_size,
                           owner=(req.subject.uid, req.ns.id))
        # 2. get action: the open's hooks, matched in every namespace of the chain
        self._get_action(req)
        # 3. the inode's lock, without waiting; the digests at hand without hashing
        if not inline or not ii.lock.acquire(blocking=False):
            return self._pending_open(req)
        if req.decided and not self.collector.warm(ii, f):
            ii.lock.release()
            return self._pending_open(req)
        return self._measure(req)

    def _pending_open(self, req: OpenRequest) -> Pending:
        """The rest of an open, for a worker thread: its cost is the file's size
        (it may hash all of it, or wait for a pass over it), its owner the caller
        (uid, namespace), for the FUSE layer to schedule fairly."""
        return Pending(self._finish_open, req, cost=req.f.st.st_size if req.decided else 0,
                       owner=(req.subject.uid, req.ns.id))

    def _after_close(self, req: OpenRequest):
        """Pending.finish() of an open that came while the last writer's close was
        processed: wait for it, then decide."""
        done = req.ii.settling
        if done is not None:
            done.wait()
        state = self.process_measurement(req)
        if type(state) is Pending:
            return state.finish()
        return self._decided(req, state)

    @staticmethod
    def _reads_for_access(req: OpenRequest) -> bool:
        """Does the access decision depend on the file's bytes: an exec (ELF or
        not), or a chain that appraises."""
        return req.mode.exec_ or any(r.action == "appraise" for n in req.chain
                                     for r in n.policy.rules)

    def _finish_open(self, req: OpenRequest):
        """Pending.finish() of an open (a worker thread): steps 3-8 of the same
        decision (and 2 first, after the writeback, when the file had writers). A
        verdict that another open of the same kind made while this one waited for
        the lock is taken as step 1 would have."""
        if req.writeback:
            try:
                req.f.writeback()
            except OSError as e:
                log.warning("%s: the mount's dirty pages were not written back: %s",
                            os.fsdecode(req.f.path), e)
            req.f.st = os.fstat(req.f.fd)
            self._get_action(req)
        req.ii.lock.acquire()
        state = None
        if req.verdict_key is not None:
            try:
                state = self.kept.known(req, locked=True)
                if state is None and (req.recorded is not None or req.events is None):
                    state = self.kept.recorded(req, locked=True)
            except BaseException:
                req.ii.lock.release()
                raise
        if state is not None:
            req.ii.lock.release()
        else:
            state = self._measure(req)
        return self._decided(req, state)

    def _get_action(self, req: OpenRequest) -> None:
        """Step 2 (in the worker thread when the inline attempt stopped at step 1)."""
        req.events = events(req.chain, req.subject, req.f, req.ii, req.mode.mask,
                            req.mode.exec_, req.funcs, req.role)
        req.decided = self.get_action(req.ns, req.events)

    def _decided(self, req: OpenRequest, state):
        if req.role is not None and req.mode.exec_:
            self.exec_roles.decided(req.subject, req.f, req.ii, req.role)
        return state

    def _measure(self, req: OpenRequest) -> OpenState:
        """Steps 4-8, with ``req.ii.lock`` held (released here)."""
        ii, f, mode, chain = req.ii, req.f, req.mode, req.chain
        try:
            if req.events is None:
                self._get_action(req)
            if ii.version != f.version:
                ii.reset(f.version)
            epochs = chain_epochs(chain)
            writers = ii.writers
            # 4. violations, before anything is measured
            rdwr_violation_check(self.recorder, req)
            denial = writers_check(self.audit, self.get_action, req)
            if denial is not None:
                raise denial
            # 5. collect, store, audit, appraise (raises AccessDenied to refuse)
            if req.decided:
                if mode.direct:
                    self._process_direct(req)
                else:
                    self._process(req)
            # 5b. the behaviour models decide (raises AccessDenied, EPERM, to refuse)
            if req.models:
                self.modelling.file_open(req)
            # 6. the handle counted (a refused open never gets one): readers are the
            # read-only opens (the kernel's i_readcount)
            if mode.writable and not ii.write_mark:
                self.write_marks.add(f.key)
                ii.write_mark = True
            with COUNTS:
                if mode.readable and not mode.writable:
                    ii.readers += 1
                if mode.writable:
                    ii.writers += 1
                    ii.wgen += 1
                    pid = req.subject.pid
                    ii.writer_pids[pid] = ii.writer_pids.get(pid, 0) + 1
            state = OpenState(ii, req.ns, f, mode.readable, mode.writable, req.decided,
                              subject=req.subject, wgen=ii.wgen)
            # 7. read-time verification: a read-only handle of a file nobody writes
            # through the mount, measured or appraised, reads against its verity tree
            verifiers = ()
            if self.verify_reads and mode.readable and not mode.writable \
                    and ii.writers == 0 and not mode.direct:
                verifiers = verifiers_of(req.decided)
                if verifiers:
                    algo = verifiers[0].hash_algo
                    try:
                        self.collector.digest(ii, f, algo, {algo}, tree=True)
                    except BaseException:
                        with COUNTS:
                            ii.readers -= 1
                        raise
                    state.tree, state.verifiers = ii.tree, verifiers
            if state.tree is not None:
                self.reads.add(ii, state)
            # 8. the verdict kept: the next open like this one takes step 1 (unless
            # policy or keys change), and after a remount the verdict cache
            if req.verdict_key is not None and writers == 0 and ii.version == f.version:
                self.kept.keep(req, epochs, verifiers)
        finally:
            ii.lock.release()
        return state

    # ------------------------------------------------------------------ step 1
    def _reopened(self, req: OpenRequest, decided, verifiers) -> OpenState:
        """The OpenState of a read-only open decided by a kept verdict (ii.lock held):
        the behaviour models still decide (5b)."""
        ii = req.ii
        if req.models:
            self.modelling.file_open(req)
        if req.mode.readable:
            with COUNTS:
                ii.readers += 1
        state = OpenState(ii, req.ns, req.f, req.mode.readable, False, decided,
                          subject=req.subject, wgen=ii.wgen)
        if verifiers:
            state.tree, state.verifiers = ii.tree, verifiers
            self.reads.add(ii, state)
        return state

    # ------------------------------------------------------------------ step 5
    def _process(self, req: OpenRequest) -> None:
        """Per decision, in chain order: store the measurement, audit, appraise (the
        first refusal wins; the others still measure and audit)."""
        xattrs, algos = needed(req.decided, req.f)
        algos |= digest_cache.wanted_algos(req.decided)     # in the same hashing pass
        denial = None
        for n, ev, d in req.decided:
            xattr = xattrs.get(n.id)
            if d.hash:      # IMA_HASH: the last writer's close rewrites the hash
                req.ii.update_xattr.add(n.id)
            if d.measure:
                self._store(req, n, d, xattr, algos)
            if d.audit and n.id not in req.ii.audited:
                algo = ap.get_hash_algo(xattr, n.hash_algo)
                digest = self.collector.digest(req.ii, req.f, algo, algos | {algo})
                self.recorder.audit_measurement(n, req.f, req.subject, ev.func, algo,
                                                digest, d)
                req.ii.audited.add(n.id)
            if d.appraise and denial is None:
                denial = self._appraise(req, n, ev, d, xattr, algos)
        if denial is not None:
            raise denial

    def _store(self, req: OpenRequest, n: Namespace, d: Decision, xattr, algos) -> None:
        """ima_store_measurement, once per namespace, PCR and version."""
        ii, f = req.ii, req.f
        done = ii.measured.setdefault(n.id, set())
        if d.pcr in done:
            return
        if d.digest_cache_measure and digest_cache.measured(
                req, n, lambda a: self.collector.digest(ii, f, a, algos | {a})):
            done.add(d.pcr)     # the entry of a list that holds it stands for the file's
            return
        template, algo, verity = measurement_spec(n, d, xattr)
        if verity:
            digest = self.collector.verity_digest(ii, f, algo, algos)
        else:
            digest = self.collector.digest(ii, f, algo, algos | {algo})
        self.recorder.measurement(n, f, req.subject, req.ns.id, template, algo, digest,
                                  xattr, d.pcr, verity)
        done.add(d.pcr)

    def _appraise(self, req: OpenRequest, n: Namespace, ev, d: Decision, xattr, algos):
        """ima_appraise_measurement for one decision: the result (cached on the IInt
        per policy and keyring epoch), its audit line, fix mode, and the kernel's
        refusal to open a signed file for write. The refusal to raise, or None."""
        if n.appraise_mode == "off":
            return None
        ii, f, subject, mode = req.ii, req.f, req.subject, req.mode
        cache_key = (n.id, ap.decision_flags(d))
        cached = ii.appraised.get(cache_key)
        fresh = cached is None or cached[0] != n.epoch()
        if not fresh:
            result = cached[1]
        else:
            # IMA_NEW_FILE: set when an open that created the file finds no label
            if mode.created and not xattr:
                ii.new_file = True
            result = None
            if d.digest_cache_appraise:     # a list that was appraised: tried first
                result = digest_cache.appraisal(
                    req, n, lambda a: self.collector.digest(ii, f, a, algos | {a}))
            if result is None:
                # evm_verifyxattr(): the metadata as n sees it, once security.ima is there
                evm_result = self.evm.verifyxattr(n, f) if xattr else None
                self.evm.audit_appraisal(n, f, subject, ev.func, evm_result)
                result = ap.appraise_decision(
                    xattr, d, lambda a: self.collector.digest(ii, f, a, algos | {a}),
                    n.keyring,
                    verity_digest=lambda a: self.collector.verity_digest(ii, f, a, algos),
                    default_algo=n.hash_algo, new_file=ii.new_file, file_size=f.st.st_size,
                    evm_status=self.evm.appraisal_status(n, evm_result))
            ii.appraised[cache_key] = (n.epoch(), result)
        if result.passed:
            listed = digest_cache.is_listed(result)
            if mode.writable and (listed or xattr and xattr[0] in (ap.EVM_IMA_XATTR_DIGSIG,
                                                                   ap.IMA_VERITY_DIGSIG)) \
                    and n.appraise_mode == "enforce" and not ii.new_file:
                # a signed file is immutable: the kernel refuses to open it for write;
                # the digest_cache patches, a file a digest list vouches for too
                what = "file in a digest list" if listed else "signed file"
                self.audit.record("appraise", ns=n.path, path=f.path, pid=subject.pid,
                                  uid=subject.uid, func=ev.func, result="fail",
                                  cause="write-" + what.replace(" ", "-"),
                                  mode=n.appraise_mode)
                return AccessDenied(errno.EACCES,
                                    f"{os.fsdecode(f.path)}: {what} opened for write")
            if mode.writable:
                ii.update_xattr.add(n.id)   # IMA_UPDATE_XATTR
            return None
        if mode.created or ii.new_file:
            return None
        if fresh:   # as the kernel: audited when appraised, not on a cached status
            self.audit.record("appraise", ns=n.path, path=f.path, pid=subject.pid,
                              uid=subject.uid, func=ev.func, result=result.status,
                              cause=result.cause, detail=result.detail, mode=n.appraise_mode)
        if n.appraise_mode == "fix" and ap.may_fix(xattr) \
                and result.cause != "denied-hash-algorithm":
            # ima_fix_xattr(): the hash in the algorithm the file was appraised with
            # (the one its value names, else the default); a value refused only for
            # its algorithm (appraise_algos=, checked after the appraisal) is kept
            algo = result.algo or n.hash_algo
            digest = self.collector.digest(ii, f, algo, algos | {algo})
            try:
                f.setxattr(n.xattr_name, ap.hash_xattr(algo, digest))
                log.info("fix: wrote %s hash of %s", n.xattr_name, os.fsdecode(f.path))
                self.evm.ima_written(n, f)      # and n's HMAC, as the kernel's post hook
            except OSError as e:
                log.warning("fix: cannot write %s of %s: %s", n.xattr_name,
                            os.fsdecode(f.path), e)
            if mode.writable:
                ii.update_xattr.add(n.id)   # fixed: the status is a pass
            return None
        if n.appraise_mode == "enforce":
            return AccessDenied(errno.EACCES, f"{os.fsdecode(f.path)}: {result}")
        return None

    def _process_direct(self, req: OpenRequest) -> None:
        """Step 5 of an O_DIRECT open (see file_open): nothing is hashed."""
        ii, f, subject = req.ii, req.f, req.subject
        denial = None
        audited = False
        for n, ev, d in req.decided:
            xattr = n.ima_xattr(f.getxattr)
            algo = ap.get_hash_algo(xattr, n.hash_algo)
            zero = bytes(hashing.hash_algo(algo).digest_size)
            if (d.measure or d.appraise or d.audit) and not audited:
                self.audit.record("collect_data", ns=n.path, path=f.path, pid=subject.pid,
                                  uid=subject.uid, func=ev.func, cause="failed(directio)")
                audited = True
            if d.measure and d.pcr not in ii.measured.get(n.id, ()):
                template = d.template or n.template
                if template == "ima":
                    algo, zero = "sha1", bytes(20)
                # recorded, but not marked measured
                self.recorder.measurement(n, f, subject, req.ns.id, template, algo, zero,
                                          xattr, d.pcr)
            if d.audit and n.id not in ii.audited:
                self.recorder.audit_measurement(n, f, subject, ev.func, algo, zero, d)
                ii.audited.add(n.id)
            if d.appraise and denial is None and n.appraise_mode == "enforce" \
                    and not d.permit_directio:
                denial = AccessDenied(errno.EACCES, f"{os.fsdecode(f.path)}: O_DIRECT open "
                                      f"of an appraised file (no permit_directio)")
        if denial is not None:
            raise denial

    # ------------------------------------------------------------------ read
    def file_read(self, state: OpenState, fd: int, off: int, size: int):
        """A read through an open handle (``fd``: its backing descriptor): the bytes,
        checked against the verity trees of the file's verifying handles; None when
        no handle of the file verifies reads (the caller reads itself); a Pending
        when the data is not in the page cache or does not match (its ``finish()``
        reads, checks and, on a mismatch, records the violation and raises
        :class:`ReadVerifyError`, EIO)."""
        return self.reads.read(state, fd, off, size)

    def measured_size(self, key) -> int | None:
        """See ReadVerifier.measured_size (the size shown while reads are verified)."""
        return self.reads.measured_size(key)

    # ------------------------------------------------------------------ release
    def file_release(self, state: OpenState):
        """A handle was released. Cheap and non-blocking, so the adapter calls it as
        soon as FUSE RELEASE arrives, before it handles any later request: the counts
        (the kernel's i_readcount / i_writecount) drop in order, and a
        ``close(w); open(r)`` is never seen as open-writers. Returns None, or the
        slow part (the last writer's close: re-measure, relabel: lastwriter.py) as a
        Pending."""
        ii = state.iint
        with COUNTS:
            self.reads.drop(state)
            if state.readable and not state.writable:
                ii.readers -= 1
            if state.writable:
                ii.writers -= 1
                pid = state.subject.pid if state.subject is not None else 0
                if ii.writer_pids.get(pid, 0) > 1:
                    ii.writer_pids[pid] -= 1
                else:
                    ii.writer_pids.pop(pid, None)
                if ii.writers == 0 and (ii.dirty or ii.new_file or ii.write_mark):
                    changed, ii.dirty = ii.dirty, False
                    ii.settling = done = threading.Event()
                    return Pending(self.last_writer.close, state, changed, done)
        return None

    def file_written(self, state: OpenState) -> None:
        """The file was written, or truncated, through this writable handle."""
        state.iint.dirty = True

    # ------------------------------------------------------------------ query
    def explain(self, subject: Subject, f: FileRef, *, exec_: bool = False) -> dict:
        """What the engine decides about a file for this subject, and why (the
        ``query`` control file): see query.py."""
        return query.explain(self, subject, f, exec_=exec_)

