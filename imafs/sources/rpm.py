"""RPM packages as a source of reference digests: header digests under the header
signature.

An RPM file is a 96-byte lead, the signature header (padded to 8 bytes), the main
header, then the payload.  A header is ``8e ad e8 01``, 4 reserved bytes, be32 index
count, be32 data size, the 16-byte index entries (be32 tag, type, offset, count) and
the data.  The main header carries ``RPMTAG_FILEDIGESTS`` (1035, hex strings, empty
for what is not a regular file) computed with ``RPMTAG_FILEDIGESTALGO`` (5011, an
OpenPGP hash id; MD5 when absent), the file names as ``RPMTAG_BASENAMES`` (1117),
``RPMTAG_DIRNAMES`` (1118) and ``RPMTAG_DIRINDEXES`` (1116), and their modes
(``RPMTAG_FILEMODES``, 1030).  The header signature (``RPMSIGTAG_RSA`` 268 or
``RPMSIGTAG_DSA`` 267 in the signature header) covers the main header, so it covers
the digests; the payload is never read.

The signature is checked by Debian's ``rpmkeys --checksig`` (package ``rpm``) with the
given keys imported into a private, temporary rpm database, on a private copy of the
very bytes this module parses: rpm's own OpenPGP code is the reference implementation
of RPM signatures (v3/v4 signatures, RSA, DSA, EdDSA and ECDSA keys, the header
regions), which a re-implementation here would only approximate.  A package is
accepted only when rpmkeys reports a header signature by an imported key as OK and
nothing as not OK (an unsigned package passes ``rpmkeys -K`` with digests alone: that
is refused here).  MD5 file digests are refused: MD5 is no reference value.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass

from imafs.ima import hashing
from imafs.sources import SourceError

LEAD_MAGIC = b"\xed\xab\xee\xdb"
HEADER_MAGIC = b"\x8e\xad\xe8\x01"
LEAD_SIZE = 96

TAG_NAME, TAG_VERSION, TAG_RELEASE, TAG_EPOCH, TAG_ARCH = 1000, 1001, 1002, 1003, 1022
TAG_OLDFILENAMES = 1027
TAG_FILEMODES = 1030
TAG_FILEDIGESTS = 1035
TAG_DIRINDEXES, TAG_BASENAMES, TAG_DIRNAMES = 1116, 1117, 1118
TAG_FILEDIGESTALGO = 5011
SIGTAG_DSA, SIGTAG_RSA, SIGTAG_OPENPGP = 267, 268, 278

T_CHAR, T_INT8, T_INT16, T_INT32, T_INT64 = 1, 2, 3, 4, 5
T_STRING, T_BIN, T_STRING_ARRAY, T_I18NSTRING = 6, 7, 8, 9
_SIZES = {T_CHAR: 1, T_INT8: 1, T_INT16: 2, T_INT32: 4, T_INT64: 8}

# OpenPGP hash algorithm ids (RFC 4880 9.4) -> kernel names (ima/hashing.py)
PGP_HASH = {1: "md5", 2: "sha1", 3: "rmd160", 8: "sha256", 9: "sha384", 10: "sha512",
            11: "sha224"}
MAX_HEADER = 64 << 20


@dataclass
class Header:
    """A parsed header: tag -> value (str, bytes, list of str or int)."""
    tags: dict
    start: int
    end: int

    def get(self, tag, default=None):
        return self.tags.get(tag, default)


def parse_header(data: bytes, pos: int, what: str) -> Header:
    """Parse the header at ``pos``; SourceError (with the byte offset) if malformed."""
    def bad(off, msg):
        return SourceError(f"{what}: byte {off}: {msg}")
    if data[pos:pos + 4] != HEADER_MAGIC:
        raise bad(pos, "no RPM header magic")
    if len(data) < pos + 16:
        raise bad(len(data), "truncated header")
    il, dl = struct.unpack_from(">II", data, pos + 8)
    if il > 0xFFFF or dl > MAX_HEADER:
        raise bad(pos + 8, f"header of {il} entries and {dl} bytes is too large")
    index = pos + 16
    store = index + 16 * il
    end = store + dl
    if end > len(data):
        raise bad(len(data), f"header needs {end - pos} bytes, {len(data) - pos} left")
    tags = {}
    for i in range(il):
        e = index + 16 * i
        tag, typ, off, count = struct.unpack_from(">IIII", data, e)
        if off >= dl and not (off == dl and count == 0):
            raise bad(e + 8, f"tag {tag}: offset {off} outside the {dl}-byte data")
        at = store + off
        if typ in _SIZES:
            n = _SIZES[typ] * count
            if at + n > end:
                raise bad(e + 12, f"tag {tag}: {count} values run past the data")
            fmt = {1: "B", 2: "B", 3: "H", 4: "I", 5: "Q"}[typ]
            tags[tag] = list(struct.unpack_from(f">{count}{fmt}", data, at))
        elif typ == T_BIN:
            if at + count > end:
                raise bad(e + 12, f"tag {tag}: {count} bytes run past the data")
            tags[tag] = data[at:at + count]
        elif typ in (T_STRING, T_STRING_ARRAY, T_I18NSTRING):
            n = 1 if typ == T_STRING else count
            if n > dl:
                raise bad(e + 12, f"tag {tag}: {count} strings in {dl} bytes")
            vals = []
            p = at
            for _ in range(n):
                z = data.find(b"\0", p, end)
                if z < 0:
                    raise bad(p, f"tag {tag}: string not terminated inside the data")
                vals.append(data[p:z].decode("utf-8", "surrogateescape"))
                p = z + 1
            tags[tag] = vals[0] if typ == T_STRING else vals
        elif typ == 0:
            tags[tag] = None
        else:
            raise bad(e + 4, f"tag {tag}: unknown type {typ}")
    return Header(tags, pos, end)


@dataclass
class RpmDigests:
    path: str
    name: str
    version: str                    # [epoch:]version-release
    arch: str
    algo: str                       # kernel name of the file digests' algorithm
    files: list[tuple[str, bytes]]  # (path, digest) of the regular files
    keyid: str                      # the key that signed the header (rpmkeys)
    header_sha256: str              # of the main header (what the signature covers)


def read_rpm(path: str, keyrings: list[str]) -> RpmDigests:
    """Verify ``path``'s header signature with ``keyrings`` (armored OpenPGP public
    keys) and return the file digests of its header."""
    if not keyrings:
        raise SourceError(f"{path}: no key to check the header signature with "
                          f"(give --keyring KEY.asc)")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_HEADER * 2 + LEAD_SIZE)
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror}") from None
    if data[:4] != LEAD_MAGIC or len(data) < LEAD_SIZE:
        raise SourceError(f"{path}: byte 0: not an RPM package (no lead magic)")
    sig = parse_header(data, LEAD_SIZE, path)
    if not any(t in sig.tags for t in (SIGTAG_RSA, SIGTAG_DSA, SIGTAG_OPENPGP)):
        raise SourceError(f"{path}: the package has no header signature (rpmsign it)")
    main_at = sig.end + (-sig.end % 8)
    hdr = parse_header(data, main_at, path)
    keyid = _checksig(path, data[:hdr.end], keyrings)
    return _digests(path, hdr, data[hdr.start:hdr.end], keyid)


def _digests(path: str, hdr: Header, raw: bytes, keyid: str) -> RpmDigests:
    def g(tag, default=None):
        v = hdr.get(tag, default)
        want = _TAG_TYPES.get(tag)
        if v is not None and want is not None and not (
                isinstance(v, want[0]) and all(isinstance(x, want[1]) for x in
                                               (v if isinstance(v, list) else []))):
            raise SourceError(f"{path}: tag {tag} has the wrong type")
        return v
    algo_id = (g(TAG_FILEDIGESTALGO) or [1])[0]
    algo = PGP_HASH.get(algo_id)
    if algo is None:
        raise SourceError(f"{path}: unknown file digest algorithm {algo_id}")
    if algo == "md5":
        raise SourceError(f"{path}: the header's file digests are MD5 (no "
                          f"RPMTAG_FILEDIGESTALGO): MD5 is no reference value")
    size = hashing.digest_size(algo)
    digests = g(TAG_FILEDIGESTS) or []
    if g(TAG_BASENAMES) is not None:
        base, dirs, idx = g(TAG_BASENAMES), g(TAG_DIRNAMES) or [], g(TAG_DIRINDEXES) or []
        if not (len(base) == len(idx)) or any(i >= len(dirs) for i in idx):
            raise SourceError(f"{path}: file name tags disagree (basenames, dirindexes)")
        names = [dirs[i] + b for b, i in zip(base, idx)]
    else:
        names = g(TAG_OLDFILENAMES) or []
    modes = g(TAG_FILEMODES) or []
    if not (len(names) == len(digests) == len(modes)):
        raise SourceError(f"{path}: {len(names)} file names, {len(digests)} digests and "
                          f"{len(modes)} modes in the header")
    files = []
    for n, d, m in zip(names, digests, modes):
        if (m & 0o170000) != 0o100000:
            continue                # directories, symlinks, devices: nothing to appraise
        if not re.fullmatch(r"[0-9a-fA-F]*", d) or len(d) != 2 * size:
            raise SourceError(f"{path}: {n}: digest {d!r} is not a {algo} digest")
        files.append((n, bytes.fromhex(d)))
    epoch = g(TAG_EPOCH)
    ver = f"{g(TAG_VERSION, '?')}-{g(TAG_RELEASE, '?')}"
    if epoch:
        ver = f"{epoch[0]}:{ver}"
    return RpmDigests(path, g(TAG_NAME, "?"), ver, g(TAG_ARCH, ""), algo, files, keyid,
                      hashlib.sha256(raw).hexdigest())


_TAG_TYPES = {TAG_NAME: (str, str), TAG_VERSION: (str, str), TAG_RELEASE: (str, str),
              TAG_ARCH: (str, str), TAG_EPOCH: (list, int), TAG_FILEDIGESTALGO: (list, int),
              TAG_FILEDIGESTS: (list, str), TAG_BASENAMES: (list, str),
              TAG_DIRNAMES: (list, str), TAG_DIRINDEXES: (list, int),
              TAG_OLDFILENAMES: (list, str), TAG_FILEMODES: (list, int)}

_SIG_OK = re.compile(r"^\s*Header V\d \S+ Signature, key ID ([0-9a-fA-F]+): OK\s*$", re.M)


def _checksig(path: str, head: bytes, keyrings: list[str]) -> str:
    """rpmkeys --checksig on the lead and headers (what the header signature covers;
    the payload is not read here) with only ``keyrings`` trusted."""
    if shutil.which("rpmkeys") is None:
        raise SourceError("rpmkeys is not installed (Debian package rpm)")
    with tempfile.TemporaryDirectory(prefix="imafs-rpmkeys-") as tmp:
        db = os.path.join(tmp, "db")
        os.mkdir(db)
        for k in keyrings:
            p = subprocess.run(["rpmkeys", "--dbpath", db, "--import", k],
                               capture_output=True, text=True, timeout=60)
            if p.returncode != 0:
                raise SourceError(f"keyring {k}: rpmkeys cannot import it: "
                                  f"{(p.stderr or p.stdout).strip()}")
        copy = os.path.join(tmp, "package.rpm")
        with open(copy, "wb") as f:
            f.write(head)
        # the copy ends with the main header: the header digests and the header
        # signature are checked, the payload digest cannot be (and is not asked for)
        p = subprocess.run(["rpmkeys", "--dbpath", db, "--checksig", "-v",
                            "--define", "_pkgverify_flags 0x0", copy],
                           capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    lines = [ln.strip() for ln in out.splitlines()[1:] if ln.strip()]
    bad = [ln for ln in lines if ln.endswith(("NOT OK", "BAD", "NOKEY", "NOTTRUSTED"))
           and "Payload" not in ln and not ln.startswith("MD5")]
    ok = _SIG_OK.findall(out)
    if bad or not ok:
        why = "; ".join(bad) or "no header signature by a given key verified"
        raise SourceError(f"{path}: header signature refused: {why}")
    return ok[0].lower()


def key_fingerprints(keyrings: list[str]) -> dict[str, str]:
    """OpenPGP fingerprints of the keys in ``keyrings``, by short key id (8 hex)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="imafs-gpg-") as home:
        for k in keyrings:
            p = subprocess.run(["gpg", "--homedir", home, "--batch", "--with-colons",
                                "--show-keys", k], capture_output=True, text=True, timeout=60)
            for ln in p.stdout.splitlines():
                if ln.startswith("fpr:"):
                    fpr = ln.split(":")[9]
                    out[fpr[-8:].lower()] = fpr
    return out


def make_list(rpms: list[RpmDigests], keyrings: list[str], generator: str):
    """One COMPACT_FILE block per package (sorted distinct digests), provenance naming
    the package, its header's SHA256 and the key that signed it."""
    from imafs.ima import digest_lists as dl
    fprs = key_fingerprints(keyrings)
    blocks, packages, keys = [], [], []
    algos = {r.algo for r in rpms}
    for i, r in enumerate(sorted(rpms, key=lambda r: (r.name, r.arch, r.version))):
        blocks.append(dl.Block.of(dl.COMPACT_FILE, r.algo, sorted({d for _, d in r.files})))
        key = fprs.get(r.keyid[-8:], r.keyid)
        keys.append(key)
        packages.append(dl.Package(r.name, r.version, i, arch=r.arch, files=len(r.files),
                                   sha256=r.header_sha256, key=key))
    prov = dl.Provenance("rpm", generator=generator,
                         algo=",".join(sorted(algos)) or "sha256",
                         keys=tuple(sorted(set(keys))), packages=tuple(packages))
    return dl.DigestList(blocks, prov)
