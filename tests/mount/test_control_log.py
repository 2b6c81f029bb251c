"""Every refused write to a control file says what and why in the daemon's log -- one
line -- and, where that file's other refusals are audited, in the audit log too; and
what a writer sent is quoted with its control characters escaped, so a newline, a
carriage return, an ESC or a NUL byte in a path can neither start a forged log line
nor reach a terminal that shows the log. Through a real mount."""
from __future__ import annotations

import errno
import os
import re
import subprocess
import sys

import pytest

from helpers.mounts import wait_for

pytestmark = pytest.mark.mount

# Writes each argument (hex) through its own open of CTL from this child process (so a
# write that moved its opener would move this child, never pytest); prints one errno
# per line (0: written and closed).
WRITER = r"""
import os, sys
ctl = sys.argv[1]
for h in sys.argv[2:]:
    fd = os.open(ctl, os.O_WRONLY)
    err = 0
    try:
        os.write(fd, bytes.fromhex(h))
    except OSError as e:
        err = e.errno
    try:
        os.close(fd)
    except OSError as e:
        err = err or e.errno
    print(err, flush=True)
"""


def write(m, name: str, data: bytes) -> int:
    r = subprocess.run([sys.executable, "-c", WRITER, str(m.ctl(name)), data.hex()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[0])


def control_warnings(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if " imafs.control WARNING: " in ln]


REFUSALS = [
    # file, bytes, errno, what the log line says, audit record type (None: not audited)
    ("query", b"/" + b"a" * 5000, errno.EINVAL, "over 4096 bytes", None),
    ("query", b"/a /b\n", errno.EINVAL, "2 words", None),
    ("query", b"exec /a /b\n", errno.EINVAL, "3 words", None),
    ("query", b"\n", errno.EINVAL, "nothing to query", None),
    ("query", b"  \t\n\n", errno.EINVAL, "nothing to query", None),
    ("query", b"/a\n/b\n", errno.EINVAL, "2 lines", None),
    ("ns-create", b"x" * 5000, errno.EINVAL, "over 4096 bytes", "ns_create_rejected"),
    ("ns-create", b"web\0", errno.EINVAL, "a NUL byte", "ns_create_rejected"),
    ("ns-remove", b"y" * 5000, errno.EINVAL, "over 4096 bytes", "ns_remove_rejected"),
    ("ns-remove", b"\0web", errno.EINVAL, "a NUL byte", "ns_remove_rejected"),
    ("ns-join", b"z" * 5000, errno.EINVAL, "over 4096 bytes", "ns_join_rejected"),
    ("ns-join", b"w\0b", errno.EINVAL, "a NUL byte", "ns_join_rejected"),
    ("ns-remove", b"nosuch\n", errno.ENOENT, "no namespace 'nosuch'", "ns_remove_rejected"),
    ("keys", b"\x30\x83\x10\x00\x00" + bytes(100), errno.EFBIG, "a DER certificate of",
     "key_rejected"),
    ("keys", b"garbage\n", errno.EINVAL, "expected a DER or PEM", "key_rejected"),
    ("policy", b"measure func=BOGUS\n", errno.EINVAL, "line 1, column 9", "policy_rejected"),
]


@pytest.mark.parametrize("name,data,err,why,rec", REFUSALS,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(REFUSALS)])
def test_each_refusal_logs_one_line(make_mount, name, data, err, why, rec):
    m = make_mount()
    before, nrec = len(m.log_text()), len(m.audit())
    assert write(m, name, data) == err
    new = control_warnings(m.log_text()[before:])
    if err == errno.EFBIG:      # the close (at release: close(2) returned 0) says so
        assert wait_for(lambda: "closed with nothing applied"
                        in m.log_text()[before:]), m.log_text()[before:]
        new = control_warnings(m.log_text()[before:])
        assert len(new) == 2 and "closed with nothing applied" in new[1], new
        new = new[:1]
    assert len(new) == 1, new
    assert why in new[0] and re.search(rf"\b{re.escape(name)}\b|key write|policy write",
                                       new[0]), new
    recs = m.audit()[nrec:]
    if rec is None:
        assert not [r for r in recs if r["type"].endswith("_rejected")]
    else:
        assert [r["type"] for r in recs if r["type"].endswith("_rejected")] == [rec], recs


def test_later_writes_of_a_refused_open_are_logged(make_mount):
    """A write after a refused one (nothing of the open will be loaded) says so."""
    m = make_mount()
    for name, bad, good in (("policy", b"measure func=BOGUS\n", b"audit func=BPRM_CHECK\n"),
                            ("keys", b"garbage\n", b"\n")):
        fd = os.open(m.ctl(name), os.O_WRONLY)
        try:
            with pytest.raises(OSError):
                os.write(fd, bad)
            before = len(m.log_text())
            with pytest.raises(OSError) as ei:
                os.write(fd, good)
            assert ei.value.errno == errno.EINVAL
            new = control_warnings(m.log_text()[before:])
            assert len(new) == 1 and "an earlier write through this open was refused" \
                in new[0], new
        finally:
            os.close(fd)


FORGED = "2026-01-01 00:00:00,000 imafs INFO: fake"


def _no_raw_control_bytes(m) -> None:
    raw = m.log.read_bytes()
    bad = sorted({c for c in raw if c < 0x20 and c != 0x0A} | ({0x7F} & set(raw)))
    assert not bad, [hex(c) for c in bad]
    for ln in raw.decode("utf-8", "replace").splitlines():
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ [A-Z]+: ", ln), ln
        assert not ln.startswith(FORGED), ln


def test_log_lines_escape_what_writers_sent(make_mount, world_tmp):
    """A newline in a query, ESC/CR/BEL/NUL and bytes that are not UTF-8 in keys and
    policy paths, a bad byte in a policy file's text and in an ns-join path: each
    rejection is one line of the log with those characters escaped (\\n, \\r, \\x1b,
    \\x00, \\xff, ...); no forged line; the audit log (JSON) keeps them exactly."""
    b = world_tmp / "backing1"
    b.mkdir()
    (b / "evil\x1b[2J.policy").write_bytes(b"measure func=\x1b[31mBPRM_CHECK\n")
    m = make_mount(backing=b)
    cases = [
        ("query", f"/x\n{FORGED}\n".encode(), errno.EINVAL, r"/x\n" + FORGED),
        ("query", b"/q\r" + FORGED.encode() + b" extra", errno.EINVAL, r"/q\r" + FORGED),
        ("keys", b"/k\x1b[2J\rX\x07\n", errno.EINVAL, r"/k\x1b[2J\rX\x07: No such file"),
        ("keys", b"/k\x00z\n", errno.EINVAL, r"/k\x00z: path contains a NUL byte"),
        ("policy", b"/p\x1b]0;title\x07\n", errno.EINVAL, r"/p\x1b]0;title\x07: No such"),
        ("policy", b"/evil\x1b[2J.policy\n", errno.EINVAL,
         r"/evil\x1b[2J.policy: line 1, column 9: unprintable character U+001B"),
        ("keys", "/k\u2028z\n".encode(), errno.EINVAL, r"/k\u2028z: No such file"),
        # not UTF-8: the line was lost (a lone surrogate the log file cannot encode)
        ("keys", b"/k\xff\x80\n", errno.EINVAL, r"/k\xff\x80: No such file"),
        ("ns-join", b"/a\r" + FORGED.encode(), errno.EINVAL, r"a\r" + FORGED),
        ("ns-create", "w\u200bb\n".encode(), errno.EINVAL, r"'w\u200bb'"),
    ]
    for name, data, err, shown in cases:
        before = len(m.log_text())
        assert write(m, name, data) == err, (name, data)
        new = control_warnings(m.log_text()[before:])
        assert len(new) == 1 and shown in new[0], (name, shown, new)
    _no_raw_control_bytes(m)
    # the audit log keeps what was written, JSON-escaped
    errs = [r.get("error", "") for r in m.audit()]
    assert any("/k\x1b[2J\rX\x07" in e for e in errs), errs


def test_file_names_in_engine_log_lines_are_escaped(make_mount, world_tmp):
    """Every line of the daemon's log is escaped, whoever logs it: a denial names the
    file, and a file named with a newline and a fake log line cannot forge one."""
    b = world_tmp / "backing"
    b.mkdir()
    fake = "2026-01-01 00:00:00,000 imafs INFO: fake"
    name = "x\n" + fake
    (b / name).write_bytes(b"unsigned")
    with open(os.path.join(os.fsencode(b), b"bad\xff"), "wb") as f:   # not UTF-8
        f.write(b"unsigned")
    pol = world_tmp / "policy"
    pol.write_text("appraise func=FILE_CHECK mask=MAY_READ\n")
    m = make_mount(["--policy", str(pol)], backing=b)
    for n in (name.encode(), b"bad\xff"):
        with pytest.raises(PermissionError):
            open(os.path.join(os.fsencode(m.mnt), n), "rb").read()
    text = m.log.read_text(errors="strict")
    assert not any(ln.startswith(fake) for ln in text.splitlines())
    assert "x\\n" + fake in text and "bad\\xff" in text
