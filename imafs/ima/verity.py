"""fs-verity: the Merkle tree of a file and its digest (Documentation/filesystems/
fsverity.rst), as ``fsverity digest`` computes them and read-time verification
checks reads against them.

* :class:`VeritySpec`: the tree's parameters (hash algorithm, block size, salt).
* :class:`MerkleTree`: data blocks hashed with the salt (zero-padded to the hash's
  input block size) prepended and a short last block zero-padded; hashes packed
  into blocks level by level until one block is left; the root is the hash of
  that block.  The measurement that ``fsverity digest`` prints is the hash of
  the 256-byte ``struct fsverity_descriptor``, not the root.  A tree checks the
  blocks of a read (:meth:`MerkleTree.verify_range`, :class:`VerifyResult`) and is
  stored in the cache as a compact blob (:meth:`MerkleTree.to_bytes`).
* The tree is built in :func:`imafs.ima.hashing.hash_fd`'s one pass over the file
  (``verity=VeritySpec(...)``, through :class:`TreeLane`);
  :func:`fsverity_digest_fd` is the shortcut for the digest alone.

The algorithms and their fs-verity ids come from the one table in hashing.py.
Pure Python; no FUSE or trio import.
"""
from __future__ import annotations

import functools
import hmac
import operator
import struct
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from imafs.ima.hashing import (HASH_ALGOS, VERITY_ALGO_BY_ID, VERITY_ALGOS, HashAlgo,
                               HashAlgoError, format_digest, hash_fd, pread_full)

__all__ = [
    "VeritySpec", "MerkleTree", "VerifyResult", "TreeFormatError", "TreeLane",
    "aligned_range", "fsverity_digest_fd", "fsverity_digest_text",
    "MIN_BLOCK_SIZE", "MAX_BLOCK_SIZE", "MAX_SALT_SIZE", "DESCRIPTOR_SIZE",
]


# --------------------------------------------------------------------------
# fs-verity parameters
# --------------------------------------------------------------------------

# what fsverity-utils computes digests for: a power of two, at least twice the digest
# (so a tree block holds two hashes), here at most 64 MiB (a block is read whole). The
# kernel enables fs-verity on files only for 1024 .. page size; read-time verification
# always uses 4096.
MIN_BLOCK_SIZE = 64
MAX_BLOCK_SIZE = 1 << 26
MAX_SALT_SIZE = 32          # sizeof(fsverity_descriptor.salt)
DESCRIPTOR_SIZE = 256


@dataclass(frozen=True)
class VeritySpec:
    """fs-verity Merkle tree parameters (what ``fsverity digest`` takes)."""
    hash_alg: str = "sha256"
    block_size: int = 4096
    salt: bytes = b""
    # derived, filled in by __post_init__
    algo: HashAlgo = field(init=False, repr=False, compare=False)
    padded_salt: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        name = self.hash_alg.lower() if isinstance(self.hash_alg, str) else self.hash_alg
        if name not in VERITY_ALGOS:
            raise HashAlgoError(f"fs-verity hash algorithm must be one of "
                                f"{', '.join(VERITY_ALGOS)}, not {self.hash_alg!r}")
        bs = self.block_size
        if (not isinstance(bs, int) or isinstance(bs, bool) or bs & (bs - 1)
                or not MIN_BLOCK_SIZE <= bs <= MAX_BLOCK_SIZE):
            raise ValueError(f"fs-verity block size must be a power of two from "
                             f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, not {bs!r}")
        if bs < 2 * HASH_ALGOS[name].digest_size:
            raise ValueError(f"fs-verity block size {bs} is too small for {name} (at "
                             f"least {2 * HASH_ALGOS[name].digest_size})")
        salt = bytes(self.salt)
        if len(salt) > MAX_SALT_SIZE:
            raise ValueError(f"fs-verity salt is at most {MAX_SALT_SIZE} bytes, "
                             f"not {len(salt)}")
        algo = HASH_ALGOS[name]
        ctor = algo.constructor()
        object.__setattr__(self, "hash_alg", name)
        object.__setattr__(self, "salt", salt)
        object.__setattr__(self, "algo", algo)
        # fs-verity pads the salt with zeros to the hash's input block size
        # (64 bytes for sha256, 128 for sha512) so it costs one compression.
        hb = ctor().block_size
        padded = salt + bytes(-len(salt) % hb) if salt else b""
        object.__setattr__(self, "padded_salt", padded)

    @property
    def verity_id(self) -> int:
        return self.algo.verity_id

    @property
    def digest_size(self) -> int:
        return self.algo.digest_size

    @property
    def log_blocksize(self) -> int:
        return self.block_size.bit_length() - 1

    def block_hasher(self) -> Callable[[memoryview], bytes]:
        """f(data) -> digest of many blocks: ``data`` is a whole number of blocks
        (the last one may be short: it is zero-padded); returns their hashes
        concatenated, as they appear in a tree level."""
        return _block_hasher(self.hash_alg, self.block_size, self.padded_salt)

    def lane(self) -> "TreeLane":
        """What :func:`hashing.hash_fd` feeds to build the tree in its one pass."""
        return TreeLane(self)


@functools.lru_cache(maxsize=64)
def _verity_spec(name: str, bs: int, salt: bytes) -> VeritySpec:
    """A shared VeritySpec (immutable) for trees loaded from the cache."""
    return VeritySpec(name, bs, salt)


@functools.lru_cache(maxsize=64)
def _block_hasher(name: str, bs: int, padded_salt: bytes) -> Callable[[memoryview], bytes]:
    ctor = HASH_ALGOS[name].constructor()
    join = b"".join
    digest = operator.methodcaller("digest")

    if padded_salt:
        copy = ctor(padded_salt).copy

        def one(b):
            h = copy()
            h.update(b)
            return h.digest()
    else:
        def one(b):
            return ctor(b).digest()

    def hash_blocks(mv) -> bytes:
        n = len(mv)
        full = n - n % bs
        if padded_salt:
            out = join([one(mv[i:i + bs]) for i in range(0, full, bs)])
        else:  # the hot loop: no Python frame per block (map over C callables)
            out = join(map(digest, map(ctor, [mv[i:i + bs] for i in range(0, full, bs)])))
        if full != n:
            out += one(bytes(mv[full:]) + bytes(bs - (n - full)))
        return out

    return hash_blocks


def _num_blocks(size: int, bs: int) -> int:
    return -(-size // bs)


def aligned_range(offset: int, size: int, file_size: int, block_size: int = 4096
                  ) -> tuple[int, int]:
    """The whole-block range ``(start, length)`` to read so that the bytes
    ``[offset, offset+size)`` can be verified: ``start`` is ``offset`` rounded
    down to a block, the end is rounded up to a block but never past
    ``file_size``.  Length 0 when nothing of the request lies before EOF."""
    if offset < 0 or size < 0:
        raise ValueError("offset and size must not be negative")
    start = offset - offset % block_size
    end = min(offset + size, file_size)
    if end <= offset:
        return start, 0
    end = min(end + (-end % block_size), file_size)
    return start, end - start




# --------------------------------------------------------------------------
# Merkle tree
# --------------------------------------------------------------------------

class TreeFormatError(ValueError):
    """A stored tree blob that is not a valid, intact imafs Merkle tree."""


class VerifyResult(NamedTuple):
    ok: bool
    first_bad_block: int | None = None  # index of the first data block that failed
    expected: bytes | None = None       # its hash in the tree (b"" if past the tree's end)
    found: bytes | None = None          # the hash of the data supplied for it


_OK = VerifyResult(True)

# Blob layout (little-endian), version 1:
#   magic "IMVT" | u8 version | u8 fs-verity hash id | u8 log2 block size | u8 salt size
#   | u64 data size | salt | fs-verity digest (hash of the descriptor) | leaf hashes
# Only the leaf level is stored: the upper levels are 1/128 of it (sha256, 4 KiB) and
# are rebuilt on load; the rebuilt tree must reproduce the stored fs-verity digest,
# which covers every header field, the salt and (through the root) every leaf.
_BLOB_MAGIC = b"IMVT"
_BLOB_VERSION = 1
_BLOB_HEAD = struct.Struct("<4sBBBBQ")


class MerkleTree:
    """A file's fs-verity Merkle tree.

    ``leaves`` are the hashes of the data blocks in order (one per block); for a
    file of two blocks or more they form the tree's bottom level, for a one-block
    file the single leaf is the root, for an empty file there are none and the
    root is all zeros.  Trees are immutable.
    """

    __slots__ = ("spec", "data_size", "leaves", "_levels", "_root", "_digest", "_hash_blocks")

    def __init__(self, spec: VeritySpec, data_size: int, leaves: bytes):
        if data_size < 0:
            raise ValueError("data_size must not be negative")
        leaves = bytes(leaves)
        want = _num_blocks(data_size, spec.block_size) * spec.digest_size
        if len(leaves) != want:
            raise ValueError(f"{data_size} bytes in {spec.block_size}-byte blocks need "
                             f"{want} bytes of {spec.hash_alg} leaf hashes, got {len(leaves)}")
        self.spec = spec
        self.data_size = data_size
        self.leaves = leaves
        self._hash_blocks = spec.block_hasher()
        self._levels, self._root = self._build_upper_levels()
        self._digest = None

    def _build_upper_levels(self) -> tuple[list[bytes], bytes]:
        ds = self.spec.digest_size
        cur = self.leaves
        if len(cur) == 0:
            return [], bytes(ds)       # fs-verity: the root of an empty file is all zeros
        if len(cur) == ds:
            return [], cur             # one data block: no tree blocks, root = its hash
        bottom_up = []
        while len(cur) > ds:
            bottom_up.append(cur)
            cur = self._hash_blocks(memoryview(cur))   # pads the level's last block
        bottom_up.reverse()            # fs-verity stores the top level first
        return bottom_up, cur

    # -- parameters ---------------------------------------------------------
    @property
    def hash_alg(self) -> str:
        return self.spec.hash_alg

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def salt(self) -> bytes:
        return self.spec.salt

    @property
    def digest_size(self) -> int:
        return self.spec.digest_size

    @property
    def num_blocks(self) -> int:
        return len(self.leaves) // self.spec.digest_size

    # -- the tree -----------------------------------------------------------
    @property
    def levels(self) -> list[bytes]:
        """The tree levels in fs-verity storage order, top (one block) first and
        the level of data-block hashes last; each is its hashes concatenated,
        without the zero padding of its last block.  Empty for files of 0 or 1 blocks."""
        return list(self._levels)

    @property
    def num_levels(self) -> int:
        return len(self._levels)

    @property
    def root_hash(self) -> bytes:
        return self._root

    def tree_bytes(self) -> bytes:
        """The Merkle tree exactly as fs-verity stores it (and as
        ``fsverity digest --out-merkle-tree`` writes it): every level padded to
        whole blocks, top level first."""
        bs = self.spec.block_size
        return b"".join(lv + bytes(-len(lv) % bs) for lv in self._levels)

    def descriptor(self) -> bytes:
        """The 256-byte ``struct fsverity_descriptor`` (version 1, no signature)."""
        spec = self.spec
        return struct.pack(
            "<BBBBIQ64s32s144x", 1, spec.verity_id, spec.log_blocksize, len(spec.salt),
            0, self.data_size, self._root, spec.salt)

    @property
    def verity_digest(self) -> bytes:
        """The fs-verity file digest (what ``fsverity digest`` and
        FS_IOC_MEASURE_VERITY report): the hash of the descriptor."""
        if self._digest is None:
            self._digest = self.spec.algo.new(self.descriptor()).digest()
        return self._digest

    @property
    def verity_digest_text(self) -> str:
        return format_digest(self.spec.hash_alg, self.verity_digest)

    def block_hash(self, index: int) -> bytes:
        """The hash of data block ``index`` (O(1))."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"block {index} out of range (file has {self.num_blocks})")
        ds = self.spec.digest_size
        return self.leaves[index * ds:(index + 1) * ds]

    def hash_block(self, data) -> bytes:
        """Hash one data block as the tree does (salted; zero-padded if short)."""
        if len(data) > self.spec.block_size:
            raise ValueError("more than one block")
        return self._hash_blocks(memoryview(data))

    # -- verification -------------------------------------------------------
    def aligned_range(self, offset: int, size: int, file_size: int | None = None
                      ) -> tuple[int, int]:
        """Whole blocks ``(start, length)`` covering ``[offset, offset+size)``,
        clipped at ``file_size`` (default: the size the tree was built over)."""
        return aligned_range(offset, size,
                             self.data_size if file_size is None else file_size,
                             self.spec.block_size)

    def verify_range(self, offset: int, data) -> VerifyResult:
        """Check ``data`` read at ``offset`` against the tree.

        ``offset`` must be block-aligned; ``data`` must end on a block boundary
        or exactly at the end of the file (use :meth:`aligned_range`).  Data ending
        mid-block before the end, or reaching past the end, fails at that block.
        Returns ``VerifyResult(ok, first_bad_block, expected, found)``.
        """
        bs, ds = self.spec.block_size, self.spec.digest_size
        if offset < 0 or offset % bs:
            raise ValueError(f"offset {offset} is not a multiple of the block size {bs}")
        mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) \
            else memoryview(data)
        n = len(mv)
        if n == 0:
            return _OK
        first = offset // bs
        end = offset + n
        found = self._hash_blocks(mv)
        expected = self.leaves[first * ds:first * ds + len(found)]
        size_bad = None
        if end > self.data_size:
            size_bad = max(first, self.data_size // bs)
        elif n % bs and end != self.data_size:
            size_bad = first + (n - 1) // bs
        if size_bad is None and found == expected:
            return _OK
        bad = size_bad if size_bad is not None else first + len(found) // ds
        for i in range(0, min(len(found), len(expected)), ds):
            if found[i:i + ds] != expected[i:i + ds]:
                bad = min(bad, first + i // ds)
                break
        j = (bad - first) * ds
        return VerifyResult(False, bad, expected[j:j + ds], found[j:j + ds])

    verify = verify_range

    def verify_read(self, fd: int, offset: int, size: int) -> tuple[VerifyResult, bytes]:
        """Read the whole blocks around ``[offset, offset+size)`` from ``fd``, verify
        them, and return ``(result, the requested bytes)`` (clipped at the tree's size).
        A short read (the file shrank) fails at the first missing block."""
        start, length = self.aligned_range(offset, size)
        if length == 0:
            return _OK, b""
        buf = pread_full(fd, length, start)
        res = self.verify_range(start, buf)
        if res.ok and len(buf) < length:
            bad = (start + len(buf)) // self.spec.block_size
            res = VerifyResult(False, bad, self.block_hash(bad), b"")
        lo = offset - start
        if lo == 0 and len(buf) <= size:
            return res, buf
        return res, buf[lo:lo + size]

    # -- memory -------------------------------------------------------------
    def spill(self, leaves) -> None:
        """Let the leaf level go from memory: ``leaves`` stands for it from now on --
        any object with ``len()`` whose slices are the same bytes (ima/treemem.py
        reads them back from the tree cache, checked against the level above,
        which stays). Everything but :meth:`to_bytes`, :meth:`tree_bytes` and
        ``==`` works on a spilled tree."""
        if self._levels:
            self._levels[-1] = leaves
        self.leaves = leaves

    def blob_leaves_offset(self) -> int:
        """Where the leaf level starts in :meth:`to_bytes`."""
        return _BLOB_HEAD.size + len(self.spec.salt) + self.spec.digest_size

    # -- storage ------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Compact, versioned blob for the digest cache (see :meth:`from_bytes`)."""
        spec = self.spec
        return b"".join((
            _BLOB_HEAD.pack(_BLOB_MAGIC, _BLOB_VERSION, spec.verity_id, spec.log_blocksize,
                            len(spec.salt), self.data_size),
            spec.salt, self.verity_digest, self.leaves))

    @classmethod
    def from_bytes(cls, blob) -> "MerkleTree":
        """Rebuild a tree from :meth:`to_bytes`; raises :class:`TreeFormatError`
        for anything that is not an intact blob of a known version.  Rebuilding the
        upper levels costs about 1/128 of hashing the file (sha256, 4 KiB blocks)."""
        try:
            blob = bytes(blob)
        except TypeError:
            raise TreeFormatError("tree blob must be bytes") from None
        if len(blob) < _BLOB_HEAD.size:
            raise TreeFormatError(f"tree blob truncated: {len(blob)} bytes, header needs "
                                  f"{_BLOB_HEAD.size}")
        magic, version, alg_id, log_bs, salt_size, data_size = _BLOB_HEAD.unpack_from(blob)
        if magic != _BLOB_MAGIC:
            raise TreeFormatError(f"not an imafs Merkle tree blob (magic {magic!r})")
        if version != _BLOB_VERSION:
            raise TreeFormatError(f"unsupported Merkle tree blob version {version} "
                                  f"(this imafs reads version {_BLOB_VERSION})")
        algo = VERITY_ALGO_BY_ID.get(alg_id)
        if algo is None:
            raise TreeFormatError(f"tree blob: unknown fs-verity hash algorithm id {alg_id}")
        if not MIN_BLOCK_SIZE <= (1 << min(log_bs, 63)) <= MAX_BLOCK_SIZE:
            raise TreeFormatError(f"tree blob: block size 2^{log_bs} out of range")
        if salt_size > MAX_SALT_SIZE:
            raise TreeFormatError(f"tree blob: salt size {salt_size} > {MAX_SALT_SIZE}")
        bs, ds = 1 << log_bs, algo.digest_size
        if bs < 2 * ds:
            raise TreeFormatError(f"tree blob: block size {bs} too small for {algo.name}")
        if data_size >= 1 << 63:
            raise TreeFormatError(f"tree blob: data size {data_size} out of range")
        want = _BLOB_HEAD.size + salt_size + ds + _num_blocks(data_size, bs) * ds
        if len(blob) != want:
            raise TreeFormatError(f"tree blob: {len(blob)} bytes, expected {want} for "
                                  f"{data_size} bytes of data (truncated or corrupted)")
        p = _BLOB_HEAD.size
        salt = blob[p:p + salt_size]
        stored = blob[p + salt_size:p + salt_size + ds]
        leaves = blob[p + salt_size + ds:]
        tree = cls(_verity_spec(algo.name, bs, salt), data_size, leaves)
        if not hmac.compare_digest(tree.verity_digest, stored):
            raise TreeFormatError("tree blob corrupted: its leaves and header do not "
                                  "reproduce the stored fs-verity digest")
        return tree

    # -- misc ---------------------------------------------------------------
    def __eq__(self, other):
        if not isinstance(other, MerkleTree):
            return NotImplemented
        return (self.spec == other.spec and self.data_size == other.data_size
                and self.leaves == other.leaves)

    def __hash__(self):
        return hash((self.spec, self.data_size, self._root))

    def __repr__(self):
        return (f"MerkleTree({self.spec.hash_alg}, block_size={self.spec.block_size}, "
                f"salt={self.spec.salt.hex() or '-'}, data_size={self.data_size}, "
                f"levels={self.num_levels}, digest={self.verity_digest_text})")


# --------------------------------------------------------------------------
# Building the tree in hash_fd's pass, and the digest alone
# --------------------------------------------------------------------------

class TreeLane:
    """The leaf level of the Merkle tree (the upper levels are built at the end)."""
    __slots__ = ("spec", "hash_blocks", "leaves")

    def __init__(self, spec: VeritySpec):
        self.spec = spec
        self.hash_blocks = spec.block_hasher()
        self.leaves = bytearray()

    def feed(self, mv):
        self.leaves += self.hash_blocks(mv)

    def result(self, size: int) -> MerkleTree:
        return MerkleTree(self.spec, size, self.leaves)



def fsverity_digest_fd(fd: int, algo: str = "sha256", block_size: int = 4096,
                       salt: bytes = b"") -> bytes:
    """The fs-verity digest of an open file, as ``fsverity digest`` computes it."""
    return hash_fd(fd, (), verity=VeritySpec(algo, block_size, salt)).tree.verity_digest


def fsverity_digest_text(fd: int, algo: str = "sha256", block_size: int = 4096,
                         salt: bytes = b"") -> str:
    """``"sha256:<hex>"`` — the first word of ``fsverity digest``'s output."""
    return format_digest(algo, fsverity_digest_fd(fd, algo, block_size, salt))
