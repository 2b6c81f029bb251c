"""The ``query`` control file: what the engine decides about one file for one caller,
and why -- the digest a measurement records, the rules each namespace of the chain
matches for each hook, the appraisal they ask for (a digest list that vouches for
the file: "digest in list debian.list (from bash 5.2.15-2+b7)") and, where EVM is on,
the status of the file's metadata. Nothing is recorded: the
file's per-inode state is only read (and its digests computed when missing)."""
from __future__ import annotations

import os
import stat

from imafs.ima import appraise as ap
from imafs.ima import digest_cache
from imafs.ima import digest_lists as dl
from imafs.ima.hooks import events, load_role
from imafs.ima.iint import FileRef, Subject
from imafs.ima.policy import MAY_EXEC, MAY_READ


def explain(engine, subject: Subject, f: FileRef, *, exec_: bool = False) -> dict:
    """The answer, as a dict the control file prints as JSON (``exec_``: an exec of
    the file rather than a read)."""
    ns = engine.namespace_of(subject)
    out = {"path": os.fsdecode(f.path), "namespace": ns.path, "namespaces": []}
    if not stat.S_ISREG(f.st.st_mode):
        out["error"] = "not a regular file: IMA measures and appraises regular files only"
        return out
    collector = engine.collector
    ii = engine.iints.get(f.key)
    evs = events(ns.chain(), subject, f, ii, MAY_EXEC if exec_ else MAY_READ, exec_,
                 role=load_role(engine.mmap_check, subject, exec_))
    with ii.lock:
        if ii.version != f.version:
            ii.reset(f.version)
        for n in ns.chain():
            entry = {"namespace": n.path, "appraise_mode": n.appraise_mode, "hooks": []}
            xv = n.ima_xattr(f.getxattr)
            entry["xattr"] = ap.describe_xattr(xv) if xv else None
            algo = ap.get_hash_algo(xv, n.hash_algo)   # what a measurement records
            digest = collector.digest(ii, f, algo, {algo})
            entry["digest"] = f"{algo}:{digest.hex()}"
            entry["measured_pcrs"] = sorted(ii.measured.get(n.id, ()))
            digest_for = lambda a: collector.digest(ii, f, a, {a})  # noqa: E731
            evm_r = engine.evm.verifyxattr(n, f)
            if evm_r is not None:        # EVM on in n: the kernel's status, and why
                entry["evm"] = {"mode": n.evm.mode, "status": evm_r.kernel_name,
                                "cause": evm_r.cause, "detail": evm_r.detail}
            evm_status = engine.evm.appraisal_status(n, evm_r if xv else None)
            for ev in evs:
                d = n.policy.match(ev)
                h = {"func": ev.func, "mask": ev.mask, "decision": d.to_dict()}
                listed = None
                if d.digest_cache_measure or d.digest_cache_appraise:
                    found = digest_cache.lookup(n, digest_for)
                    h["digest_list"] = None if found is None else {
                        "list": found.label, "actions": dl.format_actions(found.actions)}
                    if d.digest_cache_appraise and found is not None \
                            and found.actions & dl.ACTION_APPRAISED:
                        listed = f"digest in list {found.label}"
                if listed:
                    h["appraisal"] = {"status": ap.PASS, "cause": None, "detail": listed,
                                      "keyid": None, "allowed": True}
                elif d.appraise:
                    r = ap.appraise_decision(
                        xv, d, digest_for, n.keyring,
                        verity_digest=lambda a: collector.verity_digest(ii, f, a, {a}),
                        default_algo=n.hash_algo, evm_status=evm_status)
                    h["appraisal"] = {"status": r.status, "cause": r.cause,
                                      "detail": r.detail,
                                      "keyid": (f"{r.keyid:08x}"
                                                if r.keyid is not None else None),
                                      "allowed": r.passed or n.appraise_mode != "enforce"}
                entry["hooks"].append(h)
            out["namespaces"].append(entry)
    return out


def own_view(result: dict) -> dict:
    """What a query may tell: everything about the caller's own namespace; of each
    ancestor only whether its appraisal lets the access through. The ancestors'
    rules, labels and measurements are theirs (a child never reads its parent's
    policy or list), and the caller learns the verdict anyway by trying."""
    own = result.get("namespace")
    out = []
    for entry in result.get("namespaces", ()):
        if entry.get("namespace") == own:
            out.append(entry)
            continue
        allowed = all((hk.get("appraisal") or {}).get("allowed", True)
                      for hk in entry.get("hooks", ()))
        out.append({"namespace": entry.get("namespace"), "ancestor": True, "allowed": allowed})
    if "namespaces" in result:
        result["namespaces"] = out
    return result
