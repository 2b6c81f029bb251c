"""Unit tests of imafs.ima.hashing: algorithm table, streaming digests, fs-verity trees."""
from __future__ import annotations

import hashlib
import os
import random
import struct
import threading
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imafs.ima import hashing as H
from imafs.ima.hashing import MerkleTree, TreeFormatError, VeritySpec


# ---------------------------------------------------------------------------
# An independent, deliberately naive fs-verity implementation to compare with
# (written from Documentation/filesystems/fsverity.rst, whole file in memory).
# ---------------------------------------------------------------------------

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


@pytest.fixture
def mkfile(tmp_path):
    n = [0]

    def make(data: bytes):
        n[0] += 1
        p = tmp_path / f"f{n[0]}"
        p.write_bytes(data)
        return p
    return make


def fd_of(path):
    return os.open(path, os.O_RDONLY)


def digests_of(path, algos, **kw):
    fd = fd_of(path)
    try:
        return H.hash_fd(fd, algos, **kw)
    finally:
        os.close(fd)


@pytest.fixture(params=["threads", "serial"])
def helpers_mode(request):
    """Run a test with the helper threads allowed, and with none."""
    if request.param == "serial":
        H.set_max_helpers(0)
    yield request.param
    H.set_max_helpers(None)


rng = random.Random(1234)


def rand(n):
    return rng.randbytes(n)


# ---------------------------------------------------------------------------
# Algorithm table
# ---------------------------------------------------------------------------

KERNEL_IDS = {
    "md4": 0, "md5": 1, "sha1": 2, "rmd160": 3, "sha256": 4, "sha384": 5, "sha512": 6,
    "sha224": 7, "rmd128": 8, "rmd256": 9, "rmd320": 10, "wp256": 11, "wp384": 12,
    "wp512": 13, "tgr128": 14, "tgr160": 15, "tgr192": 16, "sm3": 17, "streebog256": 18,
    "streebog512": 19, "sha3-256": 20, "sha3-384": 21, "sha3-512": 22,
}


def test_kernel_ids_and_names():
    for name, i in KERNEL_IDS.items():
        assert H.algo_id(name) == i
        assert H.algo_name(i) == name
        assert H.hash_algo(i).name == name
    assert set(H.HASH_ALGOS) == set(KERNEL_IDS)


def test_digest_sizes():
    sizes = {"md5": 16, "sha1": 20, "rmd160": 20, "sha256": 32, "sha384": 48, "sha512": 64,
             "sha224": 28, "sm3": 32, "streebog256": 32, "streebog512": 64, "sha3-256": 32,
             "sha3-512": 64, "tgr192": 24, "rmd320": 40}
    for name, n in sizes.items():
        assert H.digest_size(name) == n
    for name in H.available_algos():
        assert H.hash_algo(name).new().digest_size == H.digest_size(name)


def test_verity_ids():
    assert H.VERITY_ALGOS == {"sha256": 1, "sha512": 2}
    assert H.VERITY_ALGO_BY_ID[1].name == "sha256"
    assert H.VERITY_ALGO_BY_ID[2].name == "sha512"


def test_aliases_and_unknown():
    assert H.hash_algo("SHA256").name == "sha256"
    assert H.hash_algo("sha3_256").name == "sha3-256"
    assert H.hash_algo("ripemd160").name == "rmd160"
    with pytest.raises(H.HashAlgoError, match="unknown hash algorithm 'foo'"):
        H.hash_algo("foo")
    with pytest.raises(H.HashAlgoError, match="id 99"):
        H.algo_name(99)


def test_common_algorithms_available():
    for name in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512"):
        assert name in H.available_algos()


def test_unavailable_algorithm_reported_cleanly(tmp_path):
    a = H.hash_algo("streebog256")
    assert not a.available
    with pytest.raises(H.UnsupportedAlgorithm, match=r"streebog256 \(kernel id 18\)"):
        a.new()
    p = tmp_path / "x"
    p.write_bytes(b"abc")
    with pytest.raises(H.UnsupportedAlgorithm):
        digests_of(p, ["sha256", "streebog256"])
    with pytest.raises(H.UnsupportedAlgorithm):
        H.hash_bytes(b"abc", ["tgr192"])


def test_sm3_matches_hashlib_when_available():
    if not H.hash_algo("sm3").available:
        pytest.skip("hashlib has no sm3 here")
    assert H.hash_bytes(b"abc", ["sm3"])["sm3"] == hashlib.new("sm3", b"abc").digest()


def test_format_and_parse_digest():
    d = hashlib.sha256(b"x").digest()
    text = H.format_digest("sha256", d)
    assert text == "sha256:" + d.hex()
    assert H.parse_digest(text) == ("sha256", d)
    with pytest.raises(ValueError):
        H.parse_digest("sha256:abcd")
    with pytest.raises(ValueError):
        H.parse_digest("nocolon")


# ---------------------------------------------------------------------------
# Flat digests
# ---------------------------------------------------------------------------

SIZES = [0, 1, 100, 4095, 4096, 4097, 8191, 8192, 3 * 4096 + 7, 65536, 65537,
         (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 12345]


@pytest.mark.parametrize("size", SIZES)
def test_hash_fd_equals_hashlib(size, mkfile, helpers_mode):
    data = rand(size)
    p = mkfile(data)
    algos = ["md5", "sha1", "sha256", "sha512"]
    r = digests_of(p, algos)
    assert r.size == size
    assert r.tree is None
    for a in algos:
        assert r.digests[a] == hashlib.new(a, data).digest(), a
    assert H.hash_bytes(data, algos).digests == r.digests


@pytest.mark.parametrize("chunk", [4096, 8192, 12288, 65536])
@pytest.mark.parametrize("size", [0, 5, 4096, 3 * 4096, 3 * 4096 + 1, 100_000, 333_333])
def test_small_chunks_with_tree(size, chunk, mkfile, helpers_mode):
    """Small chunks push even small files through the threaded path."""
    data = rand(size)
    p = mkfile(data)
    spec = VeritySpec("sha256", 4096)
    r = digests_of(p, ["sha256", "sha1", "sha384"], verity=spec, chunk=chunk)
    for a in ("sha256", "sha1", "sha384"):
        assert r.digests[a] == hashlib.new(a, data).digest()
    assert r.tree.leaves == ref_leaves(data)
    assert r.tree.verity_digest == ref_verity_digest(data)


def test_chunk_rounded_to_block_size(mkfile):
    data = rand(50_000)
    p = mkfile(data)
    spec = VeritySpec("sha256", 8192)
    r = digests_of(p, ["sha256"], verity=spec, chunk=10_000)   # not a multiple of 8192
    assert r.tree.verity_digest == ref_verity_digest(data, bs=8192)
    r = digests_of(p, ["sha256"], verity=spec, chunk=100)      # below one block
    assert r.tree.verity_digest == ref_verity_digest(data, bs=8192)


def test_duplicate_and_aliased_algos(mkfile):
    p = mkfile(b"hello")
    r = digests_of(p, ["sha256", "SHA256", "sha-256"])
    assert list(r.digests) == ["sha256"]
    assert r["sha-256"] == hashlib.sha256(b"hello").digest()
    assert r.text("sha256") == "sha256:" + hashlib.sha256(b"hello").hexdigest()
    assert digests_of(p, "sha1").digests == {"sha1": hashlib.sha1(b"hello").digest()}


def test_no_algorithms(mkfile):
    r = digests_of(mkfile(b"abc"), [])
    assert r.size == 3 and r.digests == {} and r.tree is None


def test_does_not_move_file_offset(mkfile):
    p = mkfile(rand(3 << 20))
    fd = fd_of(p)
    try:
        os.lseek(fd, 17, os.SEEK_SET)
        H.hash_fd(fd, ["sha256"], verity=True)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 17
    finally:
        os.close(fd)


def test_non_regular_files_rejected(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError):
            H.hash_fd(fd, ["sha256"], verity=True)
    finally:
        os.close(fd)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError, match="regular file"):
            H.hash_fd(r, ["sha256"])
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("left", [2 << 20, (2 << 20) + 1000, 100, 0])
def test_file_shrinking_while_hashed(left, mkfile, monkeypatch, helpers_mode):
    """Like IMA: hash up to the size seen at the start; if the file is shorter by
    the time it is read, the result covers (and reports) what was there."""
    data = rand(3 << 20)
    p = mkfile(data)
    real_fstat = os.fstat

    def fstat_before_truncate(fd):      # the size seen before the file shrank
        st = real_fstat(fd)
        return os.stat_result(tuple(st)[:6] + (len(data),) + tuple(st)[7:10])
    fd = fd_of(p)
    try:
        os.truncate(p, left)
        monkeypatch.setattr(H.os, "fstat", fstat_before_truncate)
        r = H.hash_fd(fd, ["sha256"], verity=True, chunk=1 << 19)
    finally:
        os.close(fd)
    assert r.size == left
    assert r["sha256"] == hashlib.sha256(data[:left]).digest()
    assert r.tree.verity_digest == ref_verity_digest(data[:left])


def test_helper_failure_propagates_and_pool_survives(mkfile, monkeypatch):
    data = rand(5 << 20)
    p = mkfile(data)

    class Boom(Exception):
        pass
    calls = []
    real = H._FlatLane.feed

    def feed(self, mv):
        calls.append(threading.current_thread().name)
        if self.name == "sha1" and len(calls) > 3:
            raise Boom()
        return real(self, mv)
    monkeypatch.setattr(H._FlatLane, "feed", feed)
    with pytest.raises(Boom):
        digests_of(p, ["sha256", "sha1"], verity=True)
    monkeypatch.setattr(H._FlatLane, "feed", real)
    r = digests_of(p, ["sha256", "sha1"], verity=True)
    assert r["sha1"] == hashlib.sha1(data).digest()
    assert r.tree.verity_digest == ref_verity_digest(data)


def test_reader_side_failure_waits_for_helpers(mkfile, monkeypatch):
    data = rand(6 << 20)
    p = mkfile(data)
    real = H._TreeLane.feed
    calls = []

    def feed(self, mv):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, mv)
    monkeypatch.setattr(H._TreeLane, "feed", feed)
    with pytest.raises(KeyboardInterrupt):
        digests_of(p, ["sha256", "sha1"], verity=True)
    monkeypatch.setattr(H._TreeLane, "feed", real)
    r = digests_of(p, ["sha256", "sha1"], verity=True)
    assert r["sha1"] == hashlib.sha1(data).digest()
    assert r["sha256"] == hashlib.sha256(data).digest()


def test_flat_lanes_use_helper_threads_for_big_files(mkfile, monkeypatch):
    p = mkfile(rand(4 << 20))
    names = set()
    real = H._FlatLane.feed

    def feed(self, mv):
        names.add(threading.current_thread().name)
        return real(self, mv)
    monkeypatch.setattr(H._FlatLane, "feed", feed)
    digests_of(p, ["sha256"], verity=True)
    assert "imafs-hash" in names


def test_small_files_stay_in_calling_thread(mkfile, monkeypatch):
    p = mkfile(rand(4096))
    names = set()
    real = H._FlatLane.feed

    def feed(self, mv):
        names.add(threading.current_thread().name)
        return real(self, mv)
    monkeypatch.setattr(H._FlatLane, "feed", feed)
    digests_of(p, ["sha256", "sha1", "sha512"], verity=True)
    assert names == {threading.current_thread().name}


def test_concurrent_callers(mkfile):
    """More callers than helpers: everyone gets the right answer."""
    files = [(d, mkfile(d)) for d in (rand(3 << 20), rand((2 << 20) + 5), rand(70_000))]
    errors = []

    def work(i):
        try:
            for _ in range(3):
                data, p = files[i % len(files)]
                r = digests_of(p, ["sha256", "md5"], verity=True, chunk=1 << 18)
                assert r["sha256"] == hashlib.sha256(data).digest()
                assert r["md5"] == hashlib.md5(data).digest()
                assert r.tree.leaves == ref_leaves(data)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_memory_bounded(mkfile):
    size = 48 << 20
    p = mkfile(b"")
    with open(p, "wb") as f:
        for _ in range(size >> 20):
            f.write(rand(1 << 20))
    tracemalloc.start()
    try:
        r = digests_of(p, ["sha256"], verity=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.size == size
    leaves = size // 4096 * 32
    assert peak < 4 * (1 << 20) + 3 * leaves, peak   # two chunks + the tree, not the file


# ---------------------------------------------------------------------------
# fs-verity tree
# ---------------------------------------------------------------------------

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


@pytest.mark.parametrize("params", list(FSVERITY_X))
def test_known_fsverity_vectors(params, mkfile):
    kw = dict(params)
    if "salt" in kw:
        kw["salt"] = bytes.fromhex(kw["salt"])
    spec = VeritySpec(**kw)
    assert H.hash_bytes(b"x", [], verity=spec).tree.verity_digest_text == FSVERITY_X[params]
    fd = fd_of(mkfile(b"x"))
    try:
        assert H.fsverity_digest_text(fd, spec.hash_alg, spec.block_size, spec.salt) \
            == FSVERITY_X[params]
        assert H.fsverity_digest_fd(fd, spec.hash_alg, spec.block_size, spec.salt).hex() \
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
    assert H.hash_bytes(b"", [], verity=True).tree.verity_digest_text == FSVERITY_EMPTY


def test_one_block_file_has_no_levels():
    data = rand(4096)
    t = H.hash_bytes(data, [], verity=True).tree
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
    ar = H.aligned_range
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
    t = H.hash_bytes(rand(10_000), [], verity=True).tree
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
    t = H.hash_bytes(data, [], verity=True).tree
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
    t2 = H.hash_bytes(data[:2 * bs], [], verity=True).tree
    r = t2.verify_range(bs, data[bs:2 * bs + 1])
    assert (r.ok, r.first_bad_block, r.expected) == (False, 2, b"")


def test_verify_read(mkfile):
    bs = 4096
    data = rand(5 * bs + 123)
    p = mkfile(data)
    t = H.hash_bytes(data, [], verity=True).tree
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
    blob = H.hash_bytes(rand(9000), [], verity=True).tree.to_bytes()
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


# ---------------------------------------------------------------------------
# CLI (in process)
# ---------------------------------------------------------------------------

def run_cli(argv, capsysbinary):
    from imafs.cli import main
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsysbinary.readouterr()
    return rc, out.decode(), err.decode()


def test_cli_flat(mkfile, capsysbinary):
    p = mkfile(b"abc")
    rc, out, err = run_cli(["digest", str(p)], capsysbinary)
    assert rc == 0 and err == ""
    assert out == f"sha256:{hashlib.sha256(b'abc').hexdigest()}  {p}\n"
    rc, out, _ = run_cli(["digest", "--algo", "sha1", "--algo", "sha512", str(p), str(p)],
                         capsysbinary)
    assert rc == 0
    assert out.splitlines() == [f"sha1:{hashlib.sha1(b'abc').hexdigest()}  {p}",
                                f"sha512:{hashlib.sha512(b'abc').hexdigest()}  {p}"] * 2
    rc, out, _ = run_cli(["digest", "--compact", str(p)], capsysbinary)
    assert out == hashlib.sha256(b"abc").hexdigest() + "\n"


def test_cli_verity(mkfile, capsysbinary):
    p = mkfile(b"x")
    rc, out, err = run_cli(["digest", "--verity", str(p)], capsysbinary)
    assert (rc, err) == (0, "")
    assert out == f"{FSVERITY_X[()]} {p}\n"
    rc, out, _ = run_cli(["digest", "--verity", "--hash-alg=sha512", "--salt=AB", str(p)],
                         capsysbinary)
    assert out == f"{FSVERITY_X[(('hash_alg', 'sha512'), ('salt', 'ab'))]} {p}\n"
    rc, out, _ = run_cli(["digest", "--verity", "--block-size", "1024", str(p)], capsysbinary)
    assert out == f"{FSVERITY_X[(('block_size', 1024),)]} {p}\n"


def test_cli_errors_continue_and_exit_1(mkfile, tmp_path, capsysbinary):
    good = mkfile(b"abc")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    missing = tmp_path / "missing"
    rc, out, err = run_cli(["digest", "--verity", str(missing), str(tmp_path), str(fifo),
                            str(good)], capsysbinary)
    assert rc == 1
    assert out.count("\n") == 1 and out.endswith(f" {good}\n")
    lines = err.splitlines()
    assert lines == [f"imafs digest: {missing}: No such file or directory",
                     f"imafs digest: {tmp_path}: Is a directory",
                     f"imafs digest: {fifo}: not a regular file"]


@pytest.mark.parametrize("args,msg", [
    (["--verity", "--block-size", "32"], "block size"),
    (["--verity", "--hash-alg", "sha512", "--block-size", "64"], "too small"),
    (["--verity", "--block-size", "3000"], "block size"),
    (["--verity", "--salt", "abc"], "hex"),
    (["--verity", "--salt", "00" * 33], "at most 32"),
    (["--verity", "--hash-alg", "md5"], "sha256, sha512"),
    (["--algo", "nosuch"], "unknown hash algorithm"),
    (["--algo", "streebog512"], "not available"),
    (["--salt", "ab"], "only with --verity"),
    (["--verity", "--algo", "sha1"], "cannot be combined"),
])
def test_cli_usage_errors(args, msg, mkfile, capsysbinary):
    p = mkfile(b"abc")
    rc, out, err = run_cli(["digest", *args, str(p)], capsysbinary)
    assert rc == 2 and out == ""
    assert msg in err


def test_cli_non_utf8_name(tmp_path, capsysbinary):
    name = os.fsdecode(b"caf\xe9")
    p = tmp_path / name
    p.write_bytes(b"abc")
    from imafs.cli import main
    assert main(["digest", str(p)]) == 0
    out = capsysbinary.readouterr().out
    assert out.endswith(b"caf\xe9\n")
