"""imafs.ima.verity: the fs-verity Merkle tree (layout, digest, descriptor),
verification of reads against it, its cache blob, against a naive reference
implementation and `fsverity digest`'s own output."""
from __future__ import annotations

import hashlib
import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers.fsverity_ref import (FSVERITY_EMPTY, FSVERITY_X, ref_leaves, ref_levels,
                                  ref_verity_digest)
from imafs.ima import hashing as H
from imafs.ima import verity as V
from imafs.ima.verity import MerkleTree, TreeFormatError, VeritySpec


def fd_of(path):
    return os.open(path, os.O_RDONLY)


def digests_of(path, algos, **kw):
    fd = fd_of(path)
    try:
        return H.hash_fd(fd, algos, **kw)
    finally:
        os.close(fd)


rng = random.Random(1234)


def rand(n):
    return rng.randbytes(n)


@pytest.mark.parametrize("params", list(FSVERITY_X))
def test_known_fsverity_vectors(params, mkfile):
    kw = dict(params)
    if "salt" in kw:
        kw["salt"] = bytes.fromhex(kw["salt"])
    spec = VeritySpec(**kw)
    assert H.hash_bytes(b"x", [], verity=spec).tree.verity_digest_text == FSVERITY_X[params]
    fd = fd_of(mkfile(b"x"))
    try:
        assert V.fsverity_digest_text(fd, spec.hash_alg, spec.block_size, spec.salt) \
            == FSVERITY_X[params]
        assert V.fsverity_digest_fd(fd, spec.hash_alg, spec.block_size, spec.salt).hex() \
            == FSVERITY_X[params].split(":")[1]
    finally:
        os.close(fd)


def test_empty_file_tree(mkfile):
    for alg in ("sha256", "sha512"):
        t = digests_of(mkfile(b""), [], verity=VeritySpec(alg)).tree
        assert t.root_hash == bytes(H.digest_size(alg))
        assert t.levels == [] and t.num_levels == 0
        assert t.num_blocks == 0 and t.leaves == b""
        assert t.tree_bytes() == b""
        assert t.verity_digest == ref_verity_digest(b"", alg)
    assert H.hash_bytes(b"", [], verity=VeritySpec()).tree.verity_digest_text == FSVERITY_EMPTY


def test_one_block_file_has_no_levels():
    data = rand(4096)
    t = H.hash_bytes(data, [], verity=VeritySpec()).tree
    assert t.levels == []
    assert t.root_hash == hashlib.sha256(data).digest() == t.block_hash(0)


@pytest.mark.parametrize("alg,bs,salt", [
    ("sha256", 4096, b""), ("sha256", 1024, b"\x01\x02\x03"), ("sha512", 1024, b""),
    ("sha512", 4096, b"s" * 32), ("sha256", 65536, b"salt"), ("sha256", 2048, b"x" * 31),
])
@pytest.mark.parametrize("nblocks", [2, 3, 32, 33, 1000, 1025])
def test_tree_layout(alg, bs, salt, nblocks):
    data = rand(nblocks * bs - 11)
    t = H.hash_bytes(data, [], verity=VeritySpec(alg, bs, salt)).tree
    levels, root = ref_levels(data, alg, bs, salt)
    assert t.levels == levels
    assert t.root_hash == root
    assert t.levels[-1] == t.leaves
    assert len(t.levels[0]) <= bs              # the top level fits in one block
    tb = t.tree_bytes()
    assert len(tb) == sum(-(-len(lv) // bs) * bs for lv in levels)
    assert tb[:len(levels[0])] == levels[0]    # top level stored first
    assert t.verity_digest == ref_verity_digest(data, alg, bs, salt)


def test_leaves_equal_direct_block_hashes():
    for alg, bs, salt in [("sha256", 4096, b""), ("sha256", 1024, b"abc"),
                          ("sha512", 2048, b"0123456789abcdef0123456789abcdef")]:
        data = rand(bs * 7 + 5)
        t = H.hash_bytes(data, [], verity=VeritySpec(alg, bs, salt)).tree
        assert t.num_blocks == 8
        hb = hashlib.new(alg).block_size
        padded_salt = salt.ljust(-(-len(salt) // hb) * hb, b"\0") if salt else b""
        for i in range(8):
            block = data[i * bs:(i + 1) * bs]
            want = hashlib.new(alg, padded_salt + block + bytes(bs - len(block))).digest()
            assert t.block_hash(i) == want
            assert t.hash_block(block) == want
        with pytest.raises(IndexError):
            t.block_hash(8)
        with pytest.raises(IndexError):
            t.block_hash(-1)


def test_descriptor_layout():
    data = rand(10_000)
    salt = b"\xaa\xbb\xcc"
    t = H.hash_bytes(data, [], verity=VeritySpec("sha512", 2048, salt)).tree
    d = t.descriptor()
    assert len(d) == 256
    assert d[0] == 1 and d[1] == 2 and d[2] == 11 and d[3] == 3
    assert d[4:8] == b"\0\0\0\0"
    assert struct.unpack_from("<Q", d, 8)[0] == 10_000
    assert d[16:80] == t.root_hash
    assert d[80:112] == salt + bytes(29)
    assert d[112:] == bytes(144)
    assert t.verity_digest == hashlib.sha512(d).digest()
    assert t.verity_digest != hashlib.sha512(t.root_hash).digest()


def test_verity_spec_validation():
    for bs in (0, 32, 3000, 4095, 1 << 27, -4096, True):
        with pytest.raises(ValueError, match="block size"):
            VeritySpec(block_size=bs)
    with pytest.raises(ValueError, match="too small for sha512"):
        VeritySpec("sha512", 64)
    assert VeritySpec("sha256", 64).block_size == 64          # as fsverity-utils allows
    assert VeritySpec("sha512", 1 << 20).block_size == 1 << 20
    with pytest.raises(ValueError, match="salt"):
        VeritySpec(salt=b"x" * 33)
    with pytest.raises(H.HashAlgoError, match="sha256, sha512"):
        VeritySpec("sha1")
    assert VeritySpec("SHA512").hash_alg == "sha512"
    assert VeritySpec(salt=bytearray(b"ab")).salt == b"ab"
    assert VeritySpec() == VeritySpec("sha256", 4096, b"")
    with pytest.raises(TypeError):
        H.hash_bytes(b"", [], verity="sha256")


def test_tree_constructor_checks_leaves():
    spec = VeritySpec()
    with pytest.raises(ValueError):
        MerkleTree(spec, 5000, b"\0" * 32)          # needs 2 leaves
    t = MerkleTree(spec, 5000, ref_leaves(b"\1" * 5000))
    assert t == H.hash_bytes(b"\1" * 5000, [], verity=spec).tree


# ---------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------

def test_aligned_range():
    ar = V.aligned_range
    assert ar(0, 100, 10_000) == (0, 4096)
    assert ar(5000, 10, 10_000) == (4096, 4096)
    assert ar(4095, 2, 10_000) == (0, 8192)
    assert ar(8192, 4096, 10_000) == (8192, 10_000 - 8192)   # clipped at EOF
    assert ar(9000, 1 << 20, 10_000) == (8192, 10_000 - 8192)
    assert ar(10_000, 10, 10_000) == (8192, 0)
    assert ar(20_000, 10, 10_000)[1] == 0
    assert ar(0, 0, 10_000) == (0, 0)
    assert ar(1500, 100, 10_000, 1024) == (1024, 1024)
    with pytest.raises(ValueError):
        ar(-1, 5, 10)
    t = H.hash_bytes(rand(10_000), [], verity=VeritySpec()).tree
    assert t.aligned_range(9000, 50) == (8192, 10_000 - 8192)
    assert t.aligned_range(9000, 50, 20_000) == (8192, 4096)


def test_verify_range_accepts_every_aligned_subrange():
    bs = 1024
    data = rand(5 * bs + 300)
    t = H.hash_bytes(data, [], verity=VeritySpec(block_size=bs)).tree
    for off in range(0, len(data) + 1, 37):
        for size in (1, 100, bs, 3 * bs + 1, len(data)):
            start, length = t.aligned_range(off, size)
            assert start % bs == 0 and start <= off
            if length:
                assert start + length >= min(off + size, len(data))
            assert t.verify_range(start, data[start:start + length]) == (True, None, None, None)
    assert t.verify(0, data).ok


def test_verify_range_detects_every_single_byte_change():
    bs = 1024
    data = bytearray(rand(3 * bs + 100))
    t = H.hash_bytes(bytes(data), [], verity=VeritySpec(block_size=bs, salt=b"s")).tree
    for pos in range(len(data)):
        old = data[pos]
        data[pos] ^= 1 << (pos % 8)
        ok, bad, expected, found = t.verify_range(0, data)
        assert not ok, pos
        blk = pos // bs
        assert bad == blk
        assert expected == t.block_hash(blk)
        assert found == t.hash_block(data[blk * bs:(blk + 1) * bs])
        # the block alone, read at its own offset
        r = t.verify_range(blk * bs, data[blk * bs:(blk + 1) * bs])
        assert not r.ok and r.first_bad_block == blk
        data[pos] = old
    assert t.verify_range(0, data).ok


def test_verify_range_size_rules():
    bs = 4096
    data = rand(2 * bs + 500)
    t = H.hash_bytes(data, [], verity=VeritySpec()).tree
    with pytest.raises(ValueError):
        t.verify_range(100, data[100:])
    assert t.verify_range(bs, b"").ok
    # ends on a block boundary before EOF: fine
    assert t.verify_range(0, data[:bs]).ok
    # ends mid-block before EOF (the tail was cut): bad at that block
    r = t.verify_range(0, data[:bs + 10])
    assert (r.ok, r.first_bad_block) == (False, 1)
    # the file grew by zero bytes: same padded hash, still rejected
    r = t.verify_range(2 * bs, data[2 * bs:] + b"\0" * 10)
    assert (r.ok, r.first_bad_block) == (False, 2)
    assert r.expected == t.block_hash(2)
    # a whole block past the end
    grown = data + bytes(-len(data) % bs) + rand(bs)
    r = t.verify_range(0, grown)
    assert (r.ok, r.first_bad_block) == (False, 2)
    r = t.verify_range(3 * bs, rand(bs))
    assert (r.ok, r.first_bad_block, r.expected) == (False, 3, b"")
    # a tree over an exact number of blocks, data beyond it
    t2 = H.hash_bytes(data[:2 * bs], [], verity=VeritySpec()).tree
    r = t2.verify_range(bs, data[bs:2 * bs + 1])
    assert (r.ok, r.first_bad_block, r.expected) == (False, 2, b"")


def test_verify_read(mkfile):
    bs = 4096
    data = rand(5 * bs + 123)
    p = mkfile(data)
    t = H.hash_bytes(data, [], verity=VeritySpec()).tree
    fd = fd_of(p)
    try:
        for off, size in [(0, 1), (1, 4096), (4095, 2), (5000, 100_000), (len(data) - 1, 10),
                          (len(data), 10), (0, len(data)), (8192, 4096)]:
            res, got = t.verify_read(fd, off, size)
            assert res.ok
            assert got == data[off:off + size]
    finally:
        os.close(fd)
    # modify one byte behind the tree's back
    with open(p, "r+b") as f:
        f.seek(3 * bs + 7)
        f.write(bytes([data[3 * bs + 7] ^ 0xff]))
    fd = fd_of(p)
    try:
        res, _ = t.verify_read(fd, 3 * bs + 100, 10)
        assert (res.ok, res.first_bad_block) == (False, 3)
        assert t.verify_read(fd, 0, 3 * bs)[0].ok
        os.truncate(p, 2 * bs)                   # shrink: missing blocks fail
        res, _ = t.verify_read(fd, 0, len(data))
        assert (res.ok, res.first_bad_block) == (False, 2)
        assert res.expected == t.block_hash(2) and res.found == b""
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Serialisation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 200_000])
@pytest.mark.parametrize("spec", [VeritySpec(), VeritySpec("sha512", 1024, b"pepper"),
                                  VeritySpec("sha256", 65536, b"\0" * 32)])
def test_to_from_bytes_round_trip(size, spec):
    data = rand(size)
    t = H.hash_bytes(data, [], verity=spec).tree
    blob = t.to_bytes()
    assert blob[:4] == b"IMVT" and blob[4] == 1
    # compact: header + salt + digest + one hash per block
    assert len(blob) == 16 + len(spec.salt) + spec.digest_size * (1 + t.num_blocks)
    t2 = MerkleTree.from_bytes(blob)
    assert t2 == t
    assert t2.levels == t.levels and t2.root_hash == t.root_hash
    assert t2.verity_digest == t.verity_digest
    assert t2.spec == spec and t2.data_size == size
    assert MerkleTree.from_bytes(memoryview(blob)) == t
    assert MerkleTree.from_bytes(bytearray(blob)) == t


def test_from_bytes_rejects_every_single_byte_change():
    data = rand(3 * 1024 + 5)
    t = H.hash_bytes(data, [], verity=VeritySpec("sha256", 1024, b"ab")).tree
    blob = bytearray(t.to_bytes())
    for pos in range(len(blob)):
        for bit in (0, 7):
            blob[pos] ^= 1 << bit
            with pytest.raises(TreeFormatError):
                MerkleTree.from_bytes(bytes(blob))
            blob[pos] ^= 1 << bit
    assert MerkleTree.from_bytes(bytes(blob)) == t


def test_from_bytes_messages():
    blob = H.hash_bytes(rand(9000), [], verity=VeritySpec()).tree.to_bytes()
    with pytest.raises(TreeFormatError, match="truncated"):
        MerkleTree.from_bytes(blob[:10])
    with pytest.raises(TreeFormatError, match="expected"):
        MerkleTree.from_bytes(blob[:-1])
    with pytest.raises(TreeFormatError, match="expected"):
        MerkleTree.from_bytes(blob + b"\0")
    with pytest.raises(TreeFormatError, match="magic"):
        MerkleTree.from_bytes(b"XXXX" + blob[4:])
    with pytest.raises(TreeFormatError, match="version 9"):
        MerkleTree.from_bytes(blob[:4] + b"\x09" + blob[5:])
    with pytest.raises(TreeFormatError, match="algorithm id 7"):
        MerkleTree.from_bytes(blob[:5] + b"\x07" + blob[6:])
    with pytest.raises(TreeFormatError, match="block size"):
        MerkleTree.from_bytes(blob[:6] + b"\x05" + blob[7:])
    with pytest.raises(TreeFormatError, match="salt size"):
        MerkleTree.from_bytes(blob[:7] + b"\x21" + blob[8:])
    with pytest.raises(TreeFormatError, match="corrupted"):
        bad = bytearray(blob)
        bad[-1] ^= 1
        MerkleTree.from_bytes(bytes(bad))
    with pytest.raises(TreeFormatError):
        MerkleTree.from_bytes(blob[:8] + struct.pack("<Q", 1 << 62) + blob[16:])
    with pytest.raises(TreeFormatError):
        MerkleTree.from_bytes(12345)
    assert issubclass(TreeFormatError, ValueError)


# ---------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------

specs = st.builds(
    VeritySpec,
    hash_alg=st.sampled_from(["sha256", "sha512"]),
    block_size=st.sampled_from([1024, 2048, 4096, 8192, 65536]),
    salt=st.binary(max_size=32),
)


@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=20_000),
                      st.integers(0, 300_000).map(lambda n: random.Random(n).randbytes(n))),
       spec=specs)
def test_property_tree_matches_reference(data, spec):
    r = H.hash_bytes(data, ["sha256"], verity=spec)
    assert r["sha256"] == hashlib.sha256(data).digest()
    t = r.tree
    levels, root = ref_levels(data, spec.hash_alg, spec.block_size, spec.salt)
    assert t.levels == levels and t.root_hash == root
    assert t.verity_digest == ref_verity_digest(data, spec.hash_alg, spec.block_size, spec.salt)
    assert MerkleTree.from_bytes(t.to_bytes()) == t
    if data:
        assert t.verify_range(0, data).ok


@settings(deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(size=st.integers(0, 600_000), seed=st.integers(0, 2**32),
       chunk=st.sampled_from([4096, 16384, 65536, 1 << 20]),
       spec=specs, serial=st.booleans())
def test_property_hash_fd_matches_hash_bytes(tmp_path, size, seed, chunk, spec, serial):
    data = random.Random(seed).randbytes(size)
    p = tmp_path / "f"
    p.write_bytes(data)
    H.set_max_helpers(0 if serial else None)
    try:
        r = digests_of(p, ["sha256", "md5"], verity=spec, chunk=chunk)
    finally:
        H.set_max_helpers(None)
    assert r == H.hash_bytes(data, ["sha256", "md5"], verity=spec)


@settings(deadline=None, max_examples=120)
@given(data=st.binary(min_size=1, max_size=9000), spec=specs, pos=st.integers(0, 2**31),
       off=st.integers(0, 2**31), size=st.integers(0, 20_000))
def test_property_verify_any_read(data, spec, pos, off, size):
    t = H.hash_bytes(data, [], verity=spec).tree
    off %= len(data) + 1
    start, length = t.aligned_range(off, size)
    assert t.verify_range(start, data[start:start + length]).ok
    if length:
        pos = start + pos % length
        bad = bytearray(data[start:start + length])
        bad[pos - start] ^= 0x80
        r = t.verify_range(start, bad)
        assert not r.ok and r.first_bad_block == pos // spec.block_size


@settings(deadline=None, max_examples=200)
@given(blob=st.one_of(
    st.binary(max_size=300),
    st.builds(lambda tail, head: b"IMVT\x01" + head + tail,
              st.binary(max_size=200), st.binary(min_size=0, max_size=11)),
))
def test_property_from_bytes_never_crashes(blob):
    try:
        t = MerkleTree.from_bytes(blob)
    except TreeFormatError:
        return
    assert MerkleTree.from_bytes(t.to_bytes()) == t


@settings(deadline=None, max_examples=100)
@given(data=st.binary(max_size=5000), spec=specs, pos=st.integers(0, 2**31),
       xor=st.integers(1, 255))
def test_property_from_bytes_rejects_mutations(data, spec, pos, xor):
    blob = bytearray(H.hash_bytes(data, [], verity=spec).tree.to_bytes())
    blob[pos % len(blob)] ^= xor
    with pytest.raises(TreeFormatError):
        MerkleTree.from_bytes(bytes(blob))
