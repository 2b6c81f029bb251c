"""Limits of the control files, through a real mount, and how they fail: visibly.

- Over 1 MiB written through one open of ``policy`` or ``keys``: the FUSE write that
  crosses the limit is EFBIG, and so is every later write of that open; its close
  loads nothing and logs why. (A single write(2) of 3 MB returns a short count -- the
  kernel reports the part it had passed on before the refusal -- and a writer that
  goes on sees EFBIG; close(2) returns 0, as the kernel's securityfs release: the
  mount answers no FLUSH, so the close is done at release, after close(2) returned,
  and the next open waits for it.) An exactly-1 MiB policy without a trailing
  newline is loaded (the newline the daemon adds at close to end its last line does
  not count).
- Integrity namespaces nest at most MAX_NS_DEPTH (32) deep and a mount holds at most
  MAX_NAMESPACES (1024): past either, ns-create is ENOSPC, as the kernel's
  create_user_ns (and create_pid_namespace) answer for too deep or too many, with a
  log line. (One process created 300 nested namespaces in 1.7 s; every open of the
  deepest was then recorded in 300 lists.)
"""
from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import testkeys as tk
from imafs.ima.keyring_update import MAX_KEYS_WRITE
from imafs.ima.namespaces import MAX_NAMESPACES, MAX_NS_DEPTH
from imafs.ima.policy import MAX_POLICY_BYTES
from helpers.containers import host_sh, lines

pytestmark = pytest.mark.mount


def steps(path: Path, *chunks: bytes) -> list:
    """One open; each chunk in one os.write (its return value, or the errno as
    ("err", N)); last, the close's errno (0: it succeeded)."""
    fd = os.open(path, os.O_WRONLY)
    out: list = []
    try:
        for c in chunks:
            try:
                out.append(os.write(fd, c))
            except OSError as e:
                out.append(("err", e.errno))
    finally:
        try:
            os.close(fd)
            out.append(0)
        except OSError as e:
            out.append(e.errno)
    return out


def warnings(m, since: int = 0) -> list[str]:
    return [ln for ln in m.log_text()[since:].splitlines() if " WARNING: " in ln]


COMMENTS = (b"#" * 99 + b"\n") * 30_000          # 3 MB of comment lines


def test_policy_over_a_mib_fails_every_later_write(make_mount):
    m = make_mount()
    p = m.ctl("policy")
    before = len(m.log_text())
    data = b"measure func=BPRM_CHECK\n" + COMMENTS
    first, again, more, closed = steps(p, data, data, b"audit func=FILE_CHECK\n")
    # the kernel passed the first part on (short count), or the first FUSE write
    # already crossed the limit; either way the rest is refused
    assert first == ("err", errno.EFBIG) or 0 < first <= MAX_POLICY_BYTES, first
    assert again == more == ("err", errno.EFBIG)
    assert closed == 0
    assert p.read_text() == ""          # waits for the close (release), then its log
    w = warnings(m, before)
    assert any(f"over {MAX_POLICY_BYTES} bytes written" in ln for ln in w), w
    assert any("an earlier write through this open was refused" in ln for ln in w), w
    assert any("closed with nothing loaded" in ln for ln in w), w
    assert [r for r in m.audit() if r["type"] == "policy_rejected"]
    # what a program does that writes it all through Python's buffered file: an error
    with pytest.raises(OSError) as ei:
        with open(p, "wb") as f:
            f.write(COMMENTS)
    assert ei.value.errno == errno.EFBIG
    # and a shell
    r = subprocess.run(["bash", "-c", f"head -c 3000000 /dev/zero | tr '\\0' '#' > {p}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "too large" in r.stderr.lower(), r.stderr
    assert p.read_text() == ""


def test_policy_of_exactly_a_mib(make_mount):
    """1 MiB, its last rule without a newline: loaded; one byte more: EFBIG at the
    write that crosses it."""
    m = make_mount()
    p = m.ctl("policy")
    rule = b"measure func=BPRM_CHECK"
    pad = MAX_POLICY_BYTES - len(rule)
    body = (b"#" * 99 + b"\n") * (pad // 100) + b"#" * (pad % 100 - 1) + b"\n"
    exact = body + rule
    assert len(exact) == MAX_POLICY_BYTES
    res = steps(p, exact[:700_000], exact[700_000:])
    assert res == [700_000, len(exact) - 700_000, 0], res
    assert p.read_text() == "measure func=BPRM_CHECK \n"
    res = steps(p, exact[:700_000], exact[700_000:] + b"\n" + b"audit func=BPRM_CHECK\n")
    assert res[0] == 700_000 and res[1:] == [("err", errno.EFBIG), 0], res
    assert p.read_text() == "measure func=BPRM_CHECK \n"
    # exactly 1 MiB with its trailing newline, in one write(2)
    exact_nl = body[:-2] + b"\n" + rule + b"\n"
    assert len(exact_nl) == MAX_POLICY_BYTES
    assert steps(p, exact_nl) == [MAX_POLICY_BYTES, 0], m.log_text()[-3000:]
    assert p.read_text() == "measure func=BPRM_CHECK \n" * 2


def test_policy_file_over_a_mib_is_refused_before_it_is_hashed(make_mount, world_tmp):
    """A policy loaded by path that is larger than the limit (here a sparse 8 GiB file,
    under tcb, which measures POLICY_CHECK) is EFBIG at once: it was hashed whole first,
    then refused with EINVAL."""
    b = world_tmp / "backing1"
    b.mkdir()
    with open(b / "huge.policy", "wb") as f:
        f.truncate(8 << 30)
    m = make_mount(["--policy", "tcb"], backing=b)
    p = m.ctl("policy")
    before = p.read_text()
    t = time.monotonic()
    assert steps(p, b"/huge.policy\n") == [("err", errno.EFBIG), 0]
    assert time.monotonic() - t < 10        # reading 8 GiB would take minutes
    assert p.read_text() == before
    assert f"/huge.policy: policy file over {MAX_POLICY_BYTES} bytes ({8 << 30})" \
        in m.log_text()
    assert b"/huge.policy" not in m.ctl("ascii_runtime_measurements").read_bytes()


def test_keys_over_a_mib_fails_every_later_write(make_mount):
    m = make_mount()
    k = m.ctl("keys")
    c = tk.cert(tk.key("ec", 7), cn="limit")
    before = len(m.log_text())
    data = tk.pem(c) + b"\n" * 3_000_000
    first, again, closed = steps(k, data, tk.pem(c))
    assert first == ("err", errno.EFBIG) or 0 < first <= MAX_KEYS_WRITE, first
    assert again == ("err", errno.EFBIG) and closed == 0
    assert k.read_text() == ""          # waits for the close (release), then its log
    w = warnings(m, before)
    assert any(f"over {MAX_KEYS_WRITE} bytes written" in ln for ln in w), w
    assert any("an earlier write through this open was refused" in ln for ln in w), w
    assert any("closed with nothing applied" in ln for ln in w), w
    # exactly the limit: applied
    pem = tk.pem(c)
    exact = b"\n" * (MAX_KEYS_WRITE - len(pem)) + pem
    assert steps(k, exact[:600_000], exact[600_000:]) == [600_000, len(exact) - 600_000, 0]
    assert len(k.read_text().splitlines()) == 1


@pytest.fixture
def nsm(make_mount, world_tmp):
    b = world_tmp / "rootfs"
    b.mkdir()
    (b / "f").write_text("f\n")
    return make_mount(["--policy", "tcb"], backing=b)


def test_namespace_depth_is_limited(nsm):
    """One shell nests namespaces d1/d2/...: the 32nd level is created, the 33rd is
    ENOSPC (bash: "No space left on device"), logged and audited; the shell stays in
    d32, where a child is still refused and a read still works."""
    m, mnt = nsm, nsm.mnt
    r = host_sh(f"""
    for i in $(seq 1 {MAX_NS_DEPTH + 1}); do
      echo d$i > {mnt}/.imafs/ns-create || {{ echo failed_at=$i; break; }}
    done
    echo child > {mnt}/.imafs/ns-create; echo child=$?
    cat {mnt}/f > /dev/null; echo read=$?
    """, pidns=False, timeout=120)
    out = lines(r)
    assert out["failed_at"] == str(MAX_NS_DEPTH + 1), r
    assert r.stderr.count("No space left on device") == 2, r.stderr
    assert out["child"] == "1" and out["read"] == "0", r
    deep = "/".join(f"d{i}" for i in range(1, MAX_NS_DEPTH + 1))
    assert os.path.isdir(m.ctl("namespaces/" + "/namespaces/".join(deep.split("/"))))
    assert re.search(rf"ns-create by pid \d+ refused: namespace /{deep}/d{MAX_NS_DEPTH + 1} "
                     rf"would be {MAX_NS_DEPTH + 1} levels deep", m.log_text()), \
        m.log_text()[-2000:]
    recs = [x for x in m.audit() if x["type"] == "ns_create_rejected"]
    assert len(recs) == 2 and all("levels deep" in x["error"] for x in recs)


def test_namespace_count_is_limited(nsm):
    """MAX_NAMESPACES namespaces in a mount (the root not counted): one more is
    ENOSPC with a log line; removing one makes room for one."""
    m, mnt = nsm, nsm.mnt
    n = MAX_NAMESPACES
    r = host_sh(f"""
    for i in $(seq 1 {n}); do
      (echo n$i > {mnt}/.imafs/ns-create) 2>/dev/null || {{ echo failed_at=$i; break; }}
    done
    (echo extra > {mnt}/.imafs/ns-create); echo extra=$?
    echo n1 > {mnt}/.imafs/ns-remove; echo removed=$?
    (echo extra > {mnt}/.imafs/ns-create); echo extra2=$?
    (echo extra3 > {mnt}/.imafs/ns-create); echo extra3=$?
    """, pidns=False, timeout=600)
    out = lines(r)
    assert "failed_at" not in out, r.stdout[-500:] + r.stderr[-2000:]
    assert (out["extra"], out["removed"], out["extra2"], out["extra3"]) == \
        ("1", "0", "0", "1"), r
    assert r.stderr.count("No space left on device") == 2, r.stderr[-2000:]
    assert len(os.listdir(m.ctl("namespaces"))) == n
    assert len(re.findall(rf"ns-create by pid \d+ refused: the mount holds {n} integrity "
                          rf"namespaces", m.log_text())) == 2
