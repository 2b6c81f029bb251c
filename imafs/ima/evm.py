"""EVM: ``security.evm``, the protection of a file's metadata, as the kernel's
security/integrity/evm/ does it (evm_main.c, evm_crypto.c; the securityfs file's
flags, evm_secfs.c, are in evm_secfs.py). One concern in about 640 lines: the value,
the digest it covers and the check, which the kernel also keeps in one place.

``security.ima`` protects a file's content; ``security.evm`` protects the security
xattrs (``security.ima`` among them), the owner and the mode. Its value starts with a
type byte (security/integrity/integrity.h):

====  ==========================  ==============================================
type  kernel name                 layout after the type byte
====  ==========================  ==============================================
0x02  EVM_XATTR_HMAC              HMAC-SHA1 (20 bytes) with the EVM key
0x03  EVM_IMA_XATTR_DIGSIG        signature v2 header + signature over the
                                  metadata digest (inode, generation, fs UUID in)
0x05  EVM_XATTR_PORTABLE_DIGSIG   the same, without inode, generation and UUID
====  ==========================  ==============================================

The metadata digest (``evm_calc_hmac_or_hash``) hashes, with no names and no lengths:

1. the value of each protected xattr the file has, in :data:`PROTECTED_XATTRS` order
   (HMACs and type-3 signatures only the *enabled* ones; portable signatures every
   listed one that exists, as the kernel does);
2. ``struct h_misc {unsigned long ino; u32 generation; uid_t uid; gid_t gid; umode_t
   mode}`` zero-filled, in the target's ABI (x86-64: ``<QIIIH`` + 2 pad bytes = 24
   bytes); portable signatures leave ino and generation 0;
3. the file system's UUID (16 bytes, ``sb->s_uuid``) unless the value is portable or
   the configuration leaves it out (the kernel's EVM_ATTR_FSUUID).

HMACs are HMAC-SHA1 with the key zero-padded to 128 bytes (the kernel's and evmctl's
``evmkey[MAX_KEY_SIZE]``); signatures are the signature v2 of
:func:`imafs.ima.appraise.sign_v2` over the digest in the header's hash algorithm,
checked against a :class:`imafs.ima.keys.Keyring` with the same key ids as IMA.

:func:`evm_verify_hmac` returns the kernel's ``enum integrity_status`` (the strings of
:mod:`imafs.ima.appraise`, so a result feeds ``appraise(evm_status=...)`` as it is)
and a cause for the audit log. Nothing here reads a file: the caller describes it as
its namespace sees it (:class:`FileMetadata`); which values a namespace sees is the
engine's business. Facts checked against Debian's evmctl 1.4: docs/evm.md.
"""
from __future__ import annotations

import hashlib
import hmac as _hmac
import os
import stat
import struct
from dataclasses import dataclass
from typing import Callable, Mapping

from imafs.ima import appraise as ap
from imafs.ima import hashing

# --- types and names (security/integrity/integrity.h, include/uapi/linux/xattr.h) -----
EVM_XATTR_HMAC = ap.EVM_XATTR_HMAC                        # 0x02
EVM_IMA_XATTR_DIGSIG = ap.EVM_IMA_XATTR_DIGSIG            # 0x03
EVM_XATTR_PORTABLE_DIGSIG = ap.EVM_XATTR_PORTABLE_DIGSIG  # 0x05
EVM_TYPES = (EVM_XATTR_HMAC, EVM_IMA_XATTR_DIGSIG, EVM_XATTR_PORTABLE_DIGSIG)

XATTR_NAME_EVM = "security.evm"
XATTR_NAME_IMA = "security.ima"

HMAC_ALGO = "sha1"            # the kernel's evm_hmac "hmac(sha1)"
HMAC_SIZE = 20                # SHA1_DIGEST_SIZE
HMAC_XATTR_SIZE = 1 + HMAC_SIZE   # sizeof(struct evm_xattr)
MAX_KEY_SIZE = 128            # evmkey[MAX_KEY_SIZE]: the HMAC key, zero-padded
MIN_KEY_SIZE = 32             # imafs's floor (the kernel takes any length up to 128)
UUID_SIZE = 16


@dataclass(frozen=True)
class ProtectedXattr:
    name: str
    enabled: bool   # hashed into HMACs and type-3 signatures (portable: always)


# evm_config_default_xattrnames, in the kernel's order. ``enabled`` as a kernel built
# with SELinux, SMACK, AppArmor and IMA appraisal, without
# CONFIG_EVM_EXTRA_SMACK_XATTRS (Debian's; what evmctl hashes without --smack).
PROTECTED_XATTRS: tuple[ProtectedXattr, ...] = (
    ProtectedXattr("security.selinux", True),
    ProtectedXattr("security.SMACK64", True),
    ProtectedXattr("security.SMACK64EXEC", False),
    ProtectedXattr("security.SMACK64TRANSMUTE", False),
    ProtectedXattr("security.SMACK64MMAP", False),
    ProtectedXattr("security.apparmor", True),
    ProtectedXattr(XATTR_NAME_IMA, True),
    ProtectedXattr("security.capability", True),
)
SMACK_EXTRA = ("security.SMACK64EXEC", "security.SMACK64TRANSMUTE", "security.SMACK64MMAP")


@dataclass(frozen=True)
class EvmConfig:
    """What the kernel fixes at build time: the protected xattrs (``xattrs``, in order,
    each enabled or not), whether HMACs and type-3 signatures include the file
    system's UUID (``fsuuid``: EVM_ATTR_FSUUID, on in distribution kernels; off to
    match Debian's evmctl 1.4 ``hmac``), and the ``struct h_misc`` ABI of the target
    (``bits`` 64 or 32 -- evmctl's ``--m64``/``--m32`` -- and its byte order)."""
    xattrs: tuple[ProtectedXattr, ...] = PROTECTED_XATTRS
    fsuuid: bool = True
    bits: int = 64
    byteorder: str = "little"

    def __post_init__(self):
        if self.bits not in (32, 64):
            raise ValueError(f"h_misc word size must be 32 or 64 bits, not {self.bits!r}")
        if self.byteorder not in ("little", "big"):
            raise ValueError(f"byte order must be 'little' or 'big', not {self.byteorder!r}")
        names = [x.name for x in self.xattrs]
        if len(set(names)) != len(names):
            raise ValueError("a protected xattr is listed twice")
        if XATTR_NAME_EVM in names:
            raise ValueError("security.evm cannot protect itself")

    @classmethod
    def with_smack_extras(cls, **kw) -> "EvmConfig":
        """CONFIG_EVM_EXTRA_SMACK_XATTRS (evmctl ``--smack``): the three extra SMACK
        xattrs enabled."""
        xs = tuple(ProtectedXattr(x.name, x.enabled or x.name in SMACK_EXTRA)
                   for x in PROTECTED_XATTRS)
        return cls(xattrs=xs, **kw)

    @property
    def names(self) -> tuple[str, ...]:
        """Every listed name: what a caller reads to describe a file."""
        return tuple(x.name for x in self.xattrs)

    def is_protected(self, name: str) -> bool:
        """evm_protected_xattr(): whether a change of ``name`` touches the HMAC (enabled
        names only; full names, ``security.`` included)."""
        return any(x.enabled and x.name == name for x in self.xattrs)


DEFAULT_CONFIG = EvmConfig()


# --- errors -----------------------------------------------------------------------------


class EvmError(ValueError):
    """A digest, HMAC or signature that cannot be made for this file (no protected
    xattr, a portable signature without security.ima, an unknown file system UUID)."""


class EvmXattrError(EvmError):
    """A malformed ``security.evm`` value; ``offset`` is the byte where it goes wrong."""

    def __init__(self, msg: str, offset: int):
        super().__init__(f"{msg} (at byte {offset})")
        self.msg = msg
        self.offset = offset


# --- parsing ----------------------------------------------------------------------------

_TYPE_WORDS = {EVM_XATTR_HMAC: "HMAC", EVM_IMA_XATTR_DIGSIG: "signature",
               EVM_XATTR_PORTABLE_DIGSIG: "portable signature"}


@dataclass(frozen=True)
class EvmXattr:
    """A parsed ``security.evm`` value. ``digest`` for an HMAC; ``algo``, ``keyid`` and
    ``signature`` for the signature types. ``raw`` is the whole value."""
    type: int
    raw: bytes
    digest: bytes | None = None
    algo: str | None = None
    keyid: int | None = None
    signature: bytes | None = None

    @property
    def type_name(self) -> str:
        return ap.XATTR_TYPE_NAMES[self.type]

    @property
    def portable(self) -> bool:
        return self.type == EVM_XATTR_PORTABLE_DIGSIG

    @property
    def is_signature(self) -> bool:
        return self.type != EVM_XATTR_HMAC

    def describe(self) -> str:
        if self.type == EVM_XATTR_HMAC:
            return f"evm hmac-sha1 {self.digest.hex()}"
        what = "evm portable sigv2" if self.portable else "evm sigv2"
        return (f"{what} {self.algo} keyid {self.keyid:08x} "
                f"({len(self.signature)}-byte signature)")

    __str__ = describe


def parse_evm_xattr(value: bytes) -> EvmXattr:
    """Parse a ``security.evm`` value; every malformed value raises
    :class:`EvmXattrError` with the offset of the first bad byte. Stricter than the
    kernel in one respect: a signature's version must be 2 (the kernel hands version
    1 to the pre-X.509 digsig code and does not look at it otherwise)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"security.evm value must be bytes, not {type(value).__name__}")
    value = bytes(value)
    if not value:
        raise EvmXattrError("empty security.evm value", 0)
    t = value[0]
    if t == EVM_XATTR_HMAC:
        n = len(value) - 1
        if n < HMAC_SIZE:
            raise EvmXattrError(f"type 0x02 (HMAC): HMAC-SHA1 needs {HMAC_SIZE} bytes, "
                                f"only {n} present", len(value))
        if n > HMAC_SIZE:
            raise EvmXattrError(f"type 0x02 (HMAC): {n - HMAC_SIZE} unexpected byte(s) "
                                f"after the {HMAC_SIZE}-byte HMAC-SHA1 (evmctl hmac "
                                f"without -a sha1 writes a longer one)", HMAC_XATTR_SIZE)
        return EvmXattr(t, value, digest=value[1:])
    if t in (EVM_IMA_XATTR_DIGSIG, EVM_XATTR_PORTABLE_DIGSIG):
        # the layout after the type byte is security.ima's sigv2: one parser for both
        try:
            x = ap.parse_ima_xattr(bytes([EVM_IMA_XATTR_DIGSIG]) + value[1:])
        except ap.XattrError as e:
            msg = e.msg
            prefix = "type 0x03 signature: "
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
            raise EvmXattrError(f"type 0x{t:02x} ({_TYPE_WORDS[t]}): {msg}",
                                e.offset) from None
        return EvmXattr(t, value, algo=x.algo, keyid=x.keyid, signature=x.signature)
    if t in (ap.IMA_XATTR_DIGEST, ap.IMA_XATTR_DIGEST_NG, ap.IMA_VERITY_DIGSIG):
        raise EvmXattrError(f"type 0x{t:02x} ({ap.XATTR_TYPE_NAMES[t]}) belongs in "
                            f"security.ima, not security.evm", 0)
    raise EvmXattrError(f"unknown security.evm type 0x{t:02x}", 0)


def describe_evm_xattr(value: bytes | None) -> str:
    """A log-friendly description of any security.evm value (never raises)."""
    return ap.describe_value(value, XATTR_NAME_EVM, parse_evm_xattr, EvmXattrError)


# --- the file, as a namespace sees it -----------------------------------------------------


@dataclass(frozen=True)
class FileMetadata:
    """What EVM covers of one file: ``xattrs`` maps the protected names the file has
    (as its namespace sees them; an empty value counts as present) to their values;
    ``uid``/``gid`` in the initial user namespace, ``mode`` (st_mode, file type bits
    included); ``ino``, ``generation`` (FS_IOC_GETVERSION, 0 where there is none) and
    ``fs_uuid`` (the file system's 16-byte ``s_uuid``, None when unknown) for HMACs and
    type-3 signatures. Names that are not protected are ignored."""
    xattrs: Mapping[str, bytes]
    uid: int
    gid: int
    mode: int
    ino: int = 0
    generation: int = 0
    fs_uuid: bytes | None = None

    def __post_init__(self):
        for what, v, bits in (("uid", self.uid, 32), ("gid", self.gid, 32),
                              ("mode", self.mode, 16), ("ino", self.ino, 64),
                              ("generation", self.generation, 32)):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (1 << bits):
                raise ValueError(f"{what} must be an integer of {bits} bits, not {v!r}")
        if self.fs_uuid is not None:
            u = bytes(self.fs_uuid)
            if len(u) != UUID_SIZE:
                raise ValueError(f"fs_uuid must be {UUID_SIZE} bytes, not {len(u)}")
            object.__setattr__(self, "fs_uuid", u)
        xs = {}
        for k, v in dict(self.xattrs).items():
            if not isinstance(k, str):
                raise TypeError(f"xattr names are str, not {type(k).__name__}")
            xs[k] = bytes(v)
        object.__setattr__(self, "xattrs", xs)

    @classmethod
    def collect(cls, getxattr: Callable[[str], bytes | None], st: os.stat_result, *,
                generation: int = 0, fs_uuid: bytes | None = None,
                config: EvmConfig = DEFAULT_CONFIG) -> "FileMetadata":
        """Describe a file from its stat and a ``getxattr(name) -> bytes | None``
        (None: absent) that gives the values its namespace sees."""
        xs = {}
        for name in config.names:
            v = getxattr(name)
            if v is not None:
                xs[name] = bytes(v)
        return cls(xs, st.st_uid, st.st_gid, st.st_mode, st.st_ino, generation, fs_uuid)


def h_misc(xattr_type: int, meta: FileMetadata, config: EvmConfig = DEFAULT_CONFIG) -> bytes:
    """``struct h_misc`` as hmac_add_misc() hashes it (zeroed, then filled; portable
    signatures leave ino and generation 0), in the configured ABI."""
    portable = xattr_type == EVM_XATTR_PORTABLE_DIGSIG
    ino = 0 if portable else meta.ino
    gen = 0 if portable else meta.generation
    order = "<" if config.byteorder == "little" else ">"
    if config.bits == 64:
        return struct.pack(order + "QIIIH2x", ino, gen, meta.uid, meta.gid, meta.mode)
    if ino >= 1 << 32:
        raise EvmError(f"inode number {ino} does not fit the 32-bit h_misc")
    return struct.pack(order + "IIIIH2x", ino, gen, meta.uid, meta.gid, meta.mode)


def _protected_values(xattr_type: int, meta: FileMetadata, config: EvmConfig) -> list[bytes]:
    """The values hashed, in order; EvmError as the kernel's -ENODATA / -EPERM."""
    portable = xattr_type == EVM_XATTR_PORTABLE_DIGSIG
    out, ima = [], False
    for x in config.xattrs:
        if not (x.enabled or portable):
            continue
        v = meta.xattrs.get(x.name)
        if v is None:
            continue
        out.append(v)
        ima = ima or x.name == XATTR_NAME_IMA
    if not out:
        raise _NoXattrs("the file has none of the protected xattrs ("
                        + ", ".join(x.name for x in config.xattrs
                                    if x.enabled or portable) + ")")
    if portable and not ima:
        raise _PortableWithoutIma("a portable EVM signature must cover security.ima, "
                                  "and the file has none")
    return out


class _NoXattrs(EvmError):
    """-ENODATA: nothing protected to hash (INTEGRITY_NOXATTRS)."""


class _PortableWithoutIma(EvmError):
    """-EPERM: a portable signature without security.ima."""


def _feed(h, xattr_type: int, meta: FileMetadata, config: EvmConfig) -> None:
    for v in _protected_values(xattr_type, meta, config):
        h.update(v)
    h.update(h_misc(xattr_type, meta, config))
    if config.fsuuid and xattr_type != EVM_XATTR_PORTABLE_DIGSIG:
        if meta.fs_uuid is None:
            raise EvmError("the file system's UUID is unknown, and this EVM type "
                           "covers it (give one, or a portable signature)")
        h.update(meta.fs_uuid)


def evm_calc_hash(xattr_type: int, meta: FileMetadata, algo: str = "sha256",
                  config: EvmConfig = DEFAULT_CONFIG) -> bytes:
    """The metadata digest a type 0x03 or 0x05 signature signs, in ``algo``."""
    if xattr_type not in (EVM_IMA_XATTR_DIGSIG, EVM_XATTR_PORTABLE_DIGSIG):
        raise ValueError(f"evm_calc_hash is for signature types 0x03/0x05, not {xattr_type!r}")
    h = hashing.hash_algo(algo).new()
    _feed(h, xattr_type, meta, config)
    return h.digest()


# --- the HMAC key ---------------------------------------------------------------------------


class HmacKeyError(EvmError):
    """An HMAC key (file) imafs refuses; the message says why."""


class HmacKey:
    """A namespace's EVM HMAC key: raw bytes (what the kernel's encrypted ``evm-key``
    decrypts to, and what evmctl reads from ``/etc/keys/evm-key-plain``), 32 to 128
    long, used zero-padded to 128 bytes. Its bytes never appear in ``repr``; its
    ``fingerprint`` (a hash of the key) may go in verdict-cache keys and logs."""

    __slots__ = ("_key", "fingerprint", "source")

    def __init__(self, raw: bytes, source: str = "key"):
        raw = bytes(raw)
        if not MIN_KEY_SIZE <= len(raw) <= MAX_KEY_SIZE:
            raise HmacKeyError(f"{source}: an EVM HMAC key is {MIN_KEY_SIZE} to "
                               f"{MAX_KEY_SIZE} bytes of raw key material, got {len(raw)}")
        self._key = raw.ljust(MAX_KEY_SIZE, b"\0")
        self.fingerprint = hashlib.sha256(b"imafs evm hmac key\0" + self._key).digest()[:16]
        self.source = source

    @classmethod
    def from_file(cls, path: str, *, check_mode: bool = True) -> "HmacKey":
        """Read a key file. Refused: anything but a regular file (symlinks are not
        followed), more than 128 bytes, and -- unless ``check_mode`` is False -- a file
        others may read or write, or owned by someone but root or this process."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise HmacKeyError(f"{path}: cannot open the EVM HMAC key: "
                               f"{e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise HmacKeyError(f"{path}: the EVM HMAC key must be a regular file")
            if check_mode and st.st_mode & 0o077:
                raise HmacKeyError(f"{path}: the EVM HMAC key is accessible to group or "
                                   f"others (mode {stat.S_IMODE(st.st_mode):04o}); "
                                   f"chmod 600 it")
            if check_mode and st.st_uid not in (0, os.geteuid()):
                raise HmacKeyError(f"{path}: the EVM HMAC key belongs to uid {st.st_uid}, "
                                   f"not root")
            data = os.read(fd, MAX_KEY_SIZE + 1)
        except OSError as e:
            raise HmacKeyError(f"{path}: cannot read the EVM HMAC key: "
                               f"{e.strerror or e}") from None
        finally:
            os.close(fd)
        if len(data) > MAX_KEY_SIZE:
            raise HmacKeyError(f"{path}: an EVM HMAC key is at most {MAX_KEY_SIZE} bytes "
                               f"(raw bytes, as /etc/keys/evm-key-plain)")
        return cls(data, source=path)

    def new(self, algo: str = HMAC_ALGO):
        return _hmac.new(self._key, digestmod=hashing.hash_algo(algo).constructor())

    def __repr__(self) -> str:
        return f"HmacKey({self.source!r}, fingerprint={self.fingerprint.hex()})"

    def __eq__(self, other) -> bool:
        return isinstance(other, HmacKey) and _hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(self.fingerprint)


def evm_calc_hmac(key: HmacKey, meta: FileMetadata, config: EvmConfig = DEFAULT_CONFIG,
                  *, algo: str = HMAC_ALGO) -> bytes:
    """The HMAC (20 bytes, HMAC-SHA1) over the file's metadata. ``algo`` other than
    sha1 only reproduces ``evmctl hmac -a ALGO``; the kernel knows sha1 only."""
    h = key.new(algo)
    _feed(h, EVM_XATTR_HMAC, meta, config)
    return h.digest()


def hmac_xattr(key: HmacKey, meta: FileMetadata, config: EvmConfig = DEFAULT_CONFIG) -> bytes:
    """The ``security.evm`` value ``02 <HMAC-SHA1>`` for this metadata."""
    return bytes([EVM_XATTR_HMAC]) + evm_calc_hmac(key, meta, config)


def sign_evm(private_key, keyid: int, meta: FileMetadata, *, algo: str = "sha256",
             portable: bool = True, config: EvmConfig = DEFAULT_CONFIG) -> bytes:
    """The ``security.evm`` value ``05 02 ...`` (portable) or ``03 02 ...`` signing the
    metadata digest in ``algo``, as ``evmctl sign [--portable]`` writes it. A portable
    signature needs ``security.ima`` in ``meta`` (write that first); a type-3 one
    needs ``ino``, ``generation`` and (with ``config.fsuuid``) ``fs_uuid``."""
    t = EVM_XATTR_PORTABLE_DIGSIG if portable else EVM_IMA_XATTR_DIGSIG
    digest = evm_calc_hash(t, meta, algo, config)
    value = ap.sign_v2(private_key, algo, digest, keyid)
    return bytes([t]) + value[1:]


# --- verification --------------------------------------------------------------------------

# enum integrity_status: the strings of appraise.py, so that results feed appraise()
INTEGRITY_PASS = ap.PASS
INTEGRITY_PASS_IMMUTABLE = ap.PASS_IMMUTABLE
INTEGRITY_FAIL = ap.FAIL
INTEGRITY_FAIL_IMMUTABLE = ap.FAIL_IMMUTABLE
INTEGRITY_NOLABEL = ap.NOLABEL
INTEGRITY_NOXATTRS = ap.NOXATTRS
INTEGRITY_UNKNOWN = ap.UNKNOWN
# evm_main.c integrity_status_msg[]: what the kernel's audit records print
_AUDIT_NAMES = {ap.PASS: "pass", ap.PASS_IMMUTABLE: "pass_immutable", ap.FAIL: "fail",
                ap.FAIL_IMMUTABLE: "fail_immutable", ap.NOLABEL: "no_label",
                ap.NOXATTRS: "no_xattrs", ap.UNKNOWN: "unknown"}

# causes of a result that is not a pass (imafs's names; the kernel audits the status)
CAUSES = (
    "missing-evm",               # NOLABEL: protected xattrs, no security.evm
    "no-protected-xattrs",       # NOXATTRS: nothing EVM protects
    "empty-evm",                 # FAIL: a security.evm of 0 bytes
    "unknown-evm-type",          # FAIL: a type EVM does not know
    "malformed-evm",             # FAIL(_IMMUTABLE): bad length, header, version
    "no-HMAC-key",               # FAIL: an HMAC, and no HMAC key to check it
    "invalid-HMAC",              # FAIL: the HMAC does not match
    "invalid-signature",         # FAIL(_IMMUTABLE): no such key, or it does not verify
    "portable-without-ima",      # FAIL_IMMUTABLE: a portable signature needs security.ima
    "unavailable-hash-algorithm",  # FAIL(_IMMUTABLE): hash algorithm unknown here
    "unknown-fs-uuid",           # FAIL: the value covers a UUID the caller does not know
    "evm-not-initialized",       # UNKNOWN: no HMAC key and no keyring
)


@dataclass(frozen=True)
class EvmResult:
    """``status``: an ``enum integrity_status`` (lower-case, as appraise.py's);
    ``cause``: one of :data:`CAUSES` (None on pass); ``type``: the security.evm type
    that was checked; ``detail``: a human explanation for logs and ``query``."""
    status: str
    cause: str | None
    type: int | None = None
    algo: str | None = None
    keyid: int | None = None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status in (ap.PASS, ap.PASS_IMMUTABLE)

    @property
    def kernel_name(self) -> str:
        """``INTEGRITY_PASS``, ``INTEGRITY_NOLABEL``, ... as include/linux/integrity.h."""
        return "INTEGRITY_" + self.status.upper()

    @property
    def audit_name(self) -> str:
        """The kernel's audit string: ``pass``, ``no_label``, ``fail_immutable``, ..."""
        return _AUDIT_NAMES[self.status]

    def __str__(self) -> str:
        s = self.kernel_name if self.passed else f"{self.kernel_name} ({self.cause})"
        return f"{s}: {self.detail}" if self.detail else s


def evm_find_protected_xattrs(meta: FileMetadata, config: EvmConfig = DEFAULT_CONFIG) -> int:
    """How many listed protected xattrs the file has (enabled or not, as the kernel
    counts them to tell NOLABEL from NOXATTRS)."""
    return sum(1 for n in config.names if n in meta.xattrs)


def evm_verify_hmac(value: bytes | None, meta: FileMetadata, *, hmac_key: HmacKey | None,
                    keyring, config: EvmConfig = DEFAULT_CONFIG) -> EvmResult:
    """Check ``security.evm`` (``value``, None when absent) against the file's metadata,
    in the order of the kernel's evm_verify_hmac(): absent (NOLABEL or NOXATTRS),
    empty (FAIL), HMAC (exactly 21 bytes; FAIL without a key), signatures (more than
    the 9-byte header; the digest first -- NOXATTRS wins over a bad signature -- then
    the signature against ``keyring``, an object with ``lookup(keyid)`` like
    keys.Keyring). Portable signatures give PASS_IMMUTABLE / FAIL_IMMUTABLE. With
    neither an HMAC key nor a keyring EVM is not initialized: UNKNOWN. Never raises
    for anything about the value or the metadata."""
    if hmac_key is None and keyring is None:
        return EvmResult(ap.UNKNOWN, "evm-not-initialized", None,
                         detail="no EVM HMAC key and no keyring")
    if value is None:
        n = evm_find_protected_xattrs(meta, config)
        if n:
            return EvmResult(ap.NOLABEL, "missing-evm", None,
                             detail=f"no security.evm, {n} protected xattr(s) present")
        return EvmResult(ap.NOXATTRS, "no-protected-xattrs", None,
                         detail="no security.evm and no protected xattr")
    value = bytes(value)
    if not value:
        return EvmResult(ap.FAIL, "empty-evm", None, detail="security.evm is empty")
    t = value[0]
    if t == EVM_XATTR_HMAC:
        return _verify_hmac(value, meta, hmac_key, config)
    if t in (EVM_IMA_XATTR_DIGSIG, EVM_XATTR_PORTABLE_DIGSIG):
        return _verify_sig(value, meta, keyring, config)
    return EvmResult(ap.FAIL, "unknown-evm-type", t, detail=describe_evm_xattr(value))


def _verify_hmac(value, meta, key, config) -> EvmResult:
    t = EVM_XATTR_HMAC
    if len(value) != HMAC_XATTR_SIZE:
        return EvmResult(ap.FAIL, "malformed-evm", t, detail=describe_evm_xattr(value))
    if key is None:
        return EvmResult(ap.FAIL, "no-HMAC-key", t,
                         detail="security.evm holds an HMAC; this namespace has no HMAC key")
    try:
        calc = evm_calc_hmac(key, meta, config)
    except _NoXattrs as e:
        return EvmResult(ap.NOXATTRS, "no-protected-xattrs", t, detail=str(e))
    except EvmError as e:
        return EvmResult(ap.FAIL, "unknown-fs-uuid", t, detail=str(e))
    if not _hmac.compare_digest(calc, value[1:]):
        return EvmResult(ap.FAIL, "invalid-HMAC", t, HMAC_ALGO,
                         detail="the HMAC does not match the file's metadata")
    return EvmResult(ap.PASS, None, t, HMAC_ALGO, detail="HMAC matches")


def _verify_sig(value, meta, keyring, config) -> EvmResult:
    t = value[0]
    portable = t == EVM_XATTR_PORTABLE_DIGSIG
    fail = ap.FAIL_IMMUTABLE if portable else ap.FAIL
    if len(value) <= ap.SIG_HDR_SIZE:
        # the kernel answers FAIL here, even for a portable value
        return EvmResult(ap.FAIL, "malformed-evm", t, detail=describe_evm_xattr(value))
    keyid = struct.unpack_from(">I", value, 3)[0]
    try:
        algo = hashing.hash_algo(value[2])
        digest = evm_calc_hash(t, meta, algo.name, config)
    except _NoXattrs as e:
        return EvmResult(ap.NOXATTRS, "no-protected-xattrs", t, keyid=keyid, detail=str(e))
    except _PortableWithoutIma as e:
        return EvmResult(fail, "portable-without-ima", t, keyid=keyid, detail=str(e))
    except hashing.HashAlgoError as e:
        return EvmResult(fail, "unavailable-hash-algorithm", t, keyid=keyid, detail=str(e))
    except EvmError as e:
        return EvmResult(fail, "unknown-fs-uuid", t, keyid=keyid, detail=str(e))
    try:
        x = parse_evm_xattr(value)
    except EvmXattrError as e:
        return EvmResult(fail, "malformed-evm", t, algo.name, keyid, str(e))
    ok, why = _check_signature(keyring, x, digest)
    if not ok:
        return EvmResult(fail, "invalid-signature", t, x.algo, x.keyid, why)
    return EvmResult(ap.PASS_IMMUTABLE if portable else ap.PASS, None, t, x.algo, x.keyid, why)


def _check_signature(keyring, x: EvmXattr, digest: bytes) -> tuple[bool, str]:
    keys = list(keyring.lookup(x.keyid)) if keyring is not None else []
    if not keys:
        return False, f"no key with id {x.keyid:08x} in the keyring"
    memo = getattr(keyring, "verified", None)      # keys.VerifiedSignatures
    reasons = []
    for k in keys:
        if memo is not None and memo.known(k.fingerprint, x.algo, digest, x.signature):
            return True, f"signed by key {x.keyid:08x} ({k.subject})"
        why = ap.verify_signature(k.public_key, x.algo, digest, x.signature)
        if why is None:
            if memo is not None:
                memo.add(k.fingerprint, x.algo, digest, x.signature)
            return True, f"signed by key {x.keyid:08x} ({k.subject})"
        reasons.append(why)
    if len(keys) == 1:
        return False, f"key {x.keyid:08x}: {reasons[0]}"
    return False, f"none of the {len(keys)} keys with id {x.keyid:08x} verifies it"


# --- updates -------------------------------------------------------------------------------


class EvmImmutableError(EvmError):
    """The kernel's -EPERM of evm_update_evmxattr(): a portable signature is never
    replaced by an HMAC."""


def evm_update_evmxattr(current: bytes | None, meta: FileMetadata, key: HmacKey,
                        config: EvmConfig = DEFAULT_CONFIG) -> bytes | None:
    """After a permitted change of protected metadata (``meta`` is the file after the
    change): the new ``security.evm`` (an HMAC), or None when nothing protected is
    left (the kernel then removes security.evm). EvmImmutableError when ``current``
    is a portable signature; EvmError when the file system's UUID is needed and unknown."""
    if current and current[0] == EVM_XATTR_PORTABLE_DIGSIG:
        raise EvmImmutableError("security.evm is a portable signature; it is never "
                                "replaced by an HMAC")
    try:
        return hmac_xattr(key, meta, config)
    except _NoXattrs:
        return None
