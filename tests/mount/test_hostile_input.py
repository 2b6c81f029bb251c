"""Hostile input through a real mount: control-file writes and security.ima values
from hypothesis, the policy's size limits, odd names in every list (the parsers
alone: tests/unit/test_hostile_input.py)."""
from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers.fuzz_targets import EXAMPLES, fuzz
from helpers.mounts import IMAFS, REPO, wait_for
from imafs.ima.policy import MAX_POLICY_BYTES
from imafs.ima.templates import parse_ascii, parse_binary
from imafs.ima.verifylog import verify


def run(argv, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, **kw)


# ------------------------------------------------------------------ through a mount
def _alive(m) -> bool:
    """The daemon answers (a control file is never cached by the kernel)."""
    try:
        int(m.ctl("runtime_measurements_count").read_text())
        return True
    except OSError:
        return False


def write_ctl(path: Path, data: bytes, chunks: int = 1) -> int:
    """Write data to a control file (in `chunks` write() calls) and close it; 0 or the
    errno of the first failure (write or close)."""
    fd = os.open(path, os.O_WRONLY)
    err = 0
    try:
        step = max(1, -(-len(data) // chunks))
        for i in range(0, max(len(data), 1), step):
            part = data[i:i + step]
            while part:
                part = part[os.write(fd, part):]
    except OSError as e:
        err = e.errno
    finally:
        try:
            os.close(fd)
        except OSError as e:
            err = err or e.errno
    return err


# what the log line of a refused write to each control file starts with
REFUSAL_LINE = {"policy": "policy write to namespace / rejected",
                "keys": "key write to namespace / rejected",
                "query": "query write to namespace / rejected",
                "ns-remove": "ns-remove by pid", "ns-join": "ns-join by pid"}


@pytest.mark.mount
def test_control_writes_from_hypothesis(make_mount, world_tmp):
    """Random and near-valid writes to policy, keys, ns-remove, ns-join and query:
    each succeeds or fails with an errno the control file documents, every failure
    leaves a line in the daemon's log saying which file refused it and why, and the
    daemon keeps answering. (ns-create is not written from here: a write that
    succeeded would move this test process.)"""
    m = make_mount(["--policy", "tcb"])
    allowed = {"policy": {0, errno.EINVAL, errno.EFBIG}, "keys": {0, errno.EINVAL, errno.EFBIG},
               "ns-remove": {0, errno.EINVAL, errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY},
               # no namespace exists to join (0: nothing written at all)
               "ns-join": {0, errno.EINVAL, errno.ENOENT, errno.EPERM},
               "query": {0, errno.EINVAL}}
    seeds = {n: fuzz.seeds(t) for n, t in [("policy", "ctl-policy"), ("keys", "ctl-keys"),
                                            ("query", "ctl-query"), ("ns-remove", "ctl-ns"),
                                            ("ns-join", "ctl-ns")]}
    tried, refused = [0], {n: 0 for n in allowed}
    log = open(m.log, "rb")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(allowed)), st.data())
    def check(name, data):
        pool = seeds[name]
        buf = data.draw(st.one_of(
            st.binary(max_size=300),
            st.sampled_from(pool).flatmap(lambda s: st.integers(0, 2**32).map(
                lambda k: fuzz.mutate(__import__("random").Random(k), s, pool)))))
        chunks = data.draw(st.integers(1, 3))
        log.seek(0, os.SEEK_END)
        err = write_ctl(m.ctl(name), buf, chunks)
        # FLUSH is answered ENOSYS, so what a close does runs at RELEASE, after
        # close(2) returned; the next open waits for it (Overlay.settle_*). A control
        # file: an accepted policy write may have added an appraise rule that a
        # file of the mount would now fail
        m.ctl("runtime_measurements_count").read_text()
        tried[0] += 1
        if err == errno.EACCES and name == "policy":
            # as the kernel's: once the policy appraises POLICY_CHECK (an earlier
            # accepted write may have added such a rule), text is refused, only a
            # signed policy file's path is taken
            assert any(ln.startswith("appraise") and "func=POLICY_CHECK" in ln.split()
                       for ln in m.ctl("policy").read_text().splitlines()), buf[:100]
        else:
            assert err in allowed[name], (name, buf[:100], err)
        assert err or name != "ns-join" or not buf, (buf[:100], "joined")
        new = log.read().decode("utf-8", "replace").splitlines()
        said = [ln for ln in new if " imafs.control WARNING: " in ln]
        if err:
            refused[name] += 1
            # the log is written before the refusal is answered: the line is there
            assert said and all(REFUSAL_LINE[name] in ln or f"{name} open by pid" in ln
                                for ln in said), (name, buf[:100], err, new)
            assert all(re.match(r"\d{4}-\d\d-\d\d ", ln) for ln in new), new
        else:
            # a refusal only the close can see (a last line without a newline that
            # does not parse) is logged at release: close(2) has already said 0
            assert all(REFUSAL_LINE[name] in ln for ln in said), (name, buf[:100], said)
    try:
        check()
    finally:
        log.close()
    assert _alive(m)
    # the root policy grew only by what was accepted: it still parses and prints
    assert m.ctl("policy").read_text().count("\n") <= 4096 + 20
    assert tried[0] >= EXAMPLES
    assert all(refused.values()), refused       # every file refused something


@pytest.mark.mount
def test_security_ima_values_from_hypothesis(make_mount):
    """Malformed security.ima values are EINVAL, well-formed ones are stored; the
    daemon keeps answering."""
    from imafs.ima.appraise import XattrError, parse_ima_xattr
    m = make_mount(["--policy", "appraise_tcb", "--appraise", "log"])
    (m.backing / "f").write_text("x\n")
    target = m.mnt / "f"
    pool = fuzz.seeds("xattr")

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(min_size=1, max_size=600),
                     st.sampled_from(pool).flatmap(lambda s: st.integers(0, 2**32).map(
                         lambda k: fuzz.mutate(__import__("random").Random(k), s, pool) or b"\0"))))
    def check(value):
        try:
            parse_ima_xattr(value)
            well_formed = True
        except XattrError:
            well_formed = False
        try:
            os.setxattr(target, "security.ima", value)
            assert well_formed, value
            assert os.getxattr(target, "security.ima") == value
        except OSError as e:
            assert not well_formed and e.errno == errno.EINVAL, (value, e)
    check()
    assert _alive(m)
    assert "refused security.ima" in m.log_text()


def _latency_probe(path: Path, stop: threading.Event, out: list) -> None:
    """Open and read a file through the mount in a loop; record the slowest."""
    while not stop.is_set():
        t = time.monotonic()
        with open(path, "rb") as f:
            f.read()
        out.append(time.monotonic() - t)
        time.sleep(0.005)


@pytest.mark.mount
def test_policy_size_limits_and_a_million_lines(make_mount, world_tmp):
    """A policy written through one open is refused over MAX_POLICY_BYTES (EFBIG) or
    over MAX_POLICY_RULES rules, the old policy kept; a million-line policy (a million
    lines of rules: refused; a million blank lines: parsed) never stalls the
    requests of other processes."""
    from imafs.ima.securityfs_write import MAX_POLICY_RULES
    m = make_mount(["--policy", str(_policy(world_tmp, "measure func=BPRM_CHECK\n"))])
    (m.backing / "probe").write_bytes(b"p" * 4096)
    before = m.ctl("policy").read_text()

    stop, lat = threading.Event(), []
    probe = threading.Thread(target=_latency_probe, args=(m.mnt / "probe", stop, lat))
    probe.start()
    try:
        assert wait_for(lambda: lat, 10), "the probe's first open did not finish"
        base = max(lat)
        # one write(2) over the limit, and a million lines of rules through cat
        assert write_ctl(m.ctl("policy"), b"audit func=FILE_CHECK\n" * (MAX_POLICY_BYTES // 20)) \
            == errno.EFBIG
        big = world_tmp / "million.policy"
        big.write_bytes(b"measure func=FILE_CHECK mask=MAY_READ uid=1000\n" * 1_000_000)
        t = time.monotonic()
        r = subprocess.run(["sh", "-c", f"cat {big} > {m.ctl('policy')}"], capture_output=True,
                           text=True, timeout=120)
        refused_in = time.monotonic() - t
        assert r.returncode != 0 and "too large" in r.stderr.lower(), r.stderr
        assert m.ctl("policy").read_text() == before
        # comments count too: 2 MiB through one open is refused by size
        assert write_ctl(m.ctl("policy"), (b"#" * 99 + b"\n") * ((2 << 20) // 100), 4) == errno.EFBIG
        # a million blank lines and a comment: under the limit, parsed, nothing added
        t = time.monotonic()
        assert write_ctl(m.ctl("policy"), b"\n" * 1_000_000 + b"# a million lines\n") == 0
        parsed_in = time.monotonic() - t
        assert m.ctl("policy").read_text() == before
        # the rule cap: MAX_POLICY_RULES rules in all, EFBIG past them
        rule = b"dont_measure fsmagic=0x9fa0\n"
        have = before.count("\n")
        assert write_ctl(m.ctl("policy"), rule * (MAX_POLICY_RULES - have)) == 0
        assert write_ctl(m.ctl("policy"), rule) == errno.EFBIG
        assert m.ctl("policy").read_text().count("\n") == MAX_POLICY_RULES
    finally:
        stop.set()
        probe.join()
    worst = max(lat)
    print(f"policy: million-line rules refused in {refused_in:.2f} s, million blank lines "
          f"parsed in {parsed_in:.2f} s; probe opens {len(lat)}, worst {worst * 1000:.0f} ms "
          f"(idle {base * 1000:.0f} ms)")
    # a stall behind the write would last about as long as the write itself
    assert worst < max(2.0, 0.5 * max(refused_in, parsed_in)), \
        f"another process's open waited {worst:.2f} s"
    log = m.log_text()
    assert log.count("policy write to namespace / rejected") >= 3, log[-3000:]
    assert f"a policy holds at most {MAX_POLICY_RULES} rules" in log
    assert f"over {MAX_POLICY_BYTES} bytes written" in log


def _policy(d: Path, text: str) -> Path:
    p = d / f"policy-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    p.write_text(text)
    return p


@pytest.mark.mount
def test_odd_names_in_every_list(make_mount, world_tmp):
    """255-byte names, non-UTF-8 bytes, newlines, spaces, backslashes: the binary list
    records each name exactly (spaces as `_`, the kernel's only rewrite), every ascii
    view parses back to the same names, and evmctl and imafs verify-log accept both."""
    m = make_mount(["--policy", str(_policy(world_tmp, "measure func=FILE_CHECK mask=MAY_READ\n")),
                    "--template", "ima-ng"])
    b = bytes(m.backing)
    os.mkdir(b + b"/d")
    names = [b"/d/" + b"n" * 255, b"/d/" + b"\xff\xfe\x80 raw", b"/d/new\nline",
             b"/d/two\n\nnewlines\\and\\backslash", b"/d/a\\012b", b"/d/sp ace", b"/d/tab\t",
             b"/d/" + "é".encode() * 127, b"/d/ lead", b"/d/-", b"/d/%s%n"]
    for n in names:
        with open(b + n, "wb") as f:
            f.write(n)
    for n in names:
        with open(bytes(m.mnt) + n, "rb") as f:
            assert f.read() == n
    with pytest.raises(OSError) as ei:
        open(bytes(m.mnt) + b"/d/" + b"n" * 256, "rb")
    assert ei.value.errno == errno.ENAMETOOLONG
    want = {n.replace(b" ", b"_"): hashlib.sha256(n).digest() for n in names}
    binary = m.ctl("binary_runtime_measurements").read_bytes()
    got = {e.name: e.file_digest[2] for e in parse_binary(binary) if e.name != b"boot_aggregate"}
    assert got == want
    for view, bank in [("ascii_runtime_measurements", "sha1"),
                       ("ascii_runtime_measurements_sha256", "sha256")]:
        data = m.ctl(view).read_bytes()
        entries = list(parse_ascii(data))
        assert len(data.splitlines()) == len(entries) == len(want) + 1
        assert {e.name: e.file_digest[2] for e in entries if e.name != b"boot_aggregate"} == want
        rep = verify(iter(entries), bank=bank)
        assert rep.ok, rep.problems
    for view in ("binary_runtime_measurements", "ascii_runtime_measurements"):
        copy = world_tmp / view
        copy.write_bytes(m.ctl(view).read_bytes())
        r = run(IMAFS + ["verify-log", str(copy), "--pcrs", f"sha1,{m.ctl('pcrs/sha1')}",
                         "--pcrs", f"sha256,{m.ctl('pcrs/sha256')}"])
        assert r.returncode == 0, r.stdout + r.stderr
    (world_tmp / "p1").write_text(m.ctl("pcrs/sha1").read_text())
    (world_tmp / "p256").write_text(m.ctl("pcrs/sha256").read_text())
    r = run(["evmctl", "ima_measurement", "--pcrs", f"sha1,{world_tmp / 'p1'}", "--pcrs",
             f"sha256,{world_tmp / 'p256'}", str(world_tmp / "binary_runtime_measurements")])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
