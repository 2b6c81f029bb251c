"""An independent, deliberately naive fs-verity implementation to compare imafs's
with (written from Documentation/filesystems/fsverity.rst, whole file in memory),
and digests `fsverity digest` printed."""
from __future__ import annotations

import hashlib
import struct

__all__ = ["ref_block_hash", "ref_levels", "ref_verity_digest", "ref_leaves",
           "FSVERITY_X", "FSVERITY_EMPTY"]


def ref_block_hash(alg, block, bs, salt):
    hb = hashlib.new(alg).block_size
    padded_salt = salt + b"\0" * ((-len(salt)) % hb) if salt else b""
    return hashlib.new(alg, padded_salt + block.ljust(bs, b"\0")).digest()


def ref_levels(data, alg="sha256", bs=4096, salt=b""):
    """(levels top-first, root) the way fs-verity lays them out."""
    ds = hashlib.new(alg).digest_size
    if not data:
        return [], b"\0" * ds
    hashes = b"".join(ref_block_hash(alg, data[i:i + bs], bs, salt)
                      for i in range(0, len(data), bs))
    levels = []
    while len(hashes) > ds:
        levels.append(hashes)
        hashes = b"".join(ref_block_hash(alg, hashes[i:i + bs], bs, salt)
                          for i in range(0, len(hashes), bs))
    return levels[::-1], hashes


def ref_verity_digest(data, alg="sha256", bs=4096, salt=b""):
    _, root = ref_levels(data, alg, bs, salt)
    desc = bytes([1, {"sha256": 1, "sha512": 2}[alg], bs.bit_length() - 1, len(salt)])
    desc += b"\0" * 4 + struct.pack("<Q", len(data))
    desc += root.ljust(64, b"\0") + salt.ljust(32, b"\0") + b"\0" * 144
    assert len(desc) == 256
    return hashlib.new(alg, desc).digest()


def ref_leaves(data, alg="sha256", bs=4096, salt=b""):
    return b"".join(ref_block_hash(alg, data[i:i + bs], bs, salt)
                    for i in range(0, len(data), bs))


# `fsverity digest` (fsverity-utils 1.5) of a file holding the single byte "x"
FSVERITY_X = {
    (): "sha256:dbbdfa9d606f7adeaa7f16dcfb0d49161c4cfb82d9d51cfb5cb43fa3dacb9e5b",
    (("salt", "ab"),): "sha256:3ce9d43c6a340c94a7b05778fe565aabe37e419bc079a75d390066d806c7c13d",
    (("block_size", 1024),):
        "sha256:51919941b96a14cb0e9a67ee3ff6b21d095cac1da21678a67a287ba293065c92",
    (("block_size", 65536),):
        "sha256:57fcd4867e81c69aa81dfa054fb3ca6708750be425dc859a386c23957526cc32",
    (("hash_alg", "sha512"),):
        "sha512:3a1e81eea2e2135b4dd85d13b1d85b04dcd6056227bca6b53357908e353d246e1fb7c4244a9d2f"
        "167192b5cc6a06c7fa1c31dafd73aef4a87e6ea5a013ff9482",
    (("hash_alg", "sha512"), ("salt", "ab")):
        "sha512:866355daa7b204dec5f6760f2c8a05f8ac965920a0801d6521e07c64aaaf8ce81e9f9fecd48e3e"
        "ddad1af2afe3689c0e776a0e598365ca09a7486bfbbf7c74f7",
}
FSVERITY_EMPTY = "sha256:3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
