"""imafs.ima.hashing: the one hash-algorithm table against the kernel's (and every
module that names algorithms resolving through it), and hash_fd's one streaming pass
(flat digests and the fs-verity tree, inline and in helper threads)."""
from __future__ import annotations

import hashlib
import os
import random
import threading
import tracemalloc

import pytest

from helpers.fsverity_ref import ref_leaves, ref_verity_digest
from imafs.ima import verity as V
from imafs.ima.verity import VeritySpec

from imafs.ima import appraise as ap
from imafs.ima import hashing as H
from imafs.ima import policy_parse as PP
from imafs.ima.policy import PolicyError
from imafs.ima import template_lib as TL
from imafs.ima import tpm


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

# include/uapi/linux/hash_info.h (enum hash_algo) and crypto/hash_info.c
# (hash_algo_name[], hash_digest_size[]), written out here independently of the table
KERNEL = [
    ("md4", 16), ("md5", 16), ("sha1", 20), ("rmd160", 20), ("sha256", 32),
    ("sha384", 48), ("sha512", 64), ("sha224", 28), ("rmd128", 16), ("rmd256", 32),
    ("rmd320", 40), ("wp256", 32), ("wp384", 48), ("wp512", 64), ("tgr128", 16),
    ("tgr160", 20), ("tgr192", 24), ("sm3", 32), ("streebog256", 32),
    ("streebog512", 64), ("sha3-256", 32), ("sha3-384", 48), ("sha3-512", 64),
]
# TCG algorithm registry: TPM2_ALG_ID and the bank's name in tpm2-tools
TPM = {"sha1": (0x0004, "sha1"), "sha256": (0x000B, "sha256"), "sha384": (0x000C, "sha384"),
       "sha512": (0x000D, "sha512"), "sm3": (0x0012, "sm3_256"),
       "sha3-256": (0x0027, "sha3_256"), "sha3-384": (0x0028, "sha3_384"),
       "sha3-512": (0x0029, "sha3_512")}


def test_ids_names_and_sizes_are_the_kernels():
    assert H.HASH_ALGO__LAST == len(KERNEL)
    assert list(H.HASH_ALGOS) == [name for name, _ in KERNEL]
    for i, (name, size) in enumerate(KERNEL):
        a = H.HASH_ALGO_BY_ID[i]
        assert (a.name, a.ima_id, a.digest_size) == (name, i, size)
        assert H.kernel_algo(name) is a is H.hash_algo(name) is H.hash_algo(i)
        assert (H.algo_id(name), H.algo_name(i), H.digest_size(name)) == (i, name, size)


def test_aliases_are_unambiguous_and_resolve():
    seen: dict[str, str] = {}
    for a in H.HASH_ALGOS.values():
        for alias in a.aliases:
            assert alias not in H.HASH_ALGOS and alias not in seen, alias
            seen[alias] = a.name
            assert H.hash_algo(alias) is a and H.hash_algo(alias.upper()) is a
    # the spellings other tools use
    for alias, name in {"sm3-256": "sm3", "sm3_256": "sm3", "whirlpool": "wp512",
                        "ripemd160": "rmd160", "sha3_256": "sha3-256",
                        "md_gost12_256": "streebog256", "md_gost12_512": "streebog512"}.items():
        assert H.hash_algo(alias).name == name
    # the kernel's own formats take only its names
    for alias in seen:
        with pytest.raises(H.HashAlgoError):
            H.kernel_algo(alias)


def test_hashlib_constructors_match_the_sizes():
    for a in H.HASH_ALGOS.values():
        if a.available:
            assert a.new(b"abc").digest_size == a.digest_size
            assert a.new(b"abc").digest() == hashlib.new(a.hashlib_name, b"abc").digest()
        else:
            with pytest.raises(H.UnsupportedAlgorithm, match=a.name):
                a.new()
    for name in ("md5", "sha1", "sha224", "sha256", "sha384", "sha512",
                 "sha3-256", "sha3-384", "sha3-512"):
        assert H.hash_algo(name).available


def test_signature_hashes_match_the_sizes():
    with_crypto = [a for a in H.HASH_ALGOS.values() if a.crypto_name]
    assert {a.name for a in with_crypto} >= {"sha1", "sha256", "sha384", "sha512", "sm3"}
    for a in with_crypto:
        assert a.crypto_hash().digest_size == a.digest_size
    with pytest.raises(H.HashAlgoError, match="signatures with hash algorithm md4"):
        H.hash_algo("md4").crypto_hash()


def test_verity_and_tpm_ids():
    assert H.VERITY_ALGOS == {"sha256": 1, "sha512": 2}
    assert {i: a.name for i, a in H.VERITY_ALGO_BY_ID.items()} == {1: "sha256", 2: "sha512"}
    got = {a.name: (a.tpm_alg_id, a.tpm_name) for a in H.HASH_ALGOS.values() if a.tpm_alg_id}
    assert got == TPM
    assert {i: a.name for i, a in H.TPM_ALGO_BY_ID.items()} == {i: n for n, (i, _) in TPM.items()}


def test_xattr_algorithm_ids_resolve_through_the_table():
    for a in H.HASH_ALGOS.values():
        digest = bytes(range(a.digest_size))
        value = ap.hash_xattr(a.name, digest)
        if a.name == "md4":     # the legacy 0x01 form, as the kernel writes it: read as md5
            assert value[0] == ap.IMA_XATTR_DIGEST
            continue
        x = ap.parse_ima_xattr(value)
        assert (x.algo, x.digest, x.algo_id) == (a.name, digest, a.ima_id)
        assert ap.needed_algo(value) == a.name
    with pytest.raises(ap.XattrError, match=f"kernel ids are 0..{H.HASH_ALGO__LAST - 1}"):
        ap.parse_ima_xattr(bytes([4, H.HASH_ALGO__LAST]) + bytes(32))
    assert ap.UnsupportedHashError is H.HashAlgoError
    assert ap.hash_algo is H.hash_algo and ap.new_hash is H.new_hash


def test_template_digest_sizes_come_from_the_table():
    for a in H.HASH_ALGOS.values():
        assert TL.hash_size(a.name) == a.digest_size
        field = TL.encode_d_ng(a.name, None)
        assert field == a.name.encode() + b":\0" + bytes(a.digest_size)
    for other in ("SHA256", "sha3_256", "sm3-256", "nosuch"):
        with pytest.raises(ValueError, match="unknown hash algorithm"):
            TL.hash_size(other)


def test_policy_appraise_algos_resolve_through_the_table():
    available = H.available_algos()
    assert available == [a.name for a in H.HASH_ALGOS.values() if a.available]
    rule = PP.parse_rule("appraise appraise_algos=" + ",".join(reversed(available)))
    assert rule.appraise_algos == tuple(available)      # printed in kernel id order
    for a in H.HASH_ALGOS.values():
        if not a.available:
            with pytest.raises(PolicyError, match="unavailable hash algorithm"):
                PP.parse_rule(f"appraise appraise_algos={a.name}")
    for alias in ("sha3_256", "SHA256", "sm3-256"):     # the kernel's names only
        with pytest.raises(PolicyError, match="unknown hash algorithm"):
            PP.parse_rule(f"appraise appraise_algos={alias}")


def test_tpm_banks_are_kernel_names():
    for name, (alg_id, _) in TPM.items():
        assert tpm._bank(name).tpm_alg_id == alg_id
    for other in ("sm3_256", "md5", "nosuch"):
        with pytest.raises(tpm.TPMError, match="unknown PCR bank"):
            tpm._bank(other)


def test_unknown_names_and_ids_are_refused_with_what_was_asked():
    with pytest.raises(H.HashAlgoError, match="unknown hash algorithm 'foo'"):
        H.hash_algo("foo")
    with pytest.raises(H.HashAlgoError, match="id 99"):
        H.algo_name(99)


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
# hash_fd: one pass, flat digests and the fs-verity tree
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
        H.hash_fd(fd, ["sha256"], verity=VeritySpec())
        assert os.lseek(fd, 0, os.SEEK_CUR) == 17
    finally:
        os.close(fd)


def test_non_regular_files_rejected(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(IsADirectoryError):
            H.hash_fd(fd, ["sha256"], verity=VeritySpec())
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
        r = H.hash_fd(fd, ["sha256"], verity=VeritySpec(), chunk=1 << 19)
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
        digests_of(p, ["sha256", "sha1"], verity=VeritySpec())
    monkeypatch.setattr(H._FlatLane, "feed", real)
    r = digests_of(p, ["sha256", "sha1"], verity=VeritySpec())
    assert r["sha1"] == hashlib.sha1(data).digest()
    assert r.tree.verity_digest == ref_verity_digest(data)


def test_reader_side_failure_waits_for_helpers(mkfile, monkeypatch):
    data = rand(6 << 20)
    p = mkfile(data)
    real = V.TreeLane.feed
    calls = []

    def feed(self, mv):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, mv)
    monkeypatch.setattr(V.TreeLane, "feed", feed)
    with pytest.raises(KeyboardInterrupt):
        digests_of(p, ["sha256", "sha1"], verity=VeritySpec())
    monkeypatch.setattr(V.TreeLane, "feed", real)
    r = digests_of(p, ["sha256", "sha1"], verity=VeritySpec())
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
    digests_of(p, ["sha256"], verity=VeritySpec())
    assert "imafs-hash" in names


def test_small_files_stay_in_calling_thread(mkfile, monkeypatch):
    p = mkfile(rand(4096))
    names = set()
    real = H._FlatLane.feed

    def feed(self, mv):
        names.add(threading.current_thread().name)
        return real(self, mv)
    monkeypatch.setattr(H._FlatLane, "feed", feed)
    digests_of(p, ["sha256", "sha1", "sha512"], verity=VeritySpec())
    assert names == {threading.current_thread().name}


def test_concurrent_callers(mkfile):
    """More callers than helpers: everyone gets the right answer."""
    files = [(d, mkfile(d)) for d in (rand(3 << 20), rand((2 << 20) + 5), rand(70_000))]
    errors = []

    def work(i):
        try:
            for _ in range(3):
                data, p = files[i % len(files)]
                r = digests_of(p, ["sha256", "md5"], verity=VeritySpec(), chunk=1 << 18)
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
        r = digests_of(p, ["sha256"], verity=VeritySpec())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.size == size
    leaves = size // 4096 * 32
    assert peak < 4 * (1 << 20) + 3 * leaves, peak   # two chunks + the tree, not the file
