"""Digest lists: DIGLIM's compact list format, with imafs's signed provenance.

A *digest list* carries reference digests that a namespace may trust instead of a
per-file signature (issue 17; DIGLIM, Roberto Sassu, 2021, and its successor
digest_cache).  Pure Python; no FUSE, no LMDB (the index is ima/digest_index.py).

The compact list (DIGLIM's include/uapi/linux/diglim.h, the version of its v2/v3
patches): a sequence of blocks, each a 16-byte little-endian header ::

    u8 version (1) | u8 reserved (0) | le16 type | le16 modifiers | le16 algo |
    le32 count | le32 datalen

followed by ``count`` digests of the algorithm's size (``datalen`` bytes).  ``type``
is 0 parser, 1 file, 2 metadata (3, digest list, is only used inside the kernel for
the lists' own digests and is refused in a list, as DIGLIM's parser does);
``modifiers`` bit 0 is "immutable"; ``algo`` is the kernel's ``enum hash_algo`` id
(:mod:`imafs.ima.hashing`).  digest-list-tools numbers the types differently (0 key,
1 parser, 2 file, 3 metadata): the bytes cannot tell which numbering a file uses, so
imafs reads only DIGLIM's (docs/digest-lists.md says why that fails closed).

An imafs list file is either a bare compact list (its first byte is the version, 1)
or a compact list preceded by its provenance ::

    "IMAFSDL1" | le32 length | provenance (UTF-8 JSON object) | compact blocks

The first byte of the magic ("I") can never start a compact block, so the two forms
cannot be confused.  The list file is signed as a whole (``security.ima``, by
``imafs sign`` or ``evmctl ima_sign``), so the provenance -- which archive, suite,
packages and versions, which signing keys vouched for the digests -- is covered by
the same signature as the digests.  ``compact_bytes()`` gives the bare DIGLIM part.

Parsing is all or nothing: :func:`parse` refuses a malformed list whole, with the
byte offset of the first problem (:class:`DigestListError`).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Iterator

from imafs.ima import hashing

__all__ = [
    "COMPACT_PARSER", "COMPACT_FILE", "COMPACT_METADATA", "COMPACT_DIGEST_LIST",
    "TYPE_NAMES", "MOD_IMMUTABLE", "ACTION_MEASURED", "ACTION_APPRAISED",
    "ACTION_APPRAISED_DIGSIG", "ACTION_NAMES", "MAX_LIST_SIZE", "MAGIC",
    "DigestListError", "Block", "Package", "Provenance", "DigestList",
    "parse", "format_actions",
]

# enum compact_types (DIGLIM 2021)
COMPACT_PARSER = 0
COMPACT_FILE = 1
COMPACT_METADATA = 2
COMPACT_DIGEST_LIST = 3
TYPE_NAMES = {COMPACT_PARSER: "parser", COMPACT_FILE: "file", COMPACT_METADATA: "metadata",
              COMPACT_DIGEST_LIST: "digest_list"}
_TYPE_BY_NAME = {v: k for k, v in TYPE_NAMES.items()}

# enum compact_modifiers: bit positions
MOD_IMMUTABLE = 1 << 0
_KNOWN_MODIFIERS = MOD_IMMUTABLE

# enum compact_actions: bit positions of what was done to a list when it was loaded
ACTION_MEASURED = 1 << 0
ACTION_APPRAISED = 1 << 1
ACTION_APPRAISED_DIGSIG = 1 << 2
ACTION_NAMES = ((ACTION_MEASURED, "measured"), (ACTION_APPRAISED, "appraised"),
                (ACTION_APPRAISED_DIGSIG, "appraised_digsig"))

VERSION = 1
HEADER = struct.Struct("<BBHHHII")          # 16 bytes
MAGIC = b"IMAFSDL1"
_PROV_LEN = struct.Struct("<I")
# DIGLIM's MAX_DIGEST_LIST_SIZE: 64 MiB - 1 (a list is read whole into memory)
MAX_LIST_SIZE = 64 * 1024 * 1024 - 1
MAX_PROVENANCE = 16 * 1024 * 1024


class DigestListError(ValueError):
    """A malformed digest list; ``offset`` is the byte where the problem is."""

    def __init__(self, offset: int, message: str):
        super().__init__(f"byte {offset}: {message}")
        self.offset = offset
        self.reason = message


def format_actions(actions: int) -> str:
    """``measured,appraised`` (``none`` for 0)."""
    names = [n for bit, n in ACTION_NAMES if actions & bit]
    return ",".join(names) or "none"


def type_id(name_or_id: str | int) -> int:
    if isinstance(name_or_id, int):
        if name_or_id not in TYPE_NAMES:
            raise ValueError(f"unknown digest list type {name_or_id}")
        return name_or_id
    try:
        return _TYPE_BY_NAME[name_or_id]
    except KeyError:
        raise ValueError(f"unknown digest list type {name_or_id!r} "
                         f"(known: {', '.join(TYPE_NAMES.values())})") from None


@dataclass(frozen=True)
class Block:
    """One compact block: digests of one type and algorithm (concatenated)."""
    type: int
    algo: str                       # kernel name (hashing table)
    digests: bytes
    modifiers: int = 0

    def __post_init__(self):
        a = hashing.hash_algo(self.algo)
        object.__setattr__(self, "algo", a.name)
        if self.type not in TYPE_NAMES or self.type == COMPACT_DIGEST_LIST:
            raise ValueError(f"a list block cannot have type {self.type}")
        if not 0 <= self.modifiers <= 0xFFFF:
            raise ValueError(f"modifiers {self.modifiers} do not fit in 16 bits")
        if len(self.digests) % a.digest_size:
            raise ValueError(f"{len(self.digests)} bytes are not a whole number of "
                             f"{a.name} digests")
        if len(self.digests) > 0xFFFFFFFF:
            raise ValueError("a block holds at most 4 GiB of digests")

    @classmethod
    def of(cls, type: int | str, algo: str, digests, modifiers: int = 0) -> "Block":
        """A block from an iterable of digests (kept in the order given)."""
        return cls(type_id(type), algo, b"".join(bytes(d) for d in digests), modifiers)

    @property
    def digest_size(self) -> int:
        return hashing.digest_size(self.algo)

    @property
    def count(self) -> int:
        return len(self.digests) // self.digest_size

    @property
    def algo_id(self) -> int:
        return hashing.algo_id(self.algo)

    def __iter__(self) -> Iterator[bytes]:
        n = self.digest_size
        d = self.digests
        return (d[i:i + n] for i in range(0, len(d), n))

    def header(self) -> bytes:
        return HEADER.pack(VERSION, 0, self.type, self.modifiers, self.algo_id,
                           self.count, len(self.digests))

    def describe(self) -> str:
        """As DIGLIM's digest_query prints a block."""
        return (f"version: {VERSION}, algo: {self.algo}, type: {self.type}, "
                f"modifiers: {self.modifiers}, count: {self.count}, "
                f"datalen: {len(self.digests)}")


# --------------------------------------------------------------------------- provenance

_PKG_FIELDS = {"name": str, "version": str, "arch": str, "block": int, "files": int,
               "sha256": str, "archive": int, "key": str}


@dataclass(frozen=True)
class Package:
    """Where the digests of one block came from: a package, as its archive names it.

    ``block``: index of the block holding its file digests; ``sha256``: the package
    file's digest as the verified index (Packages) or header named it; ``archive``:
    index into ``Provenance.archives`` (Debian) ; ``key``: the signing key's id or
    fingerprint (RPM header signatures)."""
    name: str
    version: str
    block: int
    arch: str = ""
    files: int = 0
    sha256: str = ""
    archive: int = -1
    key: str = ""

    def label(self) -> str:
        return f"{self.name} {self.version}" + (f" ({self.arch})" if self.arch else "")

    def to_json(self) -> dict:
        out = {"name": self.name, "version": self.version, "block": self.block}
        for k, default in (("arch", ""), ("files", 0), ("sha256", ""), ("archive", -1),
                           ("key", "")):
            v = getattr(self, k)
            if v != default:
                out[k] = v
        return out


@dataclass(frozen=True)
class Provenance:
    """What the digests of a list are, and who vouched for them.

    ``source``: ``debian`` or ``rpm``; ``generator``: the command that made the list;
    ``archives``: one dict per verified archive index (origin, suite, codename, date,
    release_sha256, signed_by: fingerprints); ``keys``: fingerprints or key ids that
    verified the sources; ``packages``: :class:`Package` per block; ``missing``:
    packages that could not be had or verified (``--allow-missing``), with why."""
    source: str
    generator: str = ""
    algo: str = "sha256"
    archives: tuple = ()
    keys: tuple = ()
    packages: tuple = ()
    missing: tuple = ()
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"format": 1, "source": self.source, "generator": self.generator,
               "algo": self.algo, "archives": [dict(a) for a in self.archives],
               "keys": list(self.keys), "packages": [p.to_json() for p in self.packages],
               "missing": [dict(m) for m in self.missing]}
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def to_bytes(self) -> bytes:
        # canonical: the same provenance always gives the same bytes (lists are
        # reproducible, so a rebuilt list has the same digest and signature)
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8")

    def package_of_block(self, block: int) -> Package | None:
        for p in self.packages:
            if p.block == block:
                return p
        return None

    @classmethod
    def from_bytes(cls, data: bytes, base: int, nblocks: int | None = None) -> "Provenance":
        """Parse and check; errors name the byte ``base`` where the JSON starts."""
        try:
            obj = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DigestListError(base + e.start, "provenance is not UTF-8") from None
        except json.JSONDecodeError as e:
            raise DigestListError(base + _byte_pos(data, e.pos),
                                  f"provenance is not JSON: {e.msg}") from None
        except RecursionError:
            raise DigestListError(base, "provenance nests too deeply") from None
        if not isinstance(obj, dict):
            raise DigestListError(base, "provenance is not a JSON object")

        def bad(what: str):
            return DigestListError(base, f"provenance: {what}")

        if obj.get("format") != 1:
            raise bad(f"format {obj.get('format')!r} is not 1")
        source = obj.get("source")
        if not isinstance(source, str) or not source:
            raise bad("no source")
        gen = obj.get("generator", "")
        algo = obj.get("algo", "sha256")
        if not isinstance(gen, str) or not isinstance(algo, str):
            raise bad("generator and algo must be strings")
        lists = {}
        for k in ("archives", "keys", "packages", "missing"):
            v = obj.get(k, [])
            if not isinstance(v, list):
                raise bad(f"{k} is not a list")
            lists[k] = v
        for i, a in enumerate(lists["archives"]):
            if not isinstance(a, dict) or not all(isinstance(x, (str, list)) for x in a.values()):
                raise bad(f"archive {i} is not an object of strings")
        for i, m in enumerate(lists["missing"]):
            if not isinstance(m, dict) or not all(isinstance(x, str) for x in m.values()):
                raise bad(f"missing entry {i} is not an object of strings")
        if not all(isinstance(k, str) for k in lists["keys"]):
            raise bad("keys must be strings")
        pkgs = []
        seen_blocks = set()
        for i, p in enumerate(lists["packages"]):
            if not isinstance(p, dict):
                raise bad(f"package {i} is not an object")
            for k, v in p.items():
                t = _PKG_FIELDS.get(k)
                if t is not None and (type(v) is not t):
                    raise bad(f"package {i}: {k} is not a {t.__name__}")
            if not isinstance(p.get("name"), str) or not isinstance(p.get("version"), str) \
                    or not isinstance(p.get("block"), int) or isinstance(p.get("block"), bool):
                raise bad(f"package {i} lacks name, version or block")
            b = p["block"]
            if b < 0 or (nblocks is not None and b >= nblocks):
                raise bad(f"package {i} ({p['name']}) names block {b}, "
                          f"the list has {nblocks}")
            if b in seen_blocks:
                raise bad(f"package {i} ({p['name']}) names block {b} a second time")
            seen_blocks.add(b)
            arc = p.get("archive", -1)
            if arc != -1 and not 0 <= arc < len(lists["archives"]):
                raise bad(f"package {i} ({p['name']}) names archive {arc}")
            pkgs.append(Package(**{k: v for k, v in p.items() if k in _PKG_FIELDS}))
        extra = {k: v for k, v in obj.items()
                 if k not in ("format", "source", "generator", "algo", "archives", "keys",
                              "packages", "missing")}
        return cls(source=source, generator=gen, algo=algo,
                   archives=tuple(lists["archives"]), keys=tuple(lists["keys"]),
                   packages=tuple(pkgs), missing=tuple(lists["missing"]), extra=extra)


def _byte_pos(data: bytes, char_pos: int) -> int:
    """The byte offset of a character position of ``data`` decoded as UTF-8."""
    return len(data.decode("utf-8")[:char_pos].encode("utf-8"))


# --------------------------------------------------------------------------- the list


@dataclass(frozen=True)
class DigestList:
    blocks: tuple
    provenance: Provenance | None = None

    def __post_init__(self):
        object.__setattr__(self, "blocks", tuple(self.blocks))

    @property
    def count(self) -> int:
        return sum(b.count for b in self.blocks)

    def compact_bytes(self) -> bytes:
        """The bare DIGLIM compact list (what a DIGLIM kernel would parse)."""
        return b"".join(b.header() + b.digests for b in self.blocks)

    def to_bytes(self) -> bytes:
        body = self.compact_bytes()
        if self.provenance is None:
            out = body
        else:
            prov = self.provenance.to_bytes()
            if len(prov) > MAX_PROVENANCE:
                raise ValueError(f"provenance of {len(prov)} bytes is over "
                                 f"{MAX_PROVENANCE}")
            out = MAGIC + _PROV_LEN.pack(len(prov)) + prov + body
        if len(out) > MAX_LIST_SIZE:
            raise ValueError(f"a digest list of {len(out)} bytes is over the "
                             f"{MAX_LIST_SIZE}-byte limit (DIGLIM's): split it")
        return out

    def digests(self, type: int | None = None) -> Iterator[tuple[int, int, str, bytes]]:
        """(block index, type, algo, digest) of every digest, in list order."""
        for i, b in enumerate(self.blocks):
            if type is None or b.type == type:
                for d in b:
                    yield i, b.type, b.algo, d

    def package_of_block(self, block: int) -> Package | None:
        return self.provenance.package_of_block(block) if self.provenance else None


def parse(data, *, base: int = 0) -> DigestList:
    """Parse a list file (bare compact list, or provenance + compact list).

    Refuses the list whole with :class:`DigestListError` (its byte offset counted
    from the start of ``data``, plus ``base``) on: a short header, a version that is
    not 1, a non-zero reserved byte, an unknown or the digest-list type, unknown
    modifier bits, an unknown algorithm id, ``datalen`` that is not ``count`` digests
    of the algorithm, digests past the end, a list over 64 MiB, a provenance that is
    not a JSON object of the documented shape or names blocks that do not exist."""
    mv = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    size = len(mv)
    if size > MAX_LIST_SIZE:
        raise DigestListError(base + MAX_LIST_SIZE,
                              f"list of {size} bytes is over {MAX_LIST_SIZE} bytes")
    pos = 0
    prov_raw = None
    prov_at = 0
    if size and mv[0] != VERSION:
        if bytes(mv[:len(MAGIC)]) != MAGIC:
            if size < len(MAGIC) and MAGIC.startswith(bytes(mv)):
                raise DigestListError(base + size, "truncated in the imafs magic")
            raise DigestListError(base, f"neither a compact list header (version byte "
                                  f"{mv[0]}, expected 1) nor the imafs magic {MAGIC!r}")
        pos = len(MAGIC)
        if size < pos + 4:
            raise DigestListError(base + size, "truncated in the provenance length")
        (plen,) = _PROV_LEN.unpack_from(mv, pos)
        pos += 4
        if plen > MAX_PROVENANCE:
            raise DigestListError(base + pos - 4, f"provenance length {plen} is over "
                                  f"{MAX_PROVENANCE}")
        if pos + plen > size:
            raise DigestListError(base + size, f"provenance of {plen} bytes runs past the "
                                  f"end ({size - pos} left)")
        prov_raw = bytes(mv[pos:pos + plen])
        prov_at = pos
        pos += plen
    blocks = []
    while pos < size:
        at = pos
        if size - pos < HEADER.size:
            raise DigestListError(base + at, f"{size - pos} bytes left, a block header "
                                  f"is {HEADER.size}")
        version, reserved, typ, mods, algo, count, datalen = HEADER.unpack_from(mv, pos)
        if version != VERSION:
            raise DigestListError(base + at, f"block version {version}, expected {VERSION}")
        if reserved:
            raise DigestListError(base + at + 1, f"reserved byte is {reserved}, must be 0")
        if typ not in TYPE_NAMES:
            raise DigestListError(base + at + 2, f"unknown type {typ}")
        if typ == COMPACT_DIGEST_LIST:
            raise DigestListError(base + at + 2, "type 3 (digest list) is not allowed "
                                  "inside a list")
        if mods & ~_KNOWN_MODIFIERS:
            raise DigestListError(base + at + 4, f"unknown modifier bits "
                                  f"{mods & ~_KNOWN_MODIFIERS:#x}")
        a = hashing.HASH_ALGO_BY_ID.get(algo)
        if a is None:
            raise DigestListError(base + at + 6, f"unknown hash algorithm id {algo}")
        if datalen != count * a.digest_size:
            raise DigestListError(base + at + 12, f"datalen {datalen} is not {count} "
                                  f"{a.name} digests ({count * a.digest_size} bytes)")
        pos += HEADER.size
        if datalen > size - pos:
            raise DigestListError(base + size, f"block at byte {base + at} needs {datalen} "
                                  f"bytes of digests, {size - pos} left")
        blocks.append(Block(typ, a.name, bytes(mv[pos:pos + datalen]), mods))
        pos += datalen
    prov = None
    if prov_raw is not None:
        prov = Provenance.from_bytes(prov_raw, base + prov_at, len(blocks))
    return DigestList(tuple(blocks), prov)
