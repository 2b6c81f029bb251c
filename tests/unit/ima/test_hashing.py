"""The one hash-algorithm table (imafs.ima.hashing) against the kernel's, and every
module that names algorithms resolving through it."""
from __future__ import annotations

import hashlib

import pytest

from imafs.ima import appraise as ap
from imafs.ima import hashing as H
from imafs.ima import policy as P
from imafs.ima import templates as T
from imafs.ima import tpm

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
        assert T.hash_size(a.name) == a.digest_size
        field = T.encode_d_ng(a.name, None)
        assert field == a.name.encode() + b":\0" + bytes(a.digest_size)
    for other in ("SHA256", "sha3_256", "sm3-256", "nosuch"):
        with pytest.raises(ValueError, match="unknown hash algorithm"):
            T.hash_size(other)


def test_policy_appraise_algos_resolve_through_the_table():
    available = H.available_algos()
    assert available == [a.name for a in H.HASH_ALGOS.values() if a.available]
    rule = P.parse_rule("appraise appraise_algos=" + ",".join(reversed(available)))
    assert rule.appraise_algos == tuple(available)      # printed in kernel id order
    for a in H.HASH_ALGOS.values():
        if not a.available:
            with pytest.raises(P.PolicyError, match="unavailable hash algorithm"):
                P.parse_rule(f"appraise appraise_algos={a.name}")
    for alias in ("sha3_256", "SHA256", "sm3-256"):     # the kernel's names only
        with pytest.raises(P.PolicyError, match="unknown hash algorithm"):
            P.parse_rule(f"appraise appraise_algos={alias}")


def test_tpm_banks_are_kernel_names():
    for name, (alg_id, _) in TPM.items():
        assert tpm._bank(name).tpm_alg_id == alg_id
    for other in ("sm3_256", "md5", "nosuch"):
        with pytest.raises(tpm.TPMError, match="unknown PCR bank"):
            tpm._bank(other)
