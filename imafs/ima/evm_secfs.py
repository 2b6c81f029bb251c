"""The securityfs ``evm`` file (the kernel's evm_secfs.c): its flags -- what reading
it shows and what a write may change (pure) -- and :class:`EvmFile`, the control
file's session (``MNT/.imafs/evm``; ima/securityfs.py's table checks the writer's
privilege, as for ``policy``). Each namespace keeps its flags in its EVM state
(ima/evm_hooks.py)."""
from __future__ import annotations

import errno
import re

from imafs.ima.evm import EvmError
from imafs.ima.securityfs_read import SecurityfsError, Session, log, quote

EVM_INIT_HMAC = 0x0001
EVM_INIT_X509 = 0x0002
EVM_ALLOW_METADATA_WRITES = 0x0004
EVM_SETUP_COMPLETE = 0x80000000
EVM_KEY_MASK = EVM_INIT_HMAC | EVM_INIT_X509
EVM_INIT_MASK = EVM_INIT_HMAC | EVM_INIT_X509 | EVM_SETUP_COMPLETE | EVM_ALLOW_METADATA_WRITES


def state_text(flags: int) -> str:
    """What reading ``evm`` gives: ``"%d"`` of the flags without SETUP_COMPLETE, no
    newline (as evm_read_key)."""
    return "%d" % (flags & ~EVM_SETUP_COMPLETE & 0xFFFFFFFF)


class EvmStateError(EvmError):
    """A write to ``evm`` refused; ``errno`` is the kernel's answer."""

    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


# kstrtouint(s, 0): an optional "+", 0x-hex, 0-octal or decimal, one trailing newline
_KSTRTOUINT = re.compile(r"\+?(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))\n?")


def state_write(flags: int, text: bytes | str, *, hmac_key_available: bool) -> int:
    """The flags after writing ``text`` to ``evm`` (evm_write_key, the caller having
    checked the writer's privilege): an unsigned integer in C's base-0 notation
    (``0x..``, ``0..`` octal, decimal; one trailing newline allowed); EPERM once setup
    is complete, EINVAL for 0 or unknown bits, EPERM for ALLOW_METADATA_WRITES once an
    HMAC key is loaded; the HMAC bit needs a key (ENOENT without one, the kernel's
    answer when there is no ``evm-key``) and completes the setup."""
    if flags & EVM_SETUP_COMPLETE:
        raise EvmStateError(errno.EPERM, "EVM setup is complete; evm is read-only")
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("ascii", "replace")
    m = _KSTRTOUINT.fullmatch(text)
    if m is None:
        raise EvmStateError(errno.EINVAL, f"not an unsigned integer: {text!r}")
    hexa, octal, dec = m.groups()
    i = int(hexa, 16) if hexa else int(octal, 8) if octal else int(dec, 10)
    if i > 0xFFFFFFFF:
        raise EvmStateError(errno.ERANGE, f"{i} does not fit in 32 bits")
    if not i or i & ~EVM_INIT_MASK:
        raise EvmStateError(errno.EINVAL, f"invalid EVM flags 0x{i:x} (allowed bits "
                                          f"0x{EVM_INIT_MASK:x}, not 0)")
    if i & EVM_ALLOW_METADATA_WRITES and flags & EVM_INIT_HMAC:
        raise EvmStateError(errno.EPERM, "metadata writes cannot be allowed once an HMAC "
                                         "key is loaded")
    if i & EVM_INIT_HMAC:
        if not hmac_key_available:
            raise EvmStateError(errno.ENOENT, "no EVM HMAC key is configured")
        i |= EVM_SETUP_COMPLETE
    flags |= i
    if flags & EVM_INIT_HMAC:
        flags &= ~EVM_ALLOW_METADATA_WRITES
    return flags


class EvmFile(Session):
    """``evm``: the namespace's EVM flags (:func:`state_text`); a write is taken at
    once, as the kernel's evm_write_key (:func:`state_write`): ENOENT to ask for the
    HMAC without a key, EPERM once setup is complete or while EVM is off in the
    namespace, EINVAL for anything but the flags. A child's flags are kept with it."""

    MAX_WRITE = 32

    @classmethod
    def contents(cls, fs, node, ns, uid: int) -> bytes:
        return state_text(ns.evm.flags).encode()

    def write(self, buf: bytes) -> int:
        ns, eng = self.ns, self.fs.engine
        try:
            if len(buf) > self.MAX_WRITE:
                raise EvmStateError(errno.EINVAL, f"over {self.MAX_WRITE} bytes written")
            before = ns.evm.flags
            flags = ns.evm.write(buf)
            if ns.parent is not None and flags != before:
                eng.tree.save_policy(ns)        # the namespace's record holds its flags
        except EvmStateError as e:
            log.warning("evm write %s to namespace %s refused (pid %d): %s", quote(buf),
                        ns.path, self.pid, e)
            eng.audit.record("evm_rejected", ns=ns.path, pid=self.pid, uid=self.uid,
                             error=str(e))
            raise SecurityfsError(e.errno, str(e)) from None
        except Exception as e:  # noqa: BLE001 - lmdb.Error: not stored (in force now)
            log.error("namespace %s: EVM flags 0x%x cannot be stored: %s", ns.path,
                      ns.evm.flags, e)
            raise SecurityfsError(errno.EIO, f"cannot store the EVM flags: {e}") from None
        eng.audit.record("evm_update", ns=ns.path, pid=self.pid, uid=self.uid,
                         flags=state_text(flags))
        log.info("namespace %s: EVM flags 0x%x (pid %d)", ns.path, flags, self.pid)
        return len(buf)
