"""Digest lists without a mount: the DIGLIM compact format with imafs's provenance
(imafs/ima/digest_lists.py) and the LMDB index (imafs/ima/digest_index.py)."""
from __future__ import annotations

import hashlib
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imafs.ima import digest_lists as dl
from imafs.ima import hashing
from imafs.ima.digest_index import DigestListIndex, IndexError_
from imafs.store import Store


def sha(i: int | bytes, algo: str = "sha256") -> bytes:
    data = i if isinstance(i, bytes) else i.to_bytes(4, "little")
    return hashing.hash_algo(algo).new(data).digest()


def hdr(version=1, reserved=0, type=1, mods=0, algo=4, count=1, datalen=32) -> bytes:
    return struct.pack("<BBHHHII", version, reserved, type, mods, algo, count, datalen)


# ----------------------------------------------------------------------- format

def test_header_layout_is_diglim():
    b = dl.Block.of(dl.COMPACT_FILE, "sha256", [sha(1), sha(2)], modifiers=dl.MOD_IMMUTABLE)
    raw = dl.DigestList([b]).to_bytes()
    assert raw[:16] == bytes([1, 0, 1, 0, 1, 0, 4, 0, 2, 0, 0, 0, 64, 0, 0, 0])
    assert raw[16:] == sha(1) + sha(2)
    assert len(raw) == 16 + 64


def test_types_and_algos_from_the_one_table():
    assert (dl.COMPACT_PARSER, dl.COMPACT_FILE, dl.COMPACT_METADATA,
            dl.COMPACT_DIGEST_LIST) == (0, 1, 2, 3)
    b = dl.Block.of("metadata", "sha512", [sha(1, "sha512")])
    raw = b.header()
    assert struct.unpack_from("<H", raw, 6)[0] == hashing.algo_id("sha512") == 6
    assert dl.parse(raw + b.digests).blocks[0].algo == "sha512"


def test_bare_and_provenance_forms_round_trip():
    blocks = [dl.Block.of(1, "sha256", [sha(i) for i in range(3)]),
              dl.Block.of(0, "sha1", [sha(9, "sha1")])]
    prov = dl.Provenance("debian", generator="test", archives=({"suite": "bookworm",
                                                                "signed_by": ["AB"]},),
                         keys=("AB",), packages=(dl.Package("bash", "5.2", 0, arch="amd64",
                                                            files=3, archive=0),),
                         missing=({"name": "x", "version": "1", "reason": "gone"},))
    for lst in (dl.DigestList(blocks), dl.DigestList(blocks, prov)):
        raw = lst.to_bytes()
        back = dl.parse(raw)
        assert back == lst
        assert back.to_bytes() == raw
        assert back.compact_bytes() == dl.DigestList(blocks).to_bytes()
    assert dl.parse(dl.DigestList(blocks, prov).to_bytes()).package_of_block(0).label() \
        == "bash 5.2 (amd64)"
    assert dl.DigestList(blocks, prov).to_bytes().startswith(dl.MAGIC)


def test_empty_list_is_valid():
    assert dl.parse(b"").blocks == ()
    assert dl.parse(dl.DigestList([], dl.Provenance("rpm")).to_bytes()).count == 0


blocks_st = st.lists(
    st.builds(lambda t, a, n, m, seed: dl.Block.of(t, a, [sha(seed + i, a) for i in range(n)],
                                                   modifiers=m),
              st.sampled_from([0, 1, 2]), st.sampled_from(["sha1", "sha256", "sha512", "md5"]),
              st.integers(0, 20), st.sampled_from([0, 1]), st.integers(0, 1 << 20)),
    max_size=6)


@settings(max_examples=200, deadline=None)
@given(blocks_st, st.booleans(), st.text(max_size=20))
def test_round_trip_property(blocks, with_prov, name):
    prov = None
    if with_prov:
        prov = dl.Provenance("debian", generator=name, packages=tuple(
            dl.Package(name or "p", f"{i}", i) for i in range(len(blocks))))
    lst = dl.DigestList(blocks, prov)
    raw = lst.to_bytes()
    assert dl.parse(raw) == lst
    assert sum(1 for _ in dl.parse(raw).digests()) == lst.count


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(blocks_st.filter(bool), st.data())
def test_any_corruption_is_refused_whole_or_parses_consistently(blocks, data):
    """A byte changed or the list cut anywhere: either the parser refuses the whole
    list with an offset inside the input, or what it returns re-serializes to exactly
    the input (nothing is half-read or silently dropped)."""
    raw = bytearray(dl.DigestList(blocks).to_bytes())
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    else:
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    try:
        back = dl.parse(bytes(raw))
    except dl.DigestListError as e:
        assert 0 <= e.offset <= len(raw)
        assert str(e).startswith(f"byte {e.offset}: ") and e.reason
        return
    assert back.to_bytes() == bytes(raw)


@pytest.mark.parametrize("raw, offset, words", [
    (hdr()[:10], 0, "10 bytes left"),
    (hdr(version=2) + sha(1), 0, "version byte 2"),
    (hdr() + sha(1) + hdr(version=2), 48, "block version 2"),
    (hdr(reserved=7) + sha(1), 1, "reserved byte is 7"),
    (hdr(type=4) + sha(1), 2, "unknown type 4"),
    (hdr(type=3) + sha(1), 2, "not allowed inside a list"),
    (hdr(mods=2) + sha(1), 4, "unknown modifier bits 0x2"),
    (hdr(algo=99) + sha(1), 6, "unknown hash algorithm id 99"),
    (hdr(count=2, datalen=32) + sha(1), 12, "datalen 32 is not 2 sha256 digests"),
    (hdr(count=2, datalen=64) + sha(1), 48, "needs 64 bytes"),
    (hdr() + sha(1) + hdr(algo=2, datalen=20) + sha(1, "sha1") + hdr(reserved=1), 85,
     "reserved byte"),
    (b"\x00" + bytes(15), 0, "version byte 0"),
    (b"IMAFSDL1\x05\x00\x00\x00{}", 14, "runs past the end"),
    (b"IMAFSDL1\x02\x00\x00\x00[]", 12, "not a JSON object"),
    (b"IMAFSDL1\x02\x00\x00\x00{}", 12, "format None is not 1"),
    (b"IMAFSDL1\x03\x00\x00\x00{\"a", 13, "not JSON"),
    (b"IMAFSDL1\x02\x00\x00\x00\xff\xfe", 12, "not UTF-8"),
    (b"IMAFS", 5, "truncated in the imafs magic"),
])
def test_malformed_lists_name_the_byte(raw, offset, words):
    with pytest.raises(dl.DigestListError) as ei:
        dl.parse(raw)
    assert ei.value.offset == offset, str(ei.value)
    assert words in str(ei.value)


def prov_list(prov_json: bytes, nblocks: int = 1) -> bytes:
    body = b"".join(hdr() + sha(i) for i in range(nblocks))
    return dl.MAGIC + struct.pack("<I", len(prov_json)) + prov_json + body


@pytest.mark.parametrize("prov, words", [
    (b'{"format":1,"source":"debian","packages":[{"name":"a","version":"1","block":1}]}',
     "names block 1, the list has 1"),
    (b'{"format":1,"source":"debian","packages":[{"name":"a","version":"1","block":0},'
     b'{"name":"b","version":"1","block":0}]}', "names block 0 a second time"),
    (b'{"format":1,"source":"debian","packages":[{"name":"a","version":1,"block":0}]}',
     "version is not a str"),
    (b'{"format":1,"source":"debian","packages":[{"name":"a","version":"1","block":0,'
     b'"archive":3}]}', "names archive 3"),
    (b'{"format":1,"source":""}', "no source"),
    (b'{"format":1,"source":"x","keys":[1]}', "keys must be strings"),
    (b'{"format":1,"source":"x","packages":{}}', "packages is not a list"),
])
def test_bad_provenance_is_refused(prov, words):
    with pytest.raises(dl.DigestListError) as ei:
        dl.parse(prov_list(prov))
    assert ei.value.offset == 12 and words in str(ei.value)


def test_oversized_list_is_refused():
    with pytest.raises(dl.DigestListError, match="over"):
        dl.parse(memoryview(bytearray(dl.MAX_LIST_SIZE + 1)))


def test_block_checks_its_digests():
    with pytest.raises(ValueError, match="whole number"):
        dl.Block(dl.COMPACT_FILE, "sha256", b"x" * 31)
    with pytest.raises(ValueError, match="type 3"):
        dl.Block(dl.COMPACT_DIGEST_LIST, "sha256", b"")
    with pytest.raises(hashing.HashAlgoError):
        dl.Block(dl.COMPACT_FILE, "crc32", b"")


# ----------------------------------------------------------------------- index

@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "state"), sync=False)
    yield s
    s.close()


def make_list(pkgs: dict[str, list[bytes]], source="debian") -> bytes:
    blocks, packages = [], []
    for i, (name, digests) in enumerate(pkgs.items()):
        blocks.append(dl.Block.of(dl.COMPACT_FILE, "sha256", digests))
        packages.append(dl.Package(name, "1.0-1", i, files=len(digests)))
    return dl.DigestList(blocks, dl.Provenance(source, packages=tuple(packages))).to_bytes()


def test_add_lookup_query_remove(store):
    idx = DigestListIndex(store, 0)
    a = make_list({"bash": [sha(1), sha(2)], "coreutils": [sha(3)]})
    b = make_list({"dash": [sha(3), sha(4)]})
    ia = idx.add("a.list", a, actions=dl.ACTION_MEASURED | dl.ACTION_APPRAISED)
    assert ia.count == 3 and ia.label == "a.list" and ia.digest == hashlib.sha256(a).digest()
    idx.add("b.list", b, actions=dl.ACTION_MEASURED)
    assert idx.count() == 4
    assert idx.counts() == {0: 0, 1: 4, 2: 0, 3: 2}

    hit = idx.lookup("sha256", sha(1))
    assert hit.actions == dl.ACTION_MEASURED | dl.ACTION_APPRAISED
    assert idx.describe(hit) == "a.list (from bash 1.0-1)"
    # a digest in both lists: the OR of their actions; query names both
    assert idx.lookup("sha256", sha(3)).actions == 3
    refs = idx.query("sha256", sha(3))
    assert [r.describe() for r in refs] == ["a.list (from coreutils 1.0-1)",
                                            "b.list (from dash 1.0-1)"]
    assert refs[0].list.describe_block(refs[0].block) == (
        "a.list (actions: 3): version: 1, algo: sha256, type: 1, modifiers: 0, count: 1, "
        "datalen: 32")
    assert idx.lookup("sha256", sha(5)) is None
    assert idx.lookup("sha256", sha(1), dl.COMPACT_PARSER) is None
    # the list's own digest answers a query, as DIGLIM's digest_list type
    own = idx.query("sha256", hashlib.sha256(b).digest())
    assert [(r.list.label, r.type) for r in own] == [("b.list", dl.COMPACT_DIGEST_LIST)]

    idx.remove("a.list")
    assert idx.lookup("sha256", sha(1)) is None
    assert idx.lookup("sha256", sha(3)).actions == dl.ACTION_MEASURED  # b still holds it
    assert idx.count() == 2 and [i.label for i in idx.lists()] == ["b.list"]
    idx.remove("b.list")
    assert idx.count() == 0 and idx.lists() == [] and idx.lookup("sha256", sha(3)) is None


def test_refusals(store):
    idx = DigestListIndex(store, 0)
    a = make_list({"bash": [sha(1)]})
    idx.add("a.list", a, actions=dl.ACTION_MEASURED)
    with pytest.raises(IndexError_, match="already loaded") as ei:
        idx.add("a.list", make_list({"x": [sha(2)]}), actions=0)
    assert ei.value.errno == 17
    with pytest.raises(IndexError_, match="same list is already loaded as 'a.list'"):
        idx.add("copy.list", a, actions=0)
    with pytest.raises(IndexError_, match="bad.list: byte 16: 1 bytes left") as ei:
        idx.add("bad.list", b"\x01" + bytes(15) + b"x", actions=0)
    assert ei.value.errno == 22
    assert idx.get("bad.list") is None and idx.count() == 1    # nothing half-loaded
    for label in ("", "a/b", "..", "x\ny", "x" * 256):
        with pytest.raises(IndexError_, match="not a digest list name"):
            idx.add(label, make_list({}), actions=0)
    with pytest.raises(IndexError_, match="no digest list named") as ei:
        idx.remove("nope")
    assert ei.value.errno == 2
    # a list added measured cannot be removed unmeasured (DIGLIM)
    with pytest.raises(IndexError_, match="loaded measured; removing it none") as ei:
        idx.remove("a.list", actions=0)
    assert ei.value.errno == 1 and idx.get("a.list") is not None
    idx.remove("a.list", actions=dl.ACTION_MEASURED)


def test_namespaces_are_separate_and_the_index_survives_a_remount(tmp_path):
    s = Store(str(tmp_path / "st"), sync=False)
    root, child = DigestListIndex(s, 0), DigestListIndex(s, 7)
    child.add("c.list", make_list({"app": [sha(1), sha(2)]}), actions=dl.ACTION_APPRAISED)
    root.add("r.list", make_list({"sys": [sha(2), sha(3)]}), actions=dl.ACTION_MEASURED)
    assert root.lookup("sha256", sha(1)) is None            # a child's list: not the host's
    assert child.lookup("sha256", sha(3)) is None
    assert root.lookup("sha256", sha(2)).actions == dl.ACTION_MEASURED
    s.close()
    s = Store(str(tmp_path / "st"), sync=False)
    root, child = DigestListIndex(s, 0), DigestListIndex(s, 7)
    assert child.lookup("sha256", sha(1)).actions == dl.ACTION_APPRAISED
    assert root.describe(root.lookup("sha256", sha(3))) == "r.list (from sys 1.0-1)"
    assert [i.label for i in root.lists()] == ["r.list"] and root.count() == 2
    assert child.clear() == 1
    assert child.lookup("sha256", sha(1)) is None and child.count() == 0
    assert child.lists() == []
    assert root.lookup("sha256", sha(2)) is not None and root.count() == 2
    # ids keep growing after a remount: a new list never takes an old one's id
    nid = root.add("n.list", make_list({"n": [sha(9)]}), actions=0).id
    assert nid > root.get("r.list").id
    s.close()


def test_bare_list_and_repeats(store):
    idx = DigestListIndex(store, 0)
    raw = dl.DigestList([dl.Block.of(1, "sha256", [sha(1), sha(1)]),
                         dl.Block.of(1, "sha256", [sha(1)]),
                         dl.Block.of(0, "sha512", [sha(1, "sha512")])]).to_bytes()
    idx.add("bare", raw, actions=dl.ACTION_APPRAISED_DIGSIG)
    assert idx.counts()[1] == 1 and idx.counts()[0] == 1
    assert idx.describe(idx.lookup("sha256", sha(1))) == "bare"
    assert idx.lookup("sha512", sha(1, "sha512"), dl.COMPACT_PARSER).actions == 4
    idx.remove("bare")
    assert idx.count() == 0 and idx.lookup("sha256", sha(1)) is None


def test_scale_sanity(store):
    """Far from the goal (2 s to load, a few microseconds a lookup): only a bound that
    catches an accidental quadratic or a transaction per digest; the real figures are
    in scripts/bench.py and docs/digest-lists.md."""
    n = 100_000
    digests = [sha(i) for i in range(n)]
    raw = dl.DigestList([dl.Block.of(1, "sha256", digests[i:i + 100])
                         for i in range(0, n, 100)]).to_bytes()
    idx = DigestListIndex(store, 0)
    t = time.perf_counter()
    idx.add("big.list", raw, actions=3)
    assert time.perf_counter() - t < 20
    assert idx.count() == n
    t = time.perf_counter()
    for d in digests[:5000]:
        assert idx.lookup("sha256", d) is not None
    assert (time.perf_counter() - t) / 5000 < 1e-3    # ~5-9 us alone; a quadratic index would be far over
