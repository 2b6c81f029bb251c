"""IMA template records, byte-compatible with the Linux kernel.

A measurement is a *template entry*: a PCR index, a template name and a list of
encoded fields.  This module encodes the fields the way the kernel's
``ima_template_lib.c`` does, computes template hashes per PCR bank the way
``ima_calc_field_array_hash`` does, prints the ascii and binary records the way
``ima_fs.c`` does, and parses both formats back.

The fields themselves (encoders, their ascii view and its parse) are in
``template_lib`` (the kernel's ``ima_template_lib.c``).

Choices:

* A violation is an entry whose template hash is all zeros in every bank and
  whose PCR extension uses all-ones bytes; its digest field is all zeros.
"""
from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

from imafs.ima.template_lib import (
    FIELD_KINDS, IMA_DIGEST_SIZE, IMA_EVENT_NAME_LEN_MAX, STRING, TemplateError, encode_buf,
    encode_d, encode_d_ng, encode_d_ngv2, encode_n, encode_n_ng, encode_ns, encode_sig,
    hash_size, new_hash, parse_ascii_field, show_ascii, unescape_newline)

__all__ = [
    "TemplateEntry", "TEMPLATES", "MAX_TEMPLATE_DATA_LEN",
    "build_entry", "buf_entry", "violation_entry",
    "parse_binary", "parse_ascii_line", "parse_ascii",
]

MAX_TEMPLATE_NAME_LEN = 255           # evmctl refuses longer template names
MAX_TEMPLATE_DATA_LEN = 64 << 20      # a parser refuses bigger records
_READ_CHUNK = 1 << 20                 # streams are read at most this much at once

# Built-in templates (ima_template.c builtin_templates[]) plus our ima-ns.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "ima": ("d", "n"),
    "ima-ng": ("d-ng", "n-ng"),
    "ima-sig": ("d-ng", "n-ng", "sig"),
    "ima-ngv2": ("d-ngv2", "n-ng"),
    "ima-sigv2": ("d-ngv2", "n-ng", "sig"),
    "ima-buf": ("d-ng", "n-ng", "buf"),
    "ima-modsig": ("d-ng", "n-ng", "sig", "d-modsig", "modsig"),
    "evm-sig": ("d-ng", "n-ng", "evmsig", "xattrnames", "xattrlengths",
                "xattrvalues", "iuid", "igid", "imode"),
    "ima-ns": ("d-ng", "n-ng", "ns"),
}


_U32 = struct.Struct("<I")
_ASCII_HEAD_RE = re.compile(rb" *([0-9]{1,10}) ([0-9a-fA-F]+) ([\x21-\x7e]+)")


# -- the entry ----------------------------------------------------------------

def _field_ids_for(template: str) -> tuple[str, ...] | None:
    ids = TEMPLATES.get(template)
    if ids is not None:
        return ids
    # A custom template is shown by its format string ("d-ng|n-ng|...").
    parts = tuple(template.split("|"))
    if parts and all(p in FIELD_KINDS for p in parts):
        return parts
    return None


def _check_template_name(template: str) -> None:
    if not isinstance(template, str) or not template:
        raise TemplateError("empty template name")
    if len(template) > MAX_TEMPLATE_NAME_LEN:
        raise TemplateError("template name too long")
    if any(not 0x21 <= ord(c) <= 0x7e for c in template):
        raise TemplateError("template name is not printable ascii")


@dataclass(frozen=True)
class TemplateEntry:
    """One measurement.  ``fields`` are the encoded field data, exactly what the
    kernel keeps in ``template_data[i].data`` (no length prefix).
    ``recorded_hash`` is the template hash a parser read (not compared)."""

    pcr: int
    template: str
    fields: tuple[bytes, ...]
    violation: bool = False
    recorded_hash: bytes | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.pcr, int) or not 0 <= self.pcr < 1 << 32:
            raise TemplateError(f"PCR index {self.pcr!r} out of range")
        _check_template_name(self.template)
        if not isinstance(self.fields, tuple):
            object.__setattr__(self, "fields", tuple(self.fields))
        for f in self.fields:
            if not isinstance(f, bytes):
                raise TemplateError("template fields must be bytes")
        ids = _field_ids_for(self.template)
        if ids is not None and len(ids) != len(self.fields):
            raise TemplateError(f"template {self.template} has {len(ids)} fields, "
                                f"got {len(self.fields)}")
        if self.template == "ima":
            if len(self.fields[0]) != IMA_DIGEST_SIZE:
                raise TemplateError("the ima template's digest must be 20 bytes")
            if len(self.fields[1]) > IMA_EVENT_NAME_LEN_MAX + 1:
                raise TemplateError("the ima template's name exceeds 255 bytes")

    @classmethod
    def _trusted(cls, pcr: int, template: str, fields: tuple[bytes, ...],
                 violation: bool = False, recorded_hash: bytes | None = None) -> "TemplateEntry":
        """Rebuild an entry this module validated before (from our own store)
        without validating it again."""
        self = object.__new__(cls)
        for k, v in (("pcr", pcr), ("template", template), ("fields", fields),
                     ("violation", violation), ("recorded_hash", recorded_hash)):
            object.__setattr__(self, k, v)
        return self

    # --- structure
    @property
    def field_ids(self) -> tuple[str, ...] | None:
        return _field_ids_for(self.template)

    def get(self, field_id: str) -> bytes | None:
        """The data of the first field with this id, or None."""
        ids = self.field_ids
        if ids is None or field_id not in ids:
            return None
        return self.fields[ids.index(field_id)]

    @property
    def name(self) -> bytes | None:
        """The event name (``n`` or ``n-ng``) without its terminating NUL."""
        data = self.get("n-ng")
        if data is None:
            data = self.get("n")
        if data is None:
            return None
        return data.split(b"\0", 1)[0]

    @property
    def file_digest(self) -> tuple[str | None, str, bytes] | None:
        """(digest type or None, algorithm, digest) from d / d-ng / d-ngv2."""
        ids = self.field_ids or ()
        for fid in ("d-ngv2", "d-ng", "d"):
            if fid in ids:
                data = self.fields[ids.index(fid)]
                if fid == "d":
                    return None, "sha1", data
                nul = data.find(b"\0")
                if nul < 1 or data[nul - 1:nul] != b":":
                    return None
                prefix = data[:nul - 1].decode("ascii", "replace")
                dtype = None
                if fid == "d-ngv2":
                    dtype, _, prefix = prefix.partition(":")
                return dtype, prefix or "sha1", data[nul + 1:]
        return None

    def template_data(self) -> bytes:
        """The template data as the kernel keeps it and prints it in binary
        records of every template but ``ima``: {u32 len | field}*."""
        return b"".join(_U32.pack(len(f)) + f for f in self.fields)

    def hashed_data(self) -> bytes:
        """What the template hash covers: template_data(), except for the
        ``ima`` template, whose fields are hashed without lengths and whose
        name is padded with NULs to 256 bytes."""
        if self.template != "ima":
            return self.template_data()
        out = []
        for fid, f in zip(self.field_ids, self.fields):
            out.append(f.ljust(IMA_EVENT_NAME_LEN_MAX + 1, b"\0") if fid == "n" else f)
        return b"".join(out)

    def template_hash(self, algo: str = "sha1") -> bytes:
        """The template hash for one PCR bank (all zeros for a violation)."""
        if self.violation:
            return bytes(hash_size(algo))
        h = new_hash(algo)
        h.update(self.hashed_data())
        return h.digest()

    def extend_value(self, algo: str = "sha1", template_hash: bytes | None = None) -> bytes:
        """What the kernel extends into the bank: the template hash, or 0xff..
        for a violation."""
        if self.violation:
            return b"\xff" * hash_size(algo)
        return template_hash if template_hash is not None else self.template_hash(algo)

    # --- kernel output formats
    def binary_record(self, bank: str = "sha1", *, template_hash: bytes | None = None) -> bytes:
        """One record of binary_runtime_measurements[_<bank>] (ima_measurements_show)."""
        th = template_hash if template_hash is not None else self.template_hash(bank)
        name = self.template.encode()
        head = _U32.pack(self.pcr) + th + _U32.pack(len(name)) + name
        if self.template != "ima":
            data = self.template_data()
            return head + _U32.pack(len(data)) + data
        # `ima`: digest without length, then strlen(name) and the name.
        parts = [head]
        for fid, f in zip(self.field_ids, self.fields):
            if fid == "d":
                parts.append(f)
            else:
                s = f.split(b"\0", 1)[0]
                parts.append(_U32.pack(len(s)) + s)
        return b"".join(parts)

    def ascii_line(self, bank: str = "sha1", *, template_hash: bytes | None = None) -> bytes:
        """One line of ascii_runtime_measurements[_<bank>] (ima_ascii_measurements_show),
        newline included."""
        th = template_hash if template_hash is not None else self.template_hash(bank)
        ids = self.field_ids
        if ids is None:
            raise TemplateError(f"cannot print unknown template {self.template!r}")
        parts = [b"%2d " % self.pcr, th.hex().encode(), b" ", self.template.encode()]
        for fid, data in zip(ids, self.fields):
            parts.append(b" ")
            if data:
                parts.append(show_ascii(fid, data))
        parts.append(b"\n")
        return b"".join(parts)


# -- building entries ---------------------------------------------------------

def build_entry(template: str, *, name: str | bytes, algo: str = "sha256",
                digest: bytes | None = None, pcr: int = 10, xattr: bytes | None = None,
                evm_xattr: bytes | None = None, buf: bytes | None = None, ns_id: int = 0,
                digest_type: str = "ima") -> TemplateEntry:
    """Build the entry the kernel would record for a measurement.

    ``algo``/``digest`` is the file (or buffer) digest.  The ``ima`` template's
    ``d`` field only holds sha1 or md5 (the kernel rehashes with sha1 otherwise;
    here the caller must pass a sha1 digest).  ``digest_type`` ("ima" or
    "verity") is used by ``d-ngv2``.  Appended signatures are not supported:
    ``d-modsig`` and ``modsig`` are recorded empty, as for a file without one.
    """
    ids = _field_ids_for(template)
    if ids is None:
        raise ValueError(f"unknown template {template!r}")
    if digest is None:
        raise ValueError("a measurement needs a digest (use violation_entry for violations)")
    return TemplateEntry(pcr, template, _fields(ids, name, algo, digest, xattr, evm_xattr,
                                                buf, ns_id, digest_type))


def _fields(ids, name, algo, digest, xattr, evm_xattr, buf, ns_id, digest_type) -> tuple:
    """The template fields ``ids`` of one entry; ``digest`` None: a violation's (zero
    digests; the ``ima`` template's ``d`` then takes any ``algo``)."""
    fields = []
    for fid in ids:
        if fid == "d":
            if digest is not None and algo not in ("sha1", "md5"):
                raise ValueError("the ima template records a sha1 or md5 digest")
            fields.append(encode_d(digest))
        elif fid == "n":
            fields.append(encode_n(name))
        elif fid == "n-ng":
            fields.append(encode_n_ng(name))
        elif fid == "d-ng":
            fields.append(encode_d_ng(algo, digest))
        elif fid == "d-ngv2":
            fields.append(encode_d_ngv2(digest_type, algo, digest))
        elif fid == "sig":
            fields.append(encode_sig(xattr, evm_xattr))
        elif fid == "evmsig":
            fields.append(encode_sig(None, evm_xattr))
        elif fid == "buf":
            fields.append(encode_buf(buf))
        elif fid == "ns":
            fields.append(encode_ns(ns_id))
        else:   # d-modsig, modsig, xattr*, iuid, igid, imode: not collected here
            fields.append(b"")
    return tuple(fields)


def buf_entry(name: str | bytes, buf: bytes, *, algo: str = "sha256", pcr: int = 10,
              template: str = "ima-buf") -> TemplateEntry:
    """A buffer measurement (key, kernel command line, critical data)."""
    h = new_hash(algo)
    h.update(buf)
    return build_entry(template, name=name, algo=algo, digest=h.digest(), pcr=pcr, buf=buf)


def violation_entry(template: str, name: str | bytes, *, pcr: int = 10,
                    algo: str = "sha256", ns_id: int = 0) -> TemplateEntry:
    """The entry the kernel records for a violation (open-writers, ToMToU):
    zero digest of ``algo`` (the kernel's ima_hash_algo; the ``d`` field is
    always 20 zero bytes), the name, every other field empty."""
    ids = _field_ids_for(template)
    if ids is None:
        raise ValueError(f"unknown template {template!r}")
    return TemplateEntry(pcr, template, _fields(ids, name, algo, None, None, None, None, ns_id,
                                                "ima"), violation=True)


# -- parsers ------------------------------------------------------------------

class _Reader:
    """Exact reads from bytes or a binary stream, tracking the offset.  Reads a
    stream in bounded chunks, so memory follows the data actually present and
    never an announced length."""

    def __init__(self, source):
        self.pos = 0
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.buf = memoryview(source).cast("B") if isinstance(source, memoryview) \
                else memoryview(source)
            self.stream = None
        else:
            self.buf = None
            self.stream = source

    def read(self, n: int) -> bytes | None:
        """Exactly n bytes, or the shorter tail at end of input (maybe b"")."""
        if self.buf is not None:
            out = bytes(self.buf[self.pos:self.pos + n])
        else:
            parts, left = [], n
            while left:
                want = min(left, _READ_CHUNK)
                chunk = self._read_stream(want)
                parts.append(chunk)
                left -= len(chunk)
                if len(chunk) < want:
                    break
            out = b"".join(parts)
        self.pos += len(out)
        return out

    def _read_stream(self, n: int) -> bytes:
        parts, left = [], n
        while left:
            chunk = self.stream.read(left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        return b"".join(parts)


def _bank_size(bank: str | int) -> int:
    return bank if isinstance(bank, int) else hash_size(bank)


def parse_binary(source: bytes | bytearray | memoryview | BinaryIO, bank: str | int = "sha1",
                 *, max_data_len: int = MAX_TEMPLATE_DATA_LEN) -> Iterator[TemplateEntry]:
    """Entries of a binary measurement list (``binary_runtime_measurements`` for
    bank sha1, ``..._<bank>`` otherwise).  ``bank`` is the bank's name or its
    digest size.  Raises TemplateError (a ValueError) on malformed input."""
    hsize = _bank_size(bank)
    rd = _Reader(source)
    n = 0
    while True:
        start = rd.pos
        head = rd.read(4)
        if not head:
            return
        try:
            yield _parse_binary_record(rd, head, hsize, max_data_len)
        except TemplateError as e:
            raise e.at(n, e.offset if e.offset is not None else start) from None
        n += 1


def _need(rd: _Reader, n: int, what: str) -> bytes:
    at = rd.pos
    data = rd.read(n)
    if len(data) != n:
        raise TemplateError(f"truncated {what}: need {n} bytes, {len(data)} left", offset=at)
    return data


def _parse_binary_record(rd: _Reader, head: bytes, hsize: int, max_data_len: int) -> TemplateEntry:
    if len(head) != 4:
        raise TemplateError("truncated record header", offset=rd.pos - len(head))
    (pcr,) = _U32.unpack(head)
    thash = _need(rd, hsize, "template hash")
    at = rd.pos
    (nlen,) = _U32.unpack(_need(rd, 4, "template name length"))
    if not 0 < nlen <= MAX_TEMPLATE_NAME_LEN:
        raise TemplateError(f"bad template name length {nlen}", offset=at)
    at = rd.pos
    raw = _need(rd, nlen, "template name")
    if any(not 0x21 <= c <= 0x7e for c in raw):
        raise TemplateError("template name is not printable ascii", offset=at)
    template = raw.decode("ascii")
    violation = not any(thash)
    if template == "ima":
        digest = _need(rd, IMA_DIGEST_SIZE, "ima digest")
        at = rd.pos
        (slen,) = _U32.unpack(_need(rd, 4, "ima name length"))
        if slen > IMA_EVENT_NAME_LEN_MAX:
            raise TemplateError(f"ima name length {slen} exceeds 255", offset=at)
        at = rd.pos
        name = _need(rd, slen, "ima name")
        if b"\0" in name:
            raise TemplateError("NUL inside the ima name", offset=at)
        fields = (digest, name + b"\0")
    else:
        at = rd.pos
        (dlen,) = _U32.unpack(_need(rd, 4, "template data length"))
        if dlen > max_data_len:
            raise TemplateError(f"template data length {dlen} exceeds limit {max_data_len}",
                                offset=at)
        base = rd.pos
        data = _need(rd, dlen, "template data")
        fields = _split_fields(data, base)
        ids = _field_ids_for(template)
        if ids is not None and len(ids) != len(fields):
            raise TemplateError(f"template {template} has {len(ids)} fields, "
                                f"record has {len(fields)}", offset=base)
    try:
        return TemplateEntry(pcr, template, fields, violation, recorded_hash=thash)
    except TemplateError as e:
        raise e.at(None, at) from None


def _split_fields(data: bytes, base: int) -> tuple[bytes, ...]:
    fields, pos, end = [], 0, len(data)
    while pos < end:
        if end - pos < 4:
            raise TemplateError("truncated field length", offset=base + pos)
        (flen,) = _U32.unpack_from(data, pos)
        if flen > end - pos - 4:
            raise TemplateError(f"field length {flen} exceeds the template data",
                                offset=base + pos)
        fields.append(data[pos + 4:pos + 4 + flen])
        pos += 4 + flen
    return tuple(fields)



def parse_ascii_line(line: bytes | str, *, entry: int | None = None,
                     offset: int | None = None) -> TemplateEntry:
    """Parse one line of an ascii measurement list (any bank).  The parsed
    template hash is kept in ``recorded_hash``."""
    try:
        return _parse_ascii_line(line)
    except TemplateError as e:
        raise e.at(entry, offset) from None


def _parse_ascii_line(line: bytes | str) -> TemplateEntry:
    if isinstance(line, str):
        line = line.encode("utf-8", "surrogateescape")
    if line.endswith(b"\n"):
        line = line[:-1]
    m = _ASCII_HEAD_RE.match(line)
    if not m:
        raise TemplateError("not \"PCR template-hash template-name ...\"")
    pcr = int(m.group(1))
    if pcr >= 1 << 32:
        raise TemplateError("PCR index out of range")
    hx = m.group(2)
    if len(hx) % 2 or len(hx) < 32:
        raise TemplateError("template hash is not a digest")
    thash = bytes.fromhex(hx.decode("ascii"))
    template = m.group(3).decode("ascii")
    ids = _field_ids_for(template)
    if ids is None:
        raise TemplateError(f"unknown template {template!r}")
    rest = line[m.end():]
    if not ids:
        tokens = []
        if rest:
            raise TemplateError("data after a template without fields")
    else:
        if not rest.startswith(b" "):
            raise TemplateError(f"template {template} needs {len(ids)} fields")
        tokens = rest[1:].split(b" ")
        if len(tokens) != len(ids):
            raise TemplateError(f"template {template} has {len(ids)} fields, "
                                f"line has {len(tokens)}")
    fields = tuple(parse_ascii_field(fid, tok) for fid, tok in zip(ids, tokens))
    if b"\\012" in rest or b"\\134" in rest:
        # a name printed escaped (escape_newline): a printed escape is always one
        fields = tuple(unescape_newline(f) if FIELD_KINDS[fid] == STRING else f
                       for fid, f in zip(ids, fields))
    if template == "ima" and len(fields[1]) > IMA_EVENT_NAME_LEN_MAX + 1:
        raise TemplateError("ima name exceeds 255 bytes")
    return TemplateEntry(pcr, template, fields, not any(thash), recorded_hash=thash)




# the longest ascii line a parser reads: the hex of the largest template data, with room
# for the PCR, the template hash and the names (memory stays bounded by it)
MAX_ASCII_LINE = 2 * MAX_TEMPLATE_DATA_LEN + 4096


def _bounded_lines(stream) -> Iterator[bytes]:
    """Lines of a stream, none read past MAX_ASCII_LINE + 1 bytes (a longer one is
    refused by the caller without being held whole)."""
    while True:
        line = stream.readline(MAX_ASCII_LINE + 1)
        if not line:
            return
        yield line
        if len(line) > MAX_ASCII_LINE:
            return


def parse_ascii(source: bytes | Iterable[bytes] | BinaryIO) -> Iterator[TemplateEntry]:
    """Entries of an ascii measurement list: bytes, a binary stream, or an
    iterable of lines.  Errors carry the 0-based entry number and the byte
    offset of the line's start."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    if hasattr(source, "readline"):
        source = _bounded_lines(source)
    offset = 0
    n = 0
    for line in source:
        start = offset
        offset += len(line)
        if len(line) > MAX_ASCII_LINE:
            raise TemplateError(f"line longer than {MAX_ASCII_LINE} bytes", entry=n, offset=start)
        if line in (b"\n", b"", "\n", ""):
            continue
        yield parse_ascii_line(line, entry=n, offset=start)
        n += 1
