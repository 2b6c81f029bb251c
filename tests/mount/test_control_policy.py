"""The ``policy`` control file through a real mount: error line numbers count from the
start of the open, across its writes; and, as the kernel's ima_write_policy, a
namespace whose policy appraises POLICY_CHECK takes rules only from a signed policy
file named by its path."""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.containers import host_sh, keygen, lines, sign

pytestmark = pytest.mark.mount

SIGNED_REQUIRED = "signed policy file (specified as an absolute pathname) required"


def write(path: Path, *chunks: bytes) -> list[int]:
    """Each chunk in one write(2) through one open; the errno of each write (0: ok),
    then of the close."""
    fd = os.open(path, os.O_WRONLY)
    out = []
    try:
        for c in chunks:
            try:
                os.write(fd, c)
                out.append(0)
            except OSError as e:
                out.append(e.errno)
    finally:
        try:
            os.close(fd)
            out.append(0)
        except OSError as e:
            out.append(e.errno)
    return out


def test_error_line_counts_from_the_open(make_mount):
    m = make_mount()
    p = m.ctl("policy")
    assert write(p, b"audit func=FILE_CHECK\n", b"measure func=BOGUS\n") == \
        [0, errno.EINVAL, 0]
    assert "line 2, column 9: " in m.log_text(), m.log_text()[-1000:]
    assert "line 1, column 9" not in m.log_text()
    assert m.ctl("policy").read_text() == ""           # nothing of that open loaded
    # lines cut across writes, blank lines and comments count too
    assert write(p, b"audit func=FILE_CHECK\nmeas", b"ure func=BPRM_CHECK\n\n# c\n",
                 b"measure func=MMAP_CHECK bogus=1\n") == [0, 0, errno.EINVAL, 0]
    assert re.search(r"line 5, column 25: ", m.log_text()), m.log_text()[-1000:]
    assert [r["error"] for r in m.audit() if r["type"] == "policy_rejected"][-1] \
        .startswith("line 5, column 25: ")
    # each open counts from 1 again
    assert write(p, b"measure func=BOGUS\n") == [errno.EINVAL, 0]
    assert re.findall(r"rejected \(pid \d+\): (line \d+), column 9", m.log_text())[-1] == "line 1"


def test_signed_policy_required(make_mount, world_tmp):
    """Under appraise_tcb (``appraise func=POLICY_CHECK appraise_type=imasig``): rules
    written as text are refused with EACCES and the kernel's message (log and audit
    log); an unsigned policy file named by its path is refused (EACCES, its
    appraisal in the audit log); a signed one is loaded."""
    k = keygen(world_tmp / "k")
    b = world_tmp / "backing1"
    b.mkdir()
    (b / "unsigned.policy").write_text("measure func=BPRM_CHECK\n")
    (b / "signed.policy").write_text("measure func=FILE_CHECK mask=MAY_READ\n")
    (b / "tampered.policy").write_text("measure func=MMAP_CHECK\n")
    sign(k, b / "signed.policy", b / "tampered.policy")
    with open(b / "tampered.policy", "a") as f:
        f.write("audit func=BPRM_CHECK\n")
    m = make_mount(["--policy", "appraise_tcb", "--key", str(k / "signing_cert.der")],
                   backing=b)
    p = m.ctl("policy")
    before = p.read_text()
    assert "appraise func=POLICY_CHECK appraise_type=imasig" in before
    assert write(p, b"measure func=BPRM_CHECK\n") == [errno.EACCES, 0]
    assert SIGNED_REQUIRED in m.log_text()
    rec = [r for r in m.audit() if r["type"] == "policy_rejected"][-1]
    assert rec["error"] == SIGNED_REQUIRED and rec["cause"] == "signed policy required"
    r = subprocess.run(["bash", "-c", f"echo 'measure func=BPRM_CHECK' > {p}"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr
    for name in ("unsigned", "tampered"):
        assert write(p, f"/{name}.policy\n".encode()) == [errno.EACCES, 0], name
        assert any(r["type"] == "appraise" and r["path"] == f"/{name}.policy"
                   and r["func"] == "POLICY_CHECK" and r["result"] != "pass"
                   for r in m.audit()), name
    assert p.read_text() == before
    # a signed file, by its path in the mount or below the mount point
    assert write(p, b"/signed.policy\n") == [0, 0]
    assert p.read_text() == before + "measure func=FILE_CHECK mask=MAY_READ \n"
    assert write(p, f"{m.mnt}/signed.policy\n".encode()) == [0, 0]
    assert p.read_text().count("measure func=FILE_CHECK") == 2
    # the kernel's rule is about what is written: a path line mixed with rules is text
    assert write(p, b"/signed.policy\nmeasure func=BPRM_CHECK\n") == [errno.EACCES, 0]


def test_signed_policy_required_in_a_child(make_mount, world_tmp):
    """A child that loads ``appraise func=POLICY_CHECK appraise_type=imasig`` takes no
    more text, and a policy file only when its own signature (its own security.ima,
    its own keyring) passes. The host writing the child's policy through
    namespaces/NAME/policy is held to the child's rule too: the file is appraised
    for the namespace it is loaded into (and its ancestors), not the writer's."""
    ck = keygen(world_tmp / "child")
    b = world_tmp / "rootfs"
    (b / "keys").mkdir(parents=True)
    (b / "tmp").mkdir()
    shutil.copy(ck / "signing_cert.der", b / "keys" / "child.der")
    (b / "child.policy").write_text("measure func=BPRM_CHECK\n")
    (b / "host-written.policy").write_text("measure func=MMAP_CHECK\n")
    sig = sign(ck, b / "child.policy", print_only=True).split(": ")[1].strip()
    m = make_mount([], backing=b)
    mnt = m.mnt
    r = host_sh(f"""
    echo c > {mnt}/.imafs/ns-create || exit 9
    echo /keys/child.der > {mnt}/.imafs/keys || exit 8
    echo 'appraise func=POLICY_CHECK appraise_type=imasig' > {mnt}/.imafs/policy || exit 7
    echo 'measure func=FILE_CHECK' > {mnt}/.imafs/policy; echo text=$?
    echo /child.policy > {mnt}/.imafs/policy; echo unsigned=$?
    setfattr -n security.ima -v 0x{sig} {mnt}/child.policy || exit 6
    echo /child.policy > {mnt}/.imafs/policy; echo signed=$?
    cat {mnt}/.imafs/policy > {mnt}/tmp/policy
    """, pidns=False)
    out = lines(r)
    assert (out.get("text"), out.get("unsigned"), out.get("signed")) == ("1", "1", "0"), r
    assert r.stderr.count("Permission denied") == 2, r.stderr
    assert (b / "tmp" / "policy").read_text() == \
        "appraise func=POLICY_CHECK appraise_type=imasig \nmeasure func=BPRM_CHECK \n"
    # the host: its own policy takes text, the child's does not, and a file it loads
    # into the child is appraised by the child's rule (unsigned for the child: refused)
    cp = m.ctl("namespaces/c/policy")
    assert write(cp, b"measure func=FILE_CHECK\n") == [errno.EACCES, 0]
    assert write(cp, b"/host-written.policy\n") == [errno.EACCES, 0]
    assert write(m.ctl("policy"), b"measure func=MMAP_CHECK\n") == [0, 0]
    assert cp.read_text() == (b / "tmp" / "policy").read_text()
    assert write(cp, b"/child.policy\n") == [0, 0]     # signed for the child: loaded
    assert cp.read_text().count("measure func=BPRM_CHECK") == 2
