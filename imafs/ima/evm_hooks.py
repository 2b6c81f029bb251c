"""EVM in the engine: each namespace's EVM state, and the kernel's evm_main.c hooks
as the engine calls them -- evm_verifyxattr() for an appraisal, evm_inode_setattr()
/ evm_inode_setxattr() / evm_inode_removexattr() before a change of a file's metadata
through the mount, and evm_inode_post_*() (evm_update_evmxattr) after it.

The formats and the check itself are evm.py's; which ``security.ima`` and
``security.evm`` a namespace sees is nsxattr.py's :class:`XattrView` (``value``).
A namespace's EVM (:class:`EvmState`) is its mode -- ``enforce`` (an EVM failure
fails the appraisal; a change the kernel refuses is EPERM), ``log`` (failures and
refused changes are audited, nothing is refused), ``off`` (EVM is not there) -- its
HMAC key (a host file, evm.HmacKey) and the kernel's ``evm`` securityfs flags
(evm_secfs.py). Its signature keys are the namespace's keyring.

Which namespaces a change concerns (imafs's; the kernel has one EVM):

* a change of a namespace's own ``security.ima``/``security.evm`` (a child's private
  names) concerns that namespace alone;
* any other change (owner, group, mode, another protected xattr, the host's
  ``security.ima``) is checked by the changer's namespace and each of its ancestors
  that has EVM on -- as each would check its own file -- and re-protected (new
  HMAC) in the changer's namespace and each of its descendants that has an HMAC key
  and whose view of the file passed before the change. An ancestor's or a sibling's
  ``security.evm`` is never written: the host's never from inside a child. A change
  they cannot vouch for leaves their view failing.

Signatures (``security.evm`` types 0x03 and 0x05) are never rewritten: the kernel
replaces a verified type-3 signature by an HMAC when it has a key; imafs keeps it
(the file then fails until it is signed again).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from imafs.ima import appraise as ap
from imafs.ima import evm
from imafs.ima.evm_secfs import (EVM_ALLOW_METADATA_WRITES, EVM_INIT_HMAC, EVM_INIT_X509,
                                 EVM_KEY_MASK, EVM_SETUP_COMPLETE, EvmStateError,
                                 state_write)
from imafs.ima.iint import AccessDenied

log = logging.getLogger("imafs.evm")

EVM_MODES = ("enforce", "log", "off")
POSIX_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
_NO_UPDATE_MAGICS = (0x01021994, 0x62656572)     # TMPFS_MAGIC, SYSFS_MAGIC
_PASSED = (ap.PASS, ap.NOXATTRS)                 # a view that may be re-protected


class EvmState:
    """One namespace's EVM: ``mode`` (:data:`EVM_MODES`), ``key`` (its HMAC key or
    None), ``config`` (what the kernel fixes at build time: protected xattrs, the
    file system UUID in HMACs, the ``h_misc`` ABI), ``flags`` (the securityfs
    ``evm`` file's bits) and ``epoch`` (bumped when they change: verdicts depend on
    them). EVM on: EVM_INIT_X509 (the namespace's keyring checks signatures) and,
    with a key, EVM_INIT_HMAC and EVM_SETUP_COMPLETE."""

    __slots__ = ("mode", "key", "config", "flags", "epoch")

    def __init__(self, mode: str = "off", key: evm.HmacKey | None = None, *,
                 config: evm.EvmConfig = evm.DEFAULT_CONFIG, flags: int | None = None):
        if mode not in EVM_MODES:
            raise ValueError(f"EVM mode must be one of {', '.join(EVM_MODES)}, not {mode!r}")
        if key is not None and mode == "off":
            raise ValueError("an EVM HMAC key needs EVM on (enforce or log)")
        self.mode, self.key, self.config = mode, key, config
        if flags is None:
            flags = 0
            if mode != "off":
                flags = EVM_INIT_X509
                if key is not None:
                    flags |= EVM_INIT_HMAC | EVM_SETUP_COMPLETE
        self.flags = flags
        self.epoch = 0

    @property
    def on(self) -> bool:
        """EVM checks this namespace's files (evm_key_loaded(), and not off)."""
        return self.mode != "off" and bool(self.flags & EVM_KEY_MASK)

    @property
    def hmac_key(self) -> evm.HmacKey | None:
        return self.key if self.flags & EVM_INIT_HMAC else None

    @property
    def hmac_disabled(self) -> bool:
        """evm_hmac_disabled(): no HMAC key, and metadata writes allowed."""
        return not self.flags & EVM_INIT_HMAC and bool(self.flags & EVM_ALLOW_METADATA_WRITES)

    def keyring(self, ns):
        """The keyring EVM signatures of ``ns`` are checked against (EVM_INIT_X509)."""
        return ns.keyring if self.flags & EVM_INIT_X509 else None

    def write(self, text: bytes | str) -> int:
        """A write to the ``evm`` file (evm_secfs.state_write): the new flags, or
        EvmStateError. EVM off: EPERM (the mount or namespace option turns it on)."""
        if self.mode == "off":
            raise EvmStateError(errno.EPERM, "EVM is off in this namespace (evm=enforce "
                                             "or evm=log turns it on)")
        flags = state_write(self.flags, text, hmac_key_available=self.key is not None)
        if flags != self.flags:
            self.flags = flags
            self.epoch += 1
        return flags

    def fingerprint(self) -> bytes:
        """What verdicts depend on, as content (empty while EVM is off, so that the
        verdicts of namespaces without EVM keep their keys)."""
        if self.mode == "off":
            return b""
        c = self.config
        parts = (self.mode, self.flags & ~EVM_SETUP_COMPLETE,
                 self.key.fingerprint.hex() if self.key is not None else "",
                 tuple((x.name, x.enabled) for x in c.xattrs), c.fsuuid, c.bits, c.byteorder)
        return repr(("evm",) + parts).encode()

    def describe(self) -> str:
        key = f", HMAC key {self.key.fingerprint.hex()[:16]}" if self.key else ""
        return f"{self.mode} (flags 0x{self.flags:x}{key})"


@dataclass(frozen=True)
class Change:
    """A change of a file's metadata through the mount: setattr's ``uid``, ``gid``,
    ``mode`` (None: not set), or setxattr's / removexattr's ``name`` and ``value``
    (None: removal)."""
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    name: str | None = None
    value: bytes | None = None

    @property
    def attrs(self) -> bool:
        return self.uid is not None or self.gid is not None or self.mode is not None

    def describe(self) -> str:
        if self.name is not None:
            return f"{'setxattr' if self.value is not None else 'removexattr'} {self.name}"
        parts = [f"{k}={v if k != 'mode' else oct(v)}" for k, v in
                 (("uid", self.uid), ("gid", self.gid), ("mode", self.mode)) if v is not None]
        return " ".join(["setattr"] + parts)


class EvmHooks:
    """The EVM steps of the engine over one namespace tree (``xattrs``: its
    XattrView; ``audit``: the audit log)."""

    def __init__(self, tree, xattrs, audit):
        self.tree = tree
        self.xattrs = xattrs
        self.audit = audit

    def active(self) -> bool:
        """Whether any namespace has EVM on (else no hook has anything to do)."""
        return any(ns.evm.on for ns in list(self.tree.by_id.values()))

    # ------------------------------------------------------------------ the check
    def metadata(self, ns, f, st: os.stat_result | None = None) -> evm.FileMetadata:
        """What EVM covers of file ``f`` (a FileRef) as namespace ``ns`` sees it."""
        return evm.FileMetadata.collect(
            lambda name: self.xattrs.value(ns, name, f.getxattr), st or f.st,
            generation=f.generation & 0xFFFFFFFF, fs_uuid=f.fs.s_uuid, config=ns.evm.config)

    def check(self, ns, f, st: os.stat_result | None = None) -> evm.EvmResult:
        """evm_verify_hmac() of ``f`` in ``ns``'s view."""
        e = ns.evm
        return evm.evm_verify_hmac(self.xattrs.value(ns, evm.XATTR_NAME_EVM, f.getxattr),
                                   self.metadata(ns, f, st), hmac_key=e.hmac_key,
                                   keyring=e.keyring(ns), config=e.config)

    def verifyxattr(self, ns, f) -> evm.EvmResult | None:
        """evm_verifyxattr() for an appraisal in ``ns`` (the file has a
        ``security.ima`` there): None when EVM is off in ``ns`` (the appraisal gets
        INTEGRITY_UNKNOWN, as from a kernel without EVM)."""
        if not ns.evm.on or not stat.S_ISREG(f.st.st_mode):
            return None
        return self.check(ns, f)

    @staticmethod
    def appraisal_status(ns, r: evm.EvmResult | None) -> str:
        """The status the appraisal takes: EVM's in enforce mode; INTEGRITY_UNKNOWN
        when EVM is off or only logs."""
        if r is None or ns.evm.mode != "enforce":
            return ap.UNKNOWN
        return r.status

    def audit_appraisal(self, ns, f, subject, func: str, r: evm.EvmResult | None) -> None:
        """The audit record of an appraisal whose metadata did not verify
        (``appraise_metadata``, the kernel's op for it; the status as the kernel's
        audit prints it)."""
        if r is None or r.passed or r.status == ap.UNKNOWN:
            return
        self.audit.record("appraise_metadata", ns=ns.path, path=f.path, pid=subject.pid,
                          uid=subject.uid, func=func, result=r.audit_name,
                          status=r.kernel_name, cause=r.cause, detail=r.detail,
                          mode=ns.evm.mode)

    # ------------------------------------------------------------------ changes
    def inode_change(self, actor, f, change: Change, apply, *, pid: int, uid: int,
                     new_file: bool = False):
        """A change of ``f``'s metadata by process ``pid`` (fsuid ``uid``) of namespace
        ``actor``: each concerned namespace checks it first (evm_inode_setattr,
        evm_protect_xattr: EPERM in enforce mode, an audit record in log mode), then
        ``apply()`` makes it, then the HMACs are brought up to date
        (evm_inode_post_*). Returns what ``apply()`` returned. ``new_file``: the
        file was created through the mount and is not closed yet (IMA_NEW_FILE)."""
        if not stat.S_ISREG(f.st.st_mode) or not self.active():
            return apply()
        name = change.name
        if name == evm.XATTR_NAME_EVM:
            self._check_evm_write(actor, change.value, uid)
        private = name is not None and self.xattrs.stored_name(actor, name.encode()) is not None
        checkers = [actor] if private else actor.chain()
        checkers = [ns for ns in checkers if ns.evm.on]
        refreshed = [] if name == evm.XATTR_NAME_EVM else [
            ns for ns in ([actor] if private else [actor] + self._descendants(actor))
            if ns.evm.on and ns.evm.hmac_key is not None]
        touches = change.attrs or (name is not None and (
            name == evm.XATTR_NAME_EVM or name in POSIX_ACLS
            or actor.evm.config.is_protected(name)))
        # a write or truncate by another user drops set-id bits (the kernel's
        # ATTR_KILL_S*ID, made ATTR_MODE): no check, but the HMACs follow
        implicit = name is None and bool(f.st.st_mode & (stat.S_ISUID | stat.S_ISGID))
        if not (touches or implicit):
            return apply()
        before = {}
        for ns in (checkers if touches else []) + refreshed:
            if ns.id not in before:
                before[ns.id] = self.check(ns, f)
        if touches:
            for ns in checkers:
                self._protect(ns, f, change, before[ns.id], pid, uid, new_file)
        result = apply()
        if refreshed:
            st = os.fstat(f.fd)
            if touches or (st.st_mode, st.st_uid, st.st_gid) != (
                    f.st.st_mode, f.st.st_uid, f.st.st_gid):
                for ns in refreshed:
                    if before[ns.id].status in _PASSED:
                        self._update(ns, f, st, f"after {change.describe()}")
        return result

    def _descendants(self, ns) -> list:
        return [n for n in list(self.tree.by_id.values())
                if n is not ns and ns in n.chain()]

    def _check_evm_write(self, actor, value: bytes | None, uid: int) -> None:
        """evm_inode_setxattr() / evm_inode_removexattr() of security.evm, in the
        writer's namespace with EVM on: an empty value is EINVAL, an HMAC is EPERM
        (only the kernel -- here the daemon -- computes HMACs), a writer but root is
        EPERM (CAP_SYS_ADMIN), and (imafs) a malformed signature EINVAL."""
        if not actor.evm.on or actor.evm.flags & EVM_ALLOW_METADATA_WRITES:
            return
        if value is not None:
            if not value:
                raise AccessDenied(errno.EINVAL, "empty security.evm value")
            if value[0] not in (evm.EVM_IMA_XATTR_DIGSIG, evm.EVM_XATTR_PORTABLE_DIGSIG):
                raise AccessDenied(errno.EPERM, f"security.evm of type 0x{value[0]:02x}: "
                                                f"only signatures (0x03, 0x05) may be "
                                                f"written; the daemon computes HMACs")
        if uid != 0:
            raise AccessDenied(errno.EPERM, "security.evm is root's to write")
        if value is not None:
            try:
                evm.parse_evm_xattr(value)
            except evm.EvmXattrError as e:
                raise AccessDenied(errno.EINVAL, str(e)) from None

    def _protect(self, ns, f, change: Change, r: evm.EvmResult, pid: int, uid: int,
                 new_file: bool) -> None:
        """The kernel's rules, in namespace ``ns`` whose current status is ``r``."""
        e = ns.evm
        if e.flags & EVM_ALLOW_METADATA_WRITES:
            return
        status, name = r.status, change.name
        op = "appraise_metadata"
        lenient = (status == ap.FAIL_IMMUTABLE
                   or (e.hmac_disabled and status in (ap.NOLABEL, ap.UNKNOWN)))
        if name is None:                                    # evm_inode_setattr
            ok = (status in (ap.PASS, ap.NOXATTRS) or lenient
                  or (status == ap.PASS_IMMUTABLE and not self._attr_change(f, change)))
        elif name == evm.XATTR_NAME_EVM or e.config.is_protected(name):
            if status == ap.NOXATTRS:
                if e.hmac_disabled or new_file or f.fs.magic in _NO_UPDATE_MAGICS:
                    return
                op = "update_metadata"
            ok = (status == ap.PASS or lenient
                  or (status == ap.PASS_IMMUTABLE and not self._xattr_change(ns, f, change)))
        else:                                               # a POSIX ACL (the mode)
            ok = (status in (ap.PASS, ap.NOXATTRS) or lenient
                  or (status == ap.PASS_IMMUTABLE and not self._xattr_change(ns, f, change)))
        if not ok:
            self._refuse(ns, f, change, r, pid, uid, op, str(r))

    def _refuse(self, ns, f, change, r, pid, uid, op, why):
        mode = ns.evm.mode
        self.audit.record(op, ns=ns.path, path=f.path, pid=pid, uid=uid,
                          change=change.describe(), result=r.audit_name, status=r.kernel_name,
                          cause=r.cause, detail=r.detail, mode=mode, error="EPERM")
        msg = (f"{os.fsdecode(f.path)}: {change.describe()} refused by EVM in namespace "
               f"{ns.path}: {why}")
        if mode == "enforce":
            log.warning("%s", msg)
            raise AccessDenied(errno.EPERM, msg)
        log.info("%s (allowed: EVM logs only)", msg)

    @staticmethod
    def _attr_change(f, change: Change) -> bool:
        """evm_attr_change(): the owner, group or mode really changes."""
        st = f.st
        return ((change.uid is not None and change.uid != st.st_uid)
                or (change.gid is not None and change.gid != st.st_gid)
                or (change.mode is not None
                    and stat.S_IMODE(change.mode) != stat.S_IMODE(st.st_mode)))

    def _xattr_change(self, ns, f, change: Change) -> bool:
        """evm_xattr_change(): the value differs from the one ``ns`` sees now (an
        ACL's effect on the mode is not worked out: any new ACL value is a change)."""
        return self.xattrs.value(ns, change.name, f.getxattr) != change.value

    def _update(self, ns, f, st: os.stat_result, why: str) -> None:
        """evm_update_evmxattr() in ``ns``: its HMAC over the file as it is now, or its
        ``security.evm`` removed when nothing protected is left. Signatures stay."""
        cur = self.xattrs.value(ns, evm.XATTR_NAME_EVM, f.getxattr)
        own = ns.evm_xattr_name
        if cur and cur[0] in (evm.EVM_IMA_XATTR_DIGSIG, evm.EVM_XATTR_PORTABLE_DIGSIG):
            log.info("%s: %s of namespace %s is a signature: not rewritten (the change "
                     "leaves it failing)", os.fsdecode(f.path), own, ns.path)
            return
        try:
            value = evm.evm_update_evmxattr(cur, self.metadata(ns, f, st), ns.evm.hmac_key,
                                            ns.evm.config)
        except evm.EvmError as e:
            log.warning("%s: cannot compute the HMAC of namespace %s: %s",
                        os.fsdecode(f.path), ns.path, e)
            return
        try:
            if value is None:
                if f.getxattr(own) is not None:
                    f.removexattr(own)
            elif value != f.getxattr(own):
                f.setxattr(own, value)
        except OSError as e:
            log.warning("%s: cannot update %s (namespace %s): %s", os.fsdecode(f.path),
                        own, ns.path, e)
            return
        log.debug("%s: %s of namespace %s updated %s", os.fsdecode(f.path), own, ns.path,
                  why)

    def ima_written(self, ns, f) -> None:
        """The engine wrote ``ns``'s own ``security.ima`` (fix mode, the last writer's
        close): evm_inode_post_setxattr without a check, as the kernel's
        __vfs_setxattr_noperm -- ``ns``'s HMAC follows."""
        if ns.evm.on and ns.evm.hmac_key is not None:
            self._update(ns, f, os.fstat(f.fd), f"after the daemon wrote {ns.xattr_name}")


def load_key(path: str, *, backing: str | None = None,
             fingerprint: str | None = None) -> evm.HmacKey:
    """An HMAC key from a host file (evm.HmacKey.from_file: a regular root-owned file of
    mode 600, 32 to 128 raw bytes). Refused too (HmacKeyError): a file inside the
    ``backing`` tree (readable through the mount: its mode and owner could change
    there), and -- ``fingerprint`` given, a key reloaded for a stored namespace -- a
    key that is not the one the namespace was made with."""
    real = os.path.realpath(path)
    if backing is not None:
        top = os.path.realpath(backing)
        if real == top or real.startswith(top.rstrip("/") + "/"):
            raise evm.HmacKeyError(f"{path}: the EVM HMAC key lies inside the backing "
                                   f"tree {backing}; keep it outside the mount")
    key = evm.HmacKey.from_file(path)
    if fingerprint is not None and key.fingerprint.hex() != fingerprint:
        raise evm.HmacKeyError(f"{path}: not the EVM HMAC key this namespace was made "
                               f"with (its contents changed)")
    return key
