"""Model files (imafs/ima/modelfile.py): the one text form, round trips, and malformed
input refused whole with the line that is wrong."""
from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from imafs.ima import model as M
from imafs.ima import modelmap as mm
from imafs.ima.modelfile import ModelFile, ModelFileError, format_model, parse_model

D = st.binary(min_size=32, max_size=32)


@st.composite
def model_files(draw):
    agg = draw(D)
    base = draw(st.one_of(st.just(mm.ZERO), D.filter(lambda b: b != mm.ZERO)))
    coefs = tuple(sorted(draw(st.sets(D, max_size=30))))
    mf = ModelFile(agg, base, tuple(sorted(draw(st.sets(D, max_size=5)))), coefs, None,
                   draw(st.booleans()))
    if draw(st.booleans()):
        mf = mf._replace(state=mf.computed_state())
    return mf


@settings(max_examples=200, deadline=None)
@given(model_files())
def test_round_trip(mf):
    text = format_model(mf)
    assert parse_model(text) == mf
    assert format_model(parse_model(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_parse_or_refused_with_a_line(data):
    try:
        mf = parse_model(data)
    except ModelFileError as e:
        assert str(e) and e.line >= 0
        return
    assert format_model(mf) == data          # only the canonical form parses


@settings(max_examples=300, deadline=None)
@given(model_files(), st.data())
def test_mutated_file_parses_canonically_or_names_its_line(mf, data):
    text = bytearray(format_model(mf))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text) - 1))
        op = data.draw(st.sampled_from(["flip", "del", "dup"]))
        if op == "flip":
            text[i] = data.draw(st.integers(0, 255))
        elif op == "del":
            del text[i]
        else:
            text.insert(i, text[i])
        if not text:
            break
    blob = bytes(text)
    try:
        got = parse_model(blob)
    except ModelFileError as e:
        assert 1 <= e.line <= blob.count(b"\n") + 1
        return
    assert format_model(got) == blob


def test_example_and_line_numbers():
    coefs = sorted(hashlib.sha256(bytes([i])).digest() for i in range(3))
    mf = ModelFile(bytes(32), mm.ZERO, (), tuple(coefs), None, True)
    mf = mf._replace(state=mf.computed_state())
    text = format_model(mf).decode()
    lines = text.splitlines()
    assert lines[0] == "aggregate " + "00" * 32
    assert [x.split()[0] for x in lines] == ["aggregate"] + ["coefficient"] * 3 + [
        "state", "seal", "end"]

    def refused(t: str, line: int, what: str):
        with pytest.raises(ModelFileError, match=what) as ei:
            parse_model(t.encode())
        assert ei.value.line == line, str(ei.value)

    swap = lines[:]
    swap[1], swap[2] = swap[2], swap[1]
    refused("\n".join(swap) + "\n", 3, "ascending")
    dup = lines[:2] + [lines[1]] + lines[2:]
    refused("\n".join(dup) + "\n", 3, "ascending")
    refused(text.replace(lines[2], lines[2].upper()), 3, "keyword")
    refused(text.replace("seal\n", "seal \n"), 6, "keyword")
    refused(text[:-1], 7, "LF")
    refused(text + "end\n", 8, "after 'end'")
    refused(text.replace("end\n", ""), 6, "no 'end'")
    refused("\n".join(lines[1:]) + "\n", 1, "starts with 'aggregate")
    refused(text.replace(lines[4], "state " + "ab" * 32), 5, "not the state")
    refused(text.replace("seal\n", "seal\nseal\n"), 7, "out of place")
    refused(text.replace(lines[3] + "\n", lines[3] + "\npseudonym " + "11" * 32 + "\n"),
            5, "out of place")
    refused(text.replace("\n", "\r\n", 1), 1, "keyword")
    refused(text.replace(lines[0], lines[0] + "00"), 1, "keyword")
    refused(text.replace(lines[0] + "\n", lines[0] + "\nbase " + "00" * 32 + "\n"), 2,
            "zero base")
    refused(text.replace(lines[0] + "\n", lines[0] + "\n\n"), 2, "keyword")
    refused(text.replace("seal", "signed"), 6, "unknown keyword")
    refused(text.replace("seal", "seal " + "00" * 32), 6, "no value")
    refused("", 1, "empty")


def test_export_load_same_state_and_bytes():
    m = M.Model(aggregate=b"\x42" * 32)
    a = M.Actor("t", None, mm.Coe())
    for i in range(50):
        m.decide(a, mm.file_open(f"/f{i}", mm.Inode(0, 0, 0o100644),
                                 hashlib.sha256(b"%d" % i).digest(), mm.MAY_READ))
    m.add_pseudonym("/var/log/x")
    text = format_model(m.export())
    again = M.Model(aggregate=b"\x42" * 32)
    again.load(parse_model(text))
    assert again.state() == m.state()
    assert format_model(again.export()) == text


def test_format_refuses_what_it_cannot_write():
    with pytest.raises(ValueError):
        format_model(ModelFile(b"short"))
    with pytest.raises(ValueError):
        format_model(ModelFile(bytes(32), coefficients=(b"x",)))
    with pytest.raises(ValueError):
        format_model(ModelFile(bytes(32), state=bytes(32)))
