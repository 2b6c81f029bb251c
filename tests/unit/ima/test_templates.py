"""imafs.ima.templates: field encodings, template hashes, ascii/binary records."""
import hashlib
import io
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imafs.ima import template_lib as TL
from imafs.ima import templates as T
from imafs.ima.template_lib import TemplateError
from imafs.ima.templates import (TemplateEntry, build_entry, buf_entry, parse_ascii,
                                 parse_ascii_line, parse_binary, violation_entry)

HYP = settings(deadline=None, max_examples=300,
               suppress_health_check=[HealthCheck.too_slow])


# -- independent re-implementation of the format, for vectors -----------------

def lp(b: bytes) -> bytes:
    return struct.pack("<I", len(b)) + b


def ng_data(algo: str, digest: bytes, path: bytes, *extra: bytes) -> bytes:
    return lp(algo.encode() + b":\0" + digest) + lp(path + b"\0") + b"".join(map(lp, extra))


BOOT_AGGREGATE_NO_TPM = "0adefe762c149c7cec19da62f0da1297fcfbffff"

# Lines from real kernels, as published in keylime's and ima-evm-utils' tests.
KERNEL_LINES = [
    b"10 1e70a3e1af66f42826ad63b761b4cb9c4df195e1 ima-sig sha256:d33d5d13792292e202dbf69a6f1b07bc8a02f01424db8489ba7bb7d43c0290ef /usr/bin/dd 030204f3452d2301009dd340c852f37e35748363586939d4199b6684be27e7c1236ca1528f708372ed9cd52a0d991f66448790f5616ed5bd7f9bbd22193b1e3e54f6bf29a1497945a34d1b418b24f4cbeaef897bf3cebca27065ebb8761b46bc2662fe76f141245b9186a5ac8493c7f4976cf0d6dfc085c3e503e3f771bc3ccb121230db76fd8aba4f45f060ad64ab3afd99b4e52824b9eba12e93e46f9dcb2fa01d9cef89f298a0da02a82a4fb56924afd3e3c277a1302d99f770d488449df2d43eb5b174a0a528827e6877b965c2f0b7c89cf1aa26a7417a892df4c2294e2872d62748b72ea04ecb0689b5d792e615a9bf9d56f6e0f298560bf9441df0a22729c5f23389f028c25f",
    b"10 5d4d5141ccd5066d50dc3f21d79ba02fedc24256 ima-sig sha256:b8ae0b8dd04a5935cd8165aa2260cd11b658bd71629bdb52256a675a1f73907b /usr/bin/zmore 030204531f402500483046022100fe24678d21083ead47660e1a2d553a592d777c478d1b0466de6ed484b54956b3022100cad3adb37f277bbb03544d6107751b4cd4f2289d8353fa36257400a99334d5c3",
    b"10 5426cf3031a43f5bfca183d79950698a95a728f6 ima-sig sha256:f1125b940480d20ad841d26d5ea253edc0704b5ec1548c891edf212cb1a9365e /lib/modules/5.4.48-openpower1/kernel/drivers/usb/common/usb-common.ko ",
    b"10 b7862dbbf1383ac6c7cca7f02d981a081aacb1f1 ima-buf sha1:6e0e6fc8a188ef4f059638949adca4d221946906 device_resume 6e616d653d544553543b757569643d43525950542d5645524954592d39656633326535623635623034343234613561386562343436636630653731332d544553543b63617061636974793d303b6d616a6f723d3235333b6d696e6f723d303b6d696e6f725f636f756e743d313b6e756d5f746172676574733d313b6163746976655f7461626c655f686173683d346565383065333365353635643336333430356634303238393436653837623365396563306335383661666639656630656436663561653762656237326431333b",
    b"10 6cde7a2687bc348d737f1a56f256abd962c96b4d ima-buf sha256:e4a5f19a9f827c1442a76f52c91b149abbef7d327c9a20afa3768a8ac7362334 dm_table_load 646d5f76657273696f6e3d342e34352e303b6e616d653d6964656e746974792c757569643d746573742c6d616a6f723d3235332c6d696e6f723d302c6d696e6f725f636f756e743d312c6e756d5f746172676574733d313b7461726765745f696e6465783d302c7461726765745f626567696e3d302c7461726765745f6c656e3d343236383033322c7461726765745f6e616d653d6c696e6561722c7461726765745f76657273696f6e3d312e342e302c6465766963655f6e616d653d3235343a322c73746172743d303b",
    b"10 d7026dc672344d3ee372217bdbc7395947788671 ima 6f66d1d8e2fffcc12dfcb78c04b81fe5b8bbae4e /usr/bin/kmod",
    b"10 7936eb315fb4e74b99e7d461bc5c96049e1ee092 ima-ng sha1:bc026ae66d81713e4e852465e980784dc96651f8 /usr/lib/systemd/systemd",
    b"10 6309e2c83b7814367bb3912a55e5473454623535 ima-ng sha256:f4845392eca429a4c941a6a07fc32faf843a88c5c3dfa3b9329ab8f4171d9ce3 boot_aggregate",
    b"10 2e03b3fdb0014fc8bae2a07ca33ae67125b290f3 ima-ng sha256:83d19723ef3b3c05bb8ae70d86b3886c158f2408f1b71ed265886a7b79eb700e boot_aggregate",
    b"10 983dcd8e6f7c84a1a5f10e762d1850623966ceab ima-ng sha256:ae06e032a65fed8102aff5f8f31c678dcf2eb25b826f77ecb699faa0411f89e0 /init",
    b"10 b6e4d01c73f6e4b698eaf48e7d76a2bae0c02514 ima-ng sha256:4b1764ee112aa8b2a6ae9a3a2f1e272b6601681f610708497673cd49e5bd2f5c /bin/sh",
    b"10 cff3da2ff339a1f07bb0dbcbc0381e794ed09555 ima-ng sha256:3e5e8ad9d8b4dd191413aba6166c7a975c3eab903d1fad77ecfa2d5810d6585c /usr/bin/kmod",
    b"10 13d5b414e08a45698ce9e3c66545b25ba694046c ima-ng sha256:f51de8688a2903b94016c06f186cf1f053ececd2a88a5f349f29b35a06e94c43 /usr/lib64/ld-linux-x86-64.so.2",
]


# -- vectors ------------------------------------------------------------------

def test_boot_aggregate_without_tpm_vector():
    e = build_entry("ima-ng", name="boot_aggregate", algo="sha256", digest=bytes(32))
    assert e.template_hash("sha1").hex() == BOOT_AGGREGATE_NO_TPM
    # the same, from the format definition alone
    data = ng_data("sha256", bytes(32), b"boot_aggregate")
    assert hashlib.sha1(data).hexdigest() == BOOT_AGGREGATE_NO_TPM
    assert e.template_data() == data
    assert e.ascii_line() == (b"10 " + BOOT_AGGREGATE_NO_TPM.encode() + b" ima-ng sha256:"
                              + b"0" * 64 + b" boot_aggregate\n")


@pytest.mark.parametrize("line", KERNEL_LINES)
def test_real_kernel_lines(line):
    e = parse_ascii_line(line)
    assert e.template_hash("sha1") == e.recorded_hash
    assert e.ascii_line() == line + b"\n"
    # binary round trip of the same entry
    (back,) = parse_binary(e.binary_record())
    assert back == e and back.recorded_hash == e.recorded_hash


@pytest.mark.parametrize("algo,bank", [("sha256", "sha1"), ("sha256", "sha256"),
                                       ("sha1", "sha1"), ("sha512", "sha384")])
def test_ima_ng_hash_independent(algo, bank):
    digest = hashlib.new(algo, b"content").digest()
    e = build_entry("ima-ng", name="/usr/bin/true", algo=algo, digest=digest, pcr=10)
    data = ng_data(algo, digest, b"/usr/bin/true")
    assert e.template_hash(bank) == hashlib.new(bank, data).digest()


def test_ima_sig_fields_and_hash():
    digest = hashlib.sha256(b"x").digest()
    sig = bytes.fromhex("030204aabbccdd0004") + b"\x01\x02\x03\x04"
    e = build_entry("ima-sig", name="/bin/x", digest=digest, xattr=sig)
    assert e.fields[2] == sig
    assert e.template_hash() == hashlib.sha1(ng_data("sha256", digest, b"/bin/x", sig)).digest()
    assert e.ascii_line().endswith(b" /bin/x " + sig.hex().encode() + b"\n")
    # a hash-only security.ima is not a signature: empty field, trailing space kept
    e2 = build_entry("ima-sig", name="/bin/x", digest=digest, xattr=b"\x04\x04" + digest)
    assert e2.fields[2] == b""
    assert e2.ascii_line().endswith(b" /bin/x \n")
    assert e2.template_hash() == hashlib.sha1(ng_data("sha256", digest, b"/bin/x", b"")).digest()
    # fs-verity signature (type 6) is recorded; EVM portable signature used as fallback
    v3 = b"\x06\x03\x04" + b"\0" * 6
    assert build_entry("ima-sig", name="/a", digest=digest, xattr=v3).fields[2] == v3
    evm = b"\x05\x02\x04" + b"\1" * 6
    assert build_entry("ima-sig", name="/a", digest=digest, xattr=None,
                       evm_xattr=evm).fields[2] == evm


def test_ima_ngv2_prefixes():
    digest = hashlib.sha256(b"v").digest()
    e = build_entry("ima-ngv2", name="/v", digest=digest, digest_type="verity")
    assert e.fields[0] == b"verity:sha256:\0" + digest
    assert e.ascii_line() == (b"10 " + e.template_hash().hex().encode()
                              + b" ima-ngv2 verity:sha256:" + digest.hex().encode() + b" /v\n")
    e2 = build_entry("ima-sigv2", name="/v", digest=digest)
    assert e2.fields[0] == b"ima:sha256:\0" + digest
    assert e2.template_hash() == hashlib.sha1(lp(b"ima:sha256:\0" + digest) + lp(b"/v\0")
                                              + lp(b"")).digest()
    assert parse_ascii_line(e2.ascii_line()) == e2
    assert e.file_digest == ("verity", "sha256", digest)


def test_ima_buf():
    e = buf_entry("kernel_version", b"6.1.0-test")
    digest = hashlib.sha256(b"6.1.0-test").digest()
    assert e.template_hash() == hashlib.sha1(
        ng_data("sha256", digest, b"kernel_version", b"6.1.0-test")).digest()
    assert e.ascii_line().endswith(b" kernel_version " + b"6.1.0-test".hex().encode() + b"\n")


def test_ima_ns_field():
    digest = hashlib.sha256(b"n").digest()
    e = build_entry("ima-ns", name="/n", digest=digest, ns_id=258)
    assert e.fields[2] == b"\x02\x01\x00\x00"
    assert e.ascii_line().endswith(b" /n 258\n")
    assert parse_ascii_line(e.ascii_line()) == e


def test_ima_template():
    digest = hashlib.sha1(b"legacy").digest()
    e = build_entry("ima", name="/usr/bin/kmod", algo="sha1", digest=digest)
    padded = b"/usr/bin/kmod".ljust(256, b"\0")
    assert e.template_hash("sha1") == hashlib.sha1(digest + padded).digest()
    # other banks hash the same bytes (ima_calc_field_array_hash_tfm)
    assert e.template_hash("sha256") == hashlib.sha256(digest + padded).digest()
    rec = e.binary_record()
    assert rec == (struct.pack("<I", 10) + e.template_hash() + lp(b"ima") + digest
                   + lp(b"/usr/bin/kmod"))
    (back,) = parse_binary(rec)
    assert back == e
    # md5 is padded to 20 bytes; sha256 cannot go into `d`
    md5 = hashlib.md5(b"m").digest()
    assert build_entry("ima", name="/m", algo="md5", digest=md5).fields[0] == md5 + bytes(4)
    with pytest.raises(ValueError):
        build_entry("ima", name="/m", algo="sha256", digest=bytes(32))
    # a path over 255 bytes keeps its last component, as the kernel's d_name
    long = "/" + "d" * 300 + "/file.bin"
    assert build_entry("ima", name=long, algo="sha1", digest=digest).fields[1] == b"file.bin\0"
    assert build_entry("ima-ng", name=long, algo="sha1",
                       digest=digest).fields[1] == long.encode() + b"\0"


def test_binary_record_layout_and_banks():
    digest = hashlib.sha256(b"b").digest()
    e = build_entry("ima-ng", name="/b", digest=digest, pcr=11)
    data = ng_data("sha256", digest, b"/b")
    rec1 = e.binary_record("sha1")
    assert rec1 == (struct.pack("<I", 11) + hashlib.sha1(data).digest() + lp(b"ima-ng")
                    + lp(data))
    rec256 = e.binary_record("sha256")
    assert rec256 == (struct.pack("<I", 11) + hashlib.sha256(data).digest() + lp(b"ima-ng")
                      + lp(data))
    (back,) = parse_binary(rec256, "sha256")
    assert back == e and back.recorded_hash == hashlib.sha256(data).digest()
    line = e.ascii_line("sha256")
    assert line.startswith(b"11 " + hashlib.sha256(data).hexdigest().encode() + b" ima-ng ")
    assert parse_ascii_line(line).recorded_hash == hashlib.sha256(data).digest()


def test_ascii_details():
    digest = hashlib.sha256(b"a").digest()
    e = build_entry("ima-ng", name=b"/with space/and\ttab\x01\xff", digest=digest, pcr=3)
    # spaces become underscores in the record itself; other bytes are printed raw
    assert e.fields[1] == b"/with_space/and\ttab\x01\xff\0"
    line = e.ascii_line()
    assert line.startswith(b" 3 ")                      # "%2d "
    assert line.endswith(b" /with_space/and\ttab\x01\xff\n")
    assert parse_ascii_line(line) == e
    assert e.template_hash() == hashlib.sha1(
        ng_data("sha256", digest, b"/with_space/and\ttab\x01\xff")).digest()
    with pytest.raises(ValueError):
        build_entry("ima-ng", name="/nul\0inside", digest=digest)


def test_violation_entries():
    v = violation_entry("ima-ng", "/etc/shadow")
    assert v.violation
    assert v.fields == (b"sha256:\0" + bytes(32), b"/etc/shadow\0")
    assert v.template_hash("sha1") == bytes(20)
    assert v.template_hash("sha256") == bytes(32)
    assert v.extend_value("sha1") == b"\xff" * 20
    assert v.extend_value("sha256") == b"\xff" * 32
    assert v.ascii_line() == (b"10 " + b"0" * 40 + b" ima-ng sha256:" + b"0" * 64
                              + b" /etc/shadow\n")
    (back,) = parse_binary(v.binary_record())
    assert back.violation and back == v
    assert parse_ascii_line(v.ascii_line()) == v
    assert violation_entry("ima", "/x").fields == (bytes(20), b"/x\0")
    assert violation_entry("ima-sigv2", "/x", algo="sha512").fields == (
        b"ima:sha512:\0" + bytes(64), b"/x\0", b"")


@pytest.mark.parametrize("name", [b"/a\nb", b"/a\\012b", b"/a\\134b", b"/a\\x2d\nb",
                                  b"/sys\\x2dunit.service", b"/plain", b"/back\\slash"])
@pytest.mark.parametrize("violation", [False, True])
def test_ascii_names_are_unambiguous(name, violation):
    """A name holding a newline, or the text of an escape, prints escaped (\012, \134)
    and parses back exactly -- a violation (zero template hash) too; any other name
    prints as the kernel prints it (raw, backslashes included)."""
    e = (violation_entry("ima-ng", name) if violation
         else build_entry("ima-ng", name=name, digest=b"\x01" * 32))
    line = e.ascii_line("sha1")
    assert line.count(b"\n") == 1
    if b"\n" not in name and b"\\012" not in name and b"\\134" not in name:
        assert line.rstrip(b"\n").endswith(b" " + name)
    (back,) = list(T.parse_ascii(line))
    assert back.name == name and back.violation == violation


def test_old_kernel_d_ng_without_algorithm():
    # kernels before 4.x wrote sha1 d-ng as ":" NUL digest and printed just hex
    digest = hashlib.sha1(b"old").digest()
    data = lp(b":\0" + digest) + lp(b"/old\0")
    line = b"10 " + hashlib.sha1(data).hexdigest().encode() + b" ima-ng " + digest.hex().encode() + b" /old"
    e = parse_ascii_line(line)
    assert e.fields[0] == b":\0" + digest
    assert e.template_hash() == e.recorded_hash
    assert e.ascii_line() == line + b"\n"


def test_custom_template_by_format():
    e = TemplateEntry(10, "d-ng|n-ng|iuid", (b"sha1:\0" + bytes(20), b"/u\0", b"\xe8\x03\0\0"))
    assert e.ascii_line().endswith(b" /u 1000\n")
    assert parse_ascii_line(e.ascii_line()) == e
    (back,) = parse_binary(e.binary_record())
    assert back == e


def test_unknown_template_binary_only():
    e = TemplateEntry(10, "vendor-x", (b"abc", b""))
    (back,) = parse_binary(e.binary_record())
    assert back == e
    with pytest.raises(TemplateError):
        e.ascii_line()
    with pytest.raises(TemplateError):
        parse_ascii_line(b"10 " + b"ab" * 20 + b" vendor-x 616263 ")


# -- malformed input ----------------------------------------------------------

def _three():
    return [build_entry("ima-sig", name=f"/f{i}", digest=hashlib.sha256(bytes([i])).digest())
            for i in range(3)]


def test_parse_binary_errors_carry_entry_and_offset():
    recs = [e.binary_record() for e in _three()]
    blob = b"".join(recs)
    assert list(parse_binary(blob)) == _three()
    assert list(parse_binary(io.BytesIO(blob))) == _three()
    with pytest.raises(TemplateError) as ei:
        list(parse_binary(blob[:-3]))
    assert ei.value.entry == 2
    assert len(recs[0]) + len(recs[1]) <= ei.value.offset <= len(blob)
    assert "entry 2" in str(ei.value)
    # a field length pointing past the template data
    bad = bytearray(blob)
    pos = len(recs[0]) + 4 + 20 + 4 + len("ima-sig") + 4
    struct.pack_into("<I", bad, pos, 0xFFFF)
    with pytest.raises(TemplateError) as ei:
        list(parse_binary(bytes(bad)))
    assert ei.value.entry == 1 and ei.value.offset == pos
    # a wrong number of fields for a known template
    e = TemplateEntry(10, "ima-sig", (b"sha1:\0" + bytes(20), b"/x\0", b""))
    rec = bytearray(e.binary_record())
    data = lp(b"sha1:\0" + bytes(20)) + lp(b"/x\0")
    rec = rec[:4 + 20 + 4 + 7] + lp(data)
    with pytest.raises(TemplateError, match="fields"):
        list(parse_binary(bytes(rec)))


def test_parse_binary_huge_length_does_not_allocate():
    head = struct.pack("<I", 10) + bytes(range(1, 21)) + lp(b"ima-ng")
    blob = head + struct.pack("<I", 0xFFFFFFF0) + b"x" * 100
    with pytest.raises(TemplateError, match="exceeds limit"):
        list(parse_binary(blob))
    tracemalloc.start()
    try:
        with pytest.raises(TemplateError, match="truncated"):
            list(parse_binary(io.BytesIO(blob), max_data_len=1 << 32))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20


@pytest.mark.parametrize("line", [
    b"", b"10", b"10 zz ima-ng sha1:00 /x", b"10 " + b"ab" * 20 + b" ima-ng",
    b"10 " + b"ab" * 20 + b" ima-ng sha256:abc /x",            # odd hex
    b"10 " + b"ab" * 20 + b" ima-ng sha256:00 /x extra",        # too many fields
    b"10 " + b"ab" * 20 + b" ima-ngv2 sha256:00 /x",            # no digest type
    b"10 " + b"ab" * 20 + b" ima 00 /x",                        # d must be 20 bytes
    b"99999999999 " + b"ab" * 20 + b" ima-ng sha1:00 /x",
    b"10 " + b"ab" * 20 + b" ima-ns sha1:00 /x 4294967296",
])
def test_parse_ascii_rejects(line):
    with pytest.raises(TemplateError):
        parse_ascii_line(line)


def test_parse_ascii_stream_positions():
    es = _three()
    text = b"".join(e.ascii_line() for e in es)
    assert list(parse_ascii(text)) == es
    bad = text + b"10 nothex ima-ng x y\n"
    with pytest.raises(TemplateError) as ei:
        list(parse_ascii(io.BytesIO(bad)))
    assert ei.value.entry == 3 and ei.value.offset == len(text)


# -- properties ---------------------------------------------------------------

ALGOS = ["md5", "sha1", "sha256", "sha384", "sha512", "sm3"]
name_bytes = st.binary(min_size=0, max_size=80).map(
    lambda b: b.replace(b"\0", b"").replace(b"\n", b"").replace(b" ", b"_"))


@st.composite
def field_data(draw, fid):
    kind = TL.FIELD_KINDS[fid]
    if kind == TL.DIGEST:
        return draw(st.binary(min_size=20, max_size=20))
    if kind == TL.STRING:
        if fid == "n":
            return draw(name_bytes.map(lambda b: b[:255])) + b"\0"
        if fid == "xattrnames":     # ascii cannot tell "" from "\0": use one form
            n = draw(name_bytes)
            return n + b"\0" if n else b""
        return draw(name_bytes) + b"\0"
    if kind in (TL.DIGEST_ALGO, TL.DIGEST_TYPE_ALGO):
        algo = draw(st.sampled_from(ALGOS))
        digest = draw(st.binary(min_size=TL.hash_size(algo), max_size=TL.hash_size(algo)))
        if kind == TL.DIGEST_ALGO:
            return TL.encode_d_ng(algo, digest)
        return TL.encode_d_ngv2(draw(st.sampled_from(TL.DIGEST_TYPES)), algo, digest)
    if kind == TL.HEX:
        return draw(st.binary(max_size=300))
    size = TL._UINT_SIZES[fid]
    return draw(st.integers(0, (1 << 8 * size) - 1)).to_bytes(size, "little")


@st.composite
def entries(draw):
    template = draw(st.sampled_from(sorted(T.TEMPLATES)))
    fields = tuple(draw(field_data(fid)) for fid in T.TEMPLATES[template])
    return TemplateEntry(draw(st.integers(0, 23)), template, fields,
                         draw(st.booleans()) if draw(st.integers(0, 9)) == 0 else False)


@HYP
@given(st.lists(entries(), min_size=1, max_size=5), st.sampled_from(["sha1", "sha256"]))
def test_binary_round_trip(es, bank):
    blob = b"".join(e.binary_record(bank) for e in es)
    back = list(parse_binary(blob, bank))
    assert back == es
    assert [b.recorded_hash for b in back] == [e.template_hash(bank) for e in es]
    assert list(parse_binary(io.BytesIO(blob), bank)) == es


@HYP
@given(st.lists(entries(), min_size=1, max_size=5), st.sampled_from(["sha1", "sha256"]))
def test_ascii_round_trip(es, bank):
    text = b"".join(e.ascii_line(bank) for e in es)
    back = list(parse_ascii(text))
    assert back == es
    assert [b.recorded_hash for b in back] == [e.template_hash(bank) for e in es]


@HYP
@given(st.binary(max_size=600))
def test_parse_binary_arbitrary_bytes(data):
    try:
        for e in parse_binary(data):
            assert isinstance(e, TemplateEntry)
    except TemplateError:
        pass


@HYP
@given(entries(), st.data())
def test_parse_binary_mutated_records(e, data):
    rec = bytearray(e.binary_record())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(rec) - 1))
        rec[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(rec)))
    try:
        list(parse_binary(bytes(rec[:cut])))
    except TemplateError:
        pass


@HYP
@given(st.one_of(st.binary(max_size=400),
                 entries().map(lambda e: e.ascii_line()),
                 st.tuples(entries(), st.binary(max_size=8), st.integers(0, 400)).map(
                     lambda t: t[0].ascii_line()[:t[2]] + t[1] + t[0].ascii_line()[t[2]:])))
def test_parse_ascii_arbitrary_bytes(line):
    try:
        e = parse_ascii_line(line)
    except TemplateError:
        return
    assert isinstance(e, TemplateEntry)
    try:
        e.ascii_line()
    except TemplateError:
        pass
