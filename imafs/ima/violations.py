"""The violation checks of an open (the kernel's ``ima_rdwr_violation_check`` and
``mmap_violation_check``, ima_main.c), against the file's opens through the mount.

- :func:`rdwr_violation_check`: ToMToU (a writer while a measured reader is open)
  and open_writers (a measured read while a writer is open) violations.
- :func:`writers_check`: an open appraised as code -- BPRM_CHECK, CREDS_CHECK,
  MMAP_CHECK, MMAP_CHECK_REQPROT -- while the file has writers through the mount is
  refused with ETXTBSY. The kernel refuses ``mmap(PROT_EXEC)`` of a file that is
  mapped shared-writable (mmap_violation_check) and an exec of a file open for write
  (deny_write_access); imafs decides at the open that stands for the mapping, reads
  the file only after the mount's dirty pages are written back, and refuses while
  any writer is open: a writer could change, in the page cache the loader reads,
  bytes the decision did not see. For the same reason a read-only open that the
  approximation could take for a library load is refused as if the file were ELF,
  whatever it holds now, when an appraise rule would cover that load.
"""
from __future__ import annotations

import errno
import os

from imafs.ima.hooks import CODE_FUNCS, events, has_measure, may_load
from imafs.ima.iint import COUNTS, AccessDenied

VIOLATION_FUNCS = ("FILE_CHECK", "MMAP_CHECK", "MMAP_CHECK_REQPROT")


def rdwr_violation_check(recorder, req) -> None:
    """ima_rdwr_violation_check, before anything is measured: for FILE_CHECK and
    MMAP_CHECK, in every namespace whose policy has a measure rule -- whether or
    not a rule matched this open (a writer matches no read rule, yet it is the
    one that causes a ToMToU)."""
    ii = req.ii
    for n in req.chain:
        if not has_measure(n.policy):
            continue
        for ev in req.events:
            if ev.func not in VIOLATION_FUNCS:
                continue
            if req.mode.writable:
                if n.id in ii.must_measure and ii.readers > 0:
                    recorder.violation(n, req.f, req.subject, "ToMToU", req.ns.id)
                break       # one per open: a writer triggers FILE_CHECK only
            must = any(d.measure for nn, e, d in req.decided if nn is n and e is ev)
            if must:
                ii.must_measure.add(n.id)
                if ii.writers > 0:
                    recorder.violation(n, req.f, req.subject, "open_writers", req.ns.id)


def writers_cause(ii, f) -> str:
    """The kernel's name for why the file is busy: ``mmapped_writers`` when a process
    that opened it for write through the mount maps it shared (mmap_violation_check's
    cause), else ``open_writers``."""
    with COUNTS:
        pids = list(ii.writer_pids)
    if f.shared_mapping is not None and f.shared_mapping(pids):
        return "mmapped_writers"
    return "open_writers"


def writers_check(audit, get_action, req) -> AccessDenied | None:
    """The refusal of an open appraised as code while the file has writers through
    the mount (ii.lock held, after get_action), or None. Every namespace whose
    appraise rule covers it audits the refusal (``appraise``, cause
    ``mmapped_writers``/``open_writers``); enforce mode refuses, log and fix mode
    allow (as the kernel, whose mmap_violation_check only matters when the appraisal
    is enforced)."""
    ii, mode = req.ii, req.mode
    with COUNTS:
        if ii.writers == 0:
            return None
    code = [(n, ev, d) for n, ev, d in req.decided
            if d.appraise and n.appraise_mode != "off" and ev.func in CODE_FUNCS]
    if not code and may_load(req.chain, req.f, mode.mask, mode.exec_, req.role):
        # what a loader may read is what a writer leaves in the page cache: decide as
        # for an ELF file
        hyp = events(req.chain, req.subject, req.f, ii, mode.mask, mode.exec_, req.funcs,
                     req.role, assume_load=True)
        code = [(n, ev, d) for n, ev, d in get_action(req.ns, hyp)
                if d.appraise and n.appraise_mode != "off" and ev.func in CODE_FUNCS]
    if not code:
        return None
    cause = writers_cause(ii, req.f)
    refuse = False
    seen = set()
    for n, ev, _d in code:
        if n.id in seen:
            continue
        seen.add(n.id)
        audit.record("appraise", ns=n.path, path=req.f.path, pid=req.subject.pid,
                     uid=req.subject.uid, func=ev.func, result="fail", cause=cause,
                     mode=n.appraise_mode, errno="ETXTBSY")
        refuse = refuse or n.appraise_mode == "enforce"
    if not refuse:
        return None
    return AccessDenied(errno.ETXTBSY, f"{os.fsdecode(req.f.path)}: {cause}: open for "
                        f"write through the mount while appraised as {code[0][1].func}")
