"""The fields of IMA template records, as the kernel's ``ima_template_lib.c``.

Each field a template names (``d``, ``n``, ``d-ng``, ``d-ngv2``, ``n-ng``, ``sig``,
``buf``, ``ns``, ...): its encoder (the kernel's ``ima_*_init`` functions), how an
ascii list shows it (``ima_show_template_*``) and the parse of that text back into
the field's bytes, with ``TemplateError`` for a malformed field.  Whole entries, the
template descriptors and the lists are in ``templates``.

Choices:

* Multi-byte integers are little-endian, as the kernel writes them with
  ``ima_canonical_fmt`` (and as it writes them natively on x86).
* Names (``n``, ``n-ng``) are recorded as the kernel records them: every space
  becomes ``_`` before hashing; nothing else is escaped.  The kernel prints a
  name with ``%s`` and no escaping, so a name holding a newline would yield an
  ascii line that cannot be split back: there the ascii views print the newline
  as ``\\012`` and every backslash as ``\\134`` -- and so they do for a name that
  holds the text ``\\012`` or ``\\134`` itself, so that a printed escape is always
  one: the parser undoes them wherever they appear, template hash or not (a
  violation has none).  Every other name, backslashes included (systemd's
  ``\\x2d``), prints as the kernel prints it.  The binary record is always exact.
* ``ns`` (our field, template ``ima-ns`` = ``d-ng|n-ng|ns``) is the namespace id
  as a little-endian u32, printed in decimal: the kernel's own uint fields
  (``iuid``, ``igid``) use the same encoding.
"""
from __future__ import annotations

import os
import re

from imafs.ima.hashing import kernel_algo

__all__ = [
    "TemplateError", "FIELD_KINDS", "IMA_EVENT_NAME_LEN_MAX", "IMA_DIGEST_SIZE",
    "hash_size", "new_hash",
    "encode_d", "encode_n", "encode_d_ng", "encode_d_ngv2", "encode_n_ng",
    "encode_sig", "encode_buf", "encode_ns", "encode_uint",
    "show_ascii", "parse_ascii_field", "escape_newline", "unescape_newline",
]

IMA_EVENT_NAME_LEN_MAX = 255          # the `ima` template's name limit
IMA_DIGEST_SIZE = 20                  # the `d` field: sha1 or zero-padded md5

DIGEST_TYPES = ("ima", "verity")

# How each field is shown in the ascii list (the kernel's data_formats).
DIGEST, DIGEST_ALGO, DIGEST_TYPE_ALGO, STRING, HEX, UINT = range(6)
FIELD_KINDS = {
    "d": DIGEST, "n": STRING, "d-ng": DIGEST_ALGO, "d-ngv2": DIGEST_TYPE_ALGO,
    "n-ng": STRING, "sig": HEX, "buf": HEX, "d-modsig": DIGEST_ALGO, "modsig": HEX,
    "evmsig": HEX, "xattrnames": STRING, "xattrlengths": HEX, "xattrvalues": HEX,
    "iuid": UINT, "igid": UINT, "imode": UINT, "ns": UINT,
}
_UINT_SIZES = {"iuid": 4, "igid": 4, "imode": 2, "ns": 4}

EVM_IMA_XATTR_DIGSIG = 0x03
EVM_XATTR_PORTABLE_DIGSIG = 0x05
IMA_VERITY_DIGSIG = 0x06

_HEX_RE = re.compile(rb"(?:[0-9a-fA-F]{2})*")


class TemplateError(ValueError):
    """A malformed template entry.  ``entry`` is the 0-based number of the entry
    in its list (None for a lone entry), ``offset`` the byte offset in the input
    where the problem was found (None when unknown)."""

    def __init__(self, msg: str, *, entry: int | None = None, offset: int | None = None):
        self.msg = msg
        self.entry = entry
        self.offset = offset
        super().__init__(str(self))

    def __str__(self) -> str:
        where = []
        if self.entry is not None:
            where.append(f"entry {self.entry}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return f"{', '.join(where)}: {self.msg}" if where else self.msg

    def at(self, entry: int | None, offset: int | None) -> "TemplateError":
        return TemplateError(self.msg, entry=self.entry if entry is None else entry,
                             offset=self.offset if offset is None else offset)


# -- hashes -------------------------------------------------------------------

# Names in lists (``d-ng`` fields, PCR banks) are the kernel's own: looked up exactly, in
# imafs.ima.hashing's table; HashAlgoError (a ValueError) for any other name.

def hash_size(algo: str) -> int:
    """Digest size of a kernel hash algorithm name."""
    return kernel_algo(algo).digest_size


def new_hash(algo: str):
    """A hashlib object for a kernel hash algorithm name (ValueError if unknown or
    not computable here)."""
    return kernel_algo(algo).new()


# -- field encoders (the kernel's *_init functions) ---------------------------

def _name_bytes(name: str | bytes) -> bytes:
    b = os.fsencode(name)
    if b"\0" in b:
        raise ValueError("a name cannot contain NUL")
    return b


def _record_string(b: bytes) -> bytes:
    # ima_write_template_field_data(DATA_FMT_STRING): spaces become '_', NUL added.
    return b.replace(b" ", b"_") + b"\0"


def encode_d(digest: bytes | None) -> bytes:
    """``d``: a 20-byte digest (sha1, or md5 padded with zeros); None = violation."""
    if digest is None:
        return bytes(IMA_DIGEST_SIZE)
    if len(digest) not in (16, 20):
        raise ValueError("the d field holds a sha1 or md5 digest")
    return digest.ljust(IMA_DIGEST_SIZE, b"\0")


def encode_n(name: str | bytes) -> bytes:
    """``n``: name (basename when the path exceeds 255 bytes, then cut to 255) + NUL."""
    b = _name_bytes(name)
    if len(b) > IMA_EVENT_NAME_LEN_MAX:
        b = os.path.basename(b.rstrip(b"/")) or b
        b = b[:IMA_EVENT_NAME_LEN_MAX]
    return _record_string(b)


def encode_n_ng(name: str | bytes) -> bytes:
    """``n-ng``: the whole name + NUL (spaces replaced by underscores)."""
    return _record_string(_name_bytes(name))


def encode_d_ng(algo: str, digest: bytes | None) -> bytes:
    """``d-ng``: ``"<algo>:" NUL digest`` (every algorithm, sha1 included, as
    kernels since 4.x write it).  ``digest=None`` records a violation: zeros of
    the algorithm's size."""
    size = hash_size(algo)
    if digest is None:
        digest = bytes(size)
    elif len(digest) != size:
        raise ValueError(f"{algo} digest must be {size} bytes, got {len(digest)}")
    return algo.encode() + b":\0" + digest


def encode_d_ngv2(digest_type: str, algo: str, digest: bytes | None) -> bytes:
    """``d-ngv2``: ``"<ima|verity>:<algo>:" NUL digest``."""
    if digest_type not in DIGEST_TYPES:
        raise ValueError(f"digest type must be one of {DIGEST_TYPES}")
    return digest_type.encode() + b":" + encode_d_ng(algo, digest)


def encode_sig(xattr: bytes | None, evm_xattr: bytes | None = None) -> bytes:
    """``sig``: the whole ``security.ima`` value when it is a signature (type 0x03
    or 0x06); else an EVM portable signature (``security.evm`` type 0x05) if one
    is given; else empty."""
    if xattr and xattr[0] in (EVM_IMA_XATTR_DIGSIG, IMA_VERITY_DIGSIG):
        return bytes(xattr)
    if evm_xattr and evm_xattr[0] == EVM_XATTR_PORTABLE_DIGSIG:
        return bytes(evm_xattr)
    return b""


def encode_buf(buf: bytes | None) -> bytes:
    """``buf``: the measured buffer itself (empty when there is none)."""
    return bytes(buf or b"")


def encode_uint(value: int, size: int) -> bytes:
    return int(value).to_bytes(size, "little")


def encode_ns(ns_id: int) -> bytes:
    """``ns`` (imafs): the namespace id, little-endian u32."""
    if not 0 <= ns_id < 1 << 32:
        raise ValueError("namespace id must fit in a u32")
    return encode_uint(ns_id, 4)


# -- the ascii view of a field (ima_show_template_*) and its parse ----------

def show_ascii(fid: str, data: bytes) -> bytes:
    kind = FIELD_KINDS[fid]
    if kind == DIGEST or kind == HEX:
        return data.hex().encode()
    if kind == STRING:
        return escape_newline(data.split(b"\0", 1)[0])
    if kind == DIGEST_ALGO:
        colon = data.find(b":")
        if colon < 0 or data[colon + 1:colon + 2] != b"\0":
            raise TemplateError(f"malformed {fid} field (no \"algo:\" NUL prefix)")
        # The kernel prints the "algo:" prefix only when it is not bare ":".
        return (data[:colon + 1] if colon else b"") + data[colon + 2:].hex().encode()
    if kind == DIGEST_TYPE_ALGO:
        nul = data.find(b"\0")
        if nul < 1 or data.rfind(b":", 0, nul) != nul - 1:
            raise TemplateError(f"malformed {fid} field (no \"type:algo:\" NUL prefix)")
        return data[:nul] + data[nul + 1:].hex().encode()
    # UINT: sizes the kernel prints; other sizes print nothing.
    if len(data) in (1, 2, 4, 8):
        return b"%d" % int.from_bytes(data, "little")
    return b""


def _hex(tok: bytes, fid: str) -> bytes:
    if not _HEX_RE.fullmatch(tok):
        raise TemplateError(f"{fid}: not hex")
    return bytes.fromhex(tok.decode("ascii"))


def parse_ascii_field(fid: str, tok: bytes) -> bytes:
    kind = FIELD_KINDS[fid]
    if kind == STRING:
        if fid == "xattrnames" and not tok:
            return b""
        return tok + b"\0"
    if not tok:
        return b""
    if kind == DIGEST:
        d = _hex(tok, fid)
        if len(d) != IMA_DIGEST_SIZE:
            raise TemplateError(f"{fid}: digest must be 20 bytes")
        return d
    if kind == HEX:
        return _hex(tok, fid)
    if kind == DIGEST_ALGO:
        prefix, colon, hx = tok.rpartition(b":")
        if not colon:
            # Old kernels printed no prefix for sha1/md5: data was ":" NUL digest.
            return b":\0" + _hex(tok, fid)
        if b":" in prefix or not prefix:
            raise TemplateError(f"{fid}: malformed algorithm prefix")
        return prefix + b":\0" + _hex(hx, fid)
    if kind == DIGEST_TYPE_ALGO:
        prefix, colon, hx = tok.rpartition(b":")
        dtype, colon2, algo = prefix.partition(b":")
        if not colon or not colon2 or not dtype or not algo or b":" in algo:
            raise TemplateError(f"{fid}: not \"<digest type>:<algo>:<hex>\"")
        return prefix + b":\0" + _hex(hx, fid)
    # UINT
    if not tok.isdigit() or len(tok) > 20:
        raise TemplateError(f"{fid}: not a decimal number")
    size = _UINT_SIZES.get(fid, 4)
    value = int(tok)
    if value >= 1 << (8 * size):
        raise TemplateError(f"{fid}: value out of range")
    return encode_uint(value, size)


_ESCAPED = re.compile(rb"\\(012|134)")


def escape_newline(s: bytes) -> bytes:
    """A name as an ascii line shows it: as the kernel prints it (``%s``), except a
    name holding a newline, which would split the line, or the text of an escape:
    there the newline is printed ``\\012`` and a backslash ``\\134`` (the octal
    escapes of /proc/self/mountinfo). Only the ascii views differ; the template data,
    the template hash and the binary list keep the name as recorded."""
    if b"\n" not in s and b"\\012" not in s and b"\\134" not in s:
        return s
    return s.replace(b"\\", b"\\134").replace(b"\n", b"\\012")


def unescape_newline(field_data: bytes) -> bytes:
    return _ESCAPED.sub(lambda m: b"\n" if m.group(1) == b"012" else b"\\", field_data)
