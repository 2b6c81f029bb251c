"""ima_store_measurement, ima_add_violation, ima_audit_measurement and buffer events:
what goes into a namespace's measurement list and audit log.

An entry that cannot be stored (LMDB map full, disk full, I/O error, or the
namespace's quota reached: quota.py) refuses the access with EIO -- it never goes on
unmeasured -- with the reason in the log and the audit log; nothing is marked
measured, so the next open tries again.
"""
from __future__ import annotations

import errno
import logging
import os

from imafs.ima import hashing
from imafs.ima.appraise import get_hash_algo
from imafs.ima.audit import AuditLog
from imafs.ima.iint import AccessDenied, FileRef, Subject
from imafs.ima.policy import DEFAULT_PCR
from imafs.ima.quota import QuotaExceeded, admit_list_entry
from imafs.ima.templates import TEMPLATES, buf_entry, build_entry, violation_entry

log = logging.getLogger("imafs.engine")

TRIM_EVERY = 1024       # appends between two Store.trim() calls


def measurement_spec(n, decision, xattr: bytes | None) -> tuple[str, str, bool]:
    """(template, algorithm, verity) of the entry a measure decision records in
    namespace ``n``: the rule's template, else the namespace's; ``digest_type=verity``
    records the fs-verity digest in a template that says so (d-ngv2), in the
    algorithm a v3 signature names (ima_get_hash_algo; sha256 when that is no
    fs-verity algorithm), so the signature in an ima-sigv2 entry covers the recorded
    digest; the ``ima`` template records a sha1 digest whatever the hash algorithm."""
    template = decision.template or n.template
    if decision.digest_type == "verity":
        algo = get_hash_algo(xattr, n.hash_algo)
        if algo not in hashing.VERITY_ALGOS:
            algo = "sha256"
        return verity_template(template), algo, True
    algo = "sha1" if template == "ima" else get_hash_algo(xattr, n.hash_algo)
    return template, algo, False


def verity_template(template: str) -> str:
    """A template that can say "this is an fs-verity digest" (the d-ngv2 field):
    ``digest_type=verity`` without ``template=`` and a namespace default lacking it
    records with ima-ngv2 (ima-sigv2 when the default records signatures)."""
    fields = TEMPLATES.get(template, ())
    if "d-ngv2" in fields:
        return template
    return "ima-sigv2" if "sig" in fields else "ima-ngv2"


def entry(template: str, path: bytes, subject_ns: int, digest: bytes, xattr, pcr: int,
          algo: str, digest_type: str = "ima"):
    """A file's entry. ``ns`` (template ima-ns) records the namespace of the process
    that accessed the file, so a host list tells containers apart."""
    return build_entry(template, name=path, algo=algo, digest=digest, pcr=pcr, xattr=xattr,
                       ns_id=subject_ns, digest_type=digest_type)


def record_buffer(ns, name: str, buf: bytes, *, pcr: int = DEFAULT_PCR, audit=None) -> bool:
    """Measure a buffer (``ima-buf``) into a namespace's list (namespace creation and
    removal...). Raises what the list's append raises, or QuotaExceeded."""
    e = buf_entry(name, buf, algo=ns.hash_algo, pcr=pcr)
    admit_list_entry(ns, e, audit)
    return ns.mlist.add(e)


class Recorder:
    """Appends to the namespaces' lists and writes the audit log, for one mount."""

    def __init__(self, store, audit: AuditLog):
        self.store = store
        self.audit = audit
        self._appended = 0          # entries appended (trims the store's map)

    def add(self, n, entry, subject: Subject, f: FileRef, what: str) -> None:
        """Append ``entry`` to namespace ``n``'s list, or fail closed (AccessDenied,
        EIO)."""
        try:
            admit_list_entry(n, entry, self.audit)
        except QuotaExceeded as e:
            raise AccessDenied(errno.EIO, f"{os.fsdecode(f.path)}: cannot record the {what}: "
                                          f"{e}") from None
        try:
            n.mlist.add(entry)
            self._appended += 1
            if self._appended % TRIM_EVERY == 0 and hasattr(self.store, "trim"):
                self.store.trim()       # appends fault LMDB pages in too (Store.trim)
        except Exception as e:  # noqa: BLE001 - lmdb.Error and friends: fail closed
            reason = (f"{os.fsdecode(f.path)}: cannot record the {what} in namespace "
                      f"{n.path}: {e}")
            log.error("%s (pid %d): access refused", reason, subject.pid)
            self.audit.record("measurement_failed", ns=n.path, path=f.path, pid=subject.pid,
                              uid=subject.uid, what=what, error=str(e))
            raise AccessDenied(errno.EIO, reason) from None

    def measurement(self, n, f: FileRef, subject: Subject, subject_ns: int, template: str,
                    algo: str, digest: bytes, xattr, pcr: int, verity: bool = False) -> None:
        """ima_store_measurement: the file's entry in ``n``'s list."""
        self.add(n, entry(template, f.path, subject_ns, digest, xattr, pcr, algo,
                          "verity" if verity else "ima"), subject, f, "measurement")

    def violation(self, n, f: FileRef, subject: Subject, cause: str, subject_ns: int = 0,
                  **detail) -> None:
        """ima_add_violation: as the kernel, the namespace's default template and PCR
        10 (CONFIG_IMA_MEASURE_PCR_IDX) whatever the rule said, a zero digest; ``ns``
        (ima-ns) names the accessing process's namespace, as in a measurement."""
        self.add(n, violation_entry(n.template, f.path, pcr=DEFAULT_PCR, algo=n.hash_algo,
                                    ns_id=subject_ns), subject, f, f"{cause} violation")
        self.audit.record("violation", ns=n.path, path=f.path, pid=subject.pid,
                          uid=subject.uid, cause=cause, **detail)
        log.info("violation %s: %s (ns %s)", cause, os.fsdecode(f.path), n.path)

    def audit_measurement(self, n, f: FileRef, subject: Subject, func: str, algo: str,
                          digest: bytes, decision) -> None:
        """ima_audit_measurement: one audit line for an ``audit`` rule."""
        self.audit.record("audit", ns=n.path, path=f.path, hash=f"{algo}:{digest.hex()}",
                          pid=subject.pid, uid=subject.uid, func=func,
                          rule=str(decision.audit_rule).rstrip())
