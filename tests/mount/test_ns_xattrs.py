"""security.ima is per integrity namespace, and so is its listing: listxattr shows
``security.ima`` exactly when the caller's namespace has a value -- its own, or for a
child that wrote none the file's own, the image's (so getfattr -d, cp -a and tar
--xattrs keep each namespace's label) -- and never shows the private
``security.imafs.*`` names the values are stored under."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imafs.ima import appraise as ap

pytestmark = pytest.mark.mount

LISTER = r"""
import os, sys
for p in sys.argv[1:]:
    names = sorted(os.listxattr(p))
    vals = {}
    for n in names:
        try:
            vals[n] = os.getxattr(p, n).hex()
        except OSError as e:
            vals[n] = "E%d" % e.errno
    print(p.rsplit("/", 1)[-1], names, vals.get("security.ima", "-"))
"""


def _in_new_ns(mnt, name, script):
    """Run ``script`` (sh) after entering a new child namespace ``name``."""
    return subprocess.run(["sh", "-c", f"echo {name} > {mnt}/.imafs/ns-create || exit 9\n"
                           + script], capture_output=True, text=True, timeout=60)


def _listing(out: str) -> dict:
    res = {}
    for line in out.splitlines():
        name, rest = line.split(" ", 1)
        names, _, val = rest.rpartition("] ")
        res[name] = (eval(names + "]"), val)   # noqa: S307 - our own repr of a list
    return res


def test_listxattr_per_namespace(make_mount, world_tmp):
    b = world_tmp / "backing"
    b.mkdir()
    for n in ("both", "hostonly", "childonly", "none"):
        (b / n).write_bytes(n.encode() * 100)
    host_val = ap.hash_xattr("sha256", b"\x01" * 32)
    child_val = ap.hash_xattr("sha256", b"\x02" * 32)
    os.setxattr(b / "both", "security.ima", host_val)
    os.setxattr(b / "hostonly", "security.ima", host_val)
    os.setxattr(b / "none", "user.other", b"x")
    pol = world_tmp / "policy"
    pol.write_text("measure func=BPRM_CHECK\n")
    m = make_mount(["--policy", str(pol)], backing=b)
    mnt = m.mnt
    files = " ".join(str(mnt / n) for n in ("both", "hostonly", "childonly", "none"))
    r = _in_new_ns(mnt, "c", f"""
        setfattr -n security.ima -v 0x{child_val.hex()} {mnt}/both {mnt}/childonly || exit 8
        {sys.executable} -c '{LISTER}' {files}""")
    assert r.returncode == 0, r.stderr
    child = _listing(r.stdout)
    assert child["both"] == (["security.ima"], child_val.hex())
    assert child["childonly"] == (["security.ima"], child_val.hex())
    # a child without a value of its own sees the file's (the image's)
    assert child["hostonly"] == (["security.ima"], host_val.hex())
    assert child["none"] == (["user.other"], "-")
    # the host: its own values, never the private names
    r = subprocess.run([sys.executable, "-c", LISTER] + files.split(), capture_output=True,
                       text=True, check=True)
    host = _listing(r.stdout)
    assert host["both"] == (["security.ima"], host_val.hex())
    assert host["hostonly"] == (["security.ima"], host_val.hex())
    assert host["childonly"] == ([], "-")
    assert host["none"] == (["user.other"], "-")
    # the backing file holds both, under their own names
    assert any(n.startswith("security.imafs.") for n in os.listxattr(b / "childonly"))
    # a sibling sees neither the child's values nor their names: the files' own
    r = _in_new_ns(mnt, "sib", f"{sys.executable} -c '{LISTER}' {files}")
    assert r.returncode == 0, r.stderr
    sib = _listing(r.stdout)
    assert sib["both"] == (["security.ima"], host_val.hex())
    assert sib["childonly"] == ([], "-")
    # cp -a in the child keeps the child's label
    r = _in_new_ns(mnt, "c2", f"""
        setfattr -n security.ima -v 0x{child_val.hex()} {mnt}/none || exit 8
        cp -a {mnt}/none {mnt}/copy || exit 7
        getfattr --only-values -n security.ima {mnt}/copy | od -An -tx1 | tr -d ' \\n'""")
    assert r.returncode == 0 and r.stdout == child_val.hex(), (r.stdout, r.stderr)
