"""Hostile input to every parser that takes bytes from outside, without a mount: no
crash, no hang, no unbounded memory; every rejection a clear error.

The targets are scripts/fuzz.py's (the long runs: ``scripts/fuzz.py --runs N``,
atheris when installed); here each gets a bounded number of hypothesis inputs
(FUZZ_EXAMPLES per target, default 300); ``imafs verify-log`` on hostile files.
Through a mount: tests/mount/test_hostile_input.py."""
from __future__ import annotations

import io
import os
import subprocess
import time
import tracemalloc

import pytest

from helpers.fuzz_targets import EXAMPLES, fuzz
from helpers.mounts import IMAFS, REPO
from imafs.ima import template_lib, templates
from imafs.ima.templates import parse_ascii, parse_binary
from imafs.ima.verifylog import parse_pcr_file


# ------------------------------------------------------------------ offline parsers
@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_parser_survives_hostile_bytes(target):
    """Seeds, their mutations and random bytes: only the documented rejection, with
    a message, in bounded time (scripts/fuzz.py says what each target checks)."""
    res = fuzz.run_hypothesis(target, EXAMPLES, None, 0)
    assert res["inputs"] >= EXAMPLES


def test_binary_list_announcing_huge_records_allocates_nothing():
    """Lengths are checked against what is present: a record announcing 4 GiB of data
    (or a 4 GiB template name) costs no memory."""
    head = (10).to_bytes(4, "little") + bytes(20)
    cases = [head + (6).to_bytes(4, "little") + b"ima-ng" + (0xFFFFFFF0).to_bytes(4, "little"),
             head + (0xFFFFFFFF).to_bytes(4, "little") + b"x" * 64,
             head + (3).to_bytes(4, "little") + b"ima" + bytes(20) + (0xFFFFFFFF).to_bytes(4, "little")]
    for data in cases:
        tracemalloc.start()
        try:
            with pytest.raises(template_lib.TemplateError) as ei:
                list(parse_binary(io.BytesIO(data)))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert str(ei.value) and peak < 1 << 20, (data[:40], peak)


def test_ascii_list_line_length_is_bounded(monkeypatch):
    """An ascii 'list' without newlines is refused after MAX_ASCII_LINE bytes, never
    held whole (the limit is 128 MiB; here 64 KiB to keep the test small)."""
    monkeypatch.setattr(templates, "MAX_ASCII_LINE", 64 << 10)
    data = io.BytesIO(b"10 " + b"a" * (16 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(template_lib.TemplateError, match="line longer than"):
            list(parse_ascii(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_pcr_file_rejections_name_the_line():
    for text, where in [("PCR-00: zz\n", "line 1"), ("\n\nPCR00 00\n", "line 3"),
                        ("PCR-00: 00\nPCR-x: 00\n", "line 2")]:
        with pytest.raises(ValueError, match=where):
            parse_pcr_file(text)


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, **kw)


def test_verify_log_cli_on_hostile_files(tmp_path):
    """Garbage, truncation, a directory, an endless stream, bad arguments: a one-line
    reason and exit 1 (bad list) or 2 (bad usage), never a traceback."""
    good = b"".join(e.binary_record("sha1") for e in
                    [templates.build_entry("ima-ng", name="/a", digest=bytes(32))] * 3)
    files = {"garbage": os.urandom(5000), "truncated": good[:-7],
             "ascii-garbage": b"10 " + os.urandom(3000), "nul": bytes(100)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cases = [[str(tmp_path / n)] for n in files]
    cases += [[str(tmp_path)], ["/nonexistent"], ["/dev/zero", "--format", "binary"],
              [str(tmp_path / "garbage"), "--bank", "sha666"],
              [str(tmp_path / "garbage"), "--banks", "sha1,nope"],
              [str(tmp_path / "garbage"), "--pcrs", "sha1"],
              [str(tmp_path / "garbage"), "--pcr", "sha1:10=zz"],
              [str(tmp_path / "garbage"), "--pcrs", f"sha1,{tmp_path / 'garbage'}"],
              [str(tmp_path / "garbage"), "--keys", str(tmp_path / "garbage")]]
    for args in cases:
        t = time.monotonic()
        r = run(IMAFS + ["verify-log", *args])
        assert r.returncode in (1, 2), (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.startswith("imafs verify-log"), (args, r.stderr)
        assert time.monotonic() - t < 60
    # a typo in a bank never lets a list pass unchecked
    (tmp_path / "good").write_bytes(good)
    r = run(IMAFS + ["verify-log", str(tmp_path / "good"), "--pcr", "sha265:10=" + "00" * 32])
    assert r.returncode == 2 and "sha265" in r.stderr
