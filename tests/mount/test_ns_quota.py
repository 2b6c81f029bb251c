"""Issue 14 item 5 (storage): what one integrity namespace can make the daemon store.

A container whose policy measures every read makes its list grow on the host's disk
with every new file it reads. With ``--ns-quota list:ENTRIES``, a child namespace at
its quota fails closed alone: its reads that need a new list entry get EIO, a
``quota_exceeded`` audit record and a log line say why (once), and the host and a
sibling namespace go on measuring; reads the list already has still work.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

pytestmark = pytest.mark.mount

QUOTA = 12
FILES = 30
POLICY = "measure func=FILE_CHECK mask=MAY_READ\n"
APPLETS = "sh cat echo printf sleep test".split()


def _rootfs(b):
    (b / "bin").mkdir()
    shutil.copy("/bin/busybox", b / "bin" / "busybox")
    for a in APPLETS:
        os.symlink("busybox", b / "bin" / a)
    for d in ("proc", "dev", "tmp", "data"):
        (b / d).mkdir()
    os.chmod(b / "tmp", 0o1777)
    os.mknod(b / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    for i in range(FILES):
        (b / "data" / f"f{i:02d}").write_text(f"file {i}\n")


def _container(m, name: str, script: str):
    argv = ["unshare", "--fork", "--kill-child", "--pid", f"--mount-proc={m.mnt}/proc",
            "chroot", str(m.mnt), "/bin/sh", "-c",
            f"echo {name} > /.imafs/ns-create || exit 9\n"
            f"printf '{POLICY.strip()}\\n' > /.imafs/policy || exit 8\n" + script]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


READ_ALL = f"""
i=0; ok=0; eio=0
while [ $i -lt {FILES} ]; do
  f=/data/f$(printf %02d $i)
  if cat $f > /dev/null; then ok=$((ok+1)); else eio=$((eio+1)); fi
  i=$((i+1))
done
cat /data/f00 > /dev/null && echo again=ok || echo again=fail
echo ok=$ok eio=$eio
"""


def _counts(out: str) -> dict:
    line = [li for li in out.splitlines() if li.startswith("ok=")][-1]
    return {k: int(v) for k, v in (w.split("=") for w in line.split())}


def test_child_at_its_quota_fails_closed_alone(make_mount, world_tmp):
    backing = world_tmp / "rootfs"
    backing.mkdir()
    _rootfs(backing)
    pol = world_tmp / "policy"
    pol.write_text(POLICY)
    m = make_mount(["--policy", str(pol), "--ns-quota", f"list:{QUOTA}"], backing=backing)

    r = _container(m, "greedy", READ_ALL)
    assert r.returncode == 0, r.stderr
    c = _counts(r.stdout)
    # boot_aggregate and ns-init are the list's first two entries
    assert c["ok"] == QUOTA - 2 and c["eio"] == FILES - (QUOTA - 2), r.stdout
    assert "Input/output error" in r.stderr, r.stderr
    assert "again=ok" in r.stdout         # what it has measured, it still reads
    greedy = m.ctl("namespaces/greedy/ascii_runtime_measurements").read_text()
    assert len(greedy.splitlines()) == QUOTA

    # a sibling has its own quota, untouched; the host measures on
    r2 = _container(m, "sibling", "cat /data/f29 > /dev/null && echo read=ok")
    assert "read=ok" in r2.stdout, (r2.stdout, r2.stderr)
    for i in range(FILES):
        assert (m.mnt / "data" / f"f{i:02d}").read_text() == f"file {i}\n"
    host = m.ctl("ascii_runtime_measurements").read_text()
    assert all(f"/data/f{i:02d}" in host for i in range(FILES))

    # said once, clearly: an audit record and a log line
    recs = [a for a in m.audit() if a["type"] == "quota_exceeded"]
    assert len(recs) == 1, m.audit()[-5:]
    assert recs[0]["ns"] == "/greedy" and recs[0]["limit_entries"] == QUOTA
    assert m.log_text().count("list quota reached (12 entries, at most 12): new entries "
                              "refused") == 1


def test_quota_is_refused_when_malformed(make_mount, world_tmp):
    from helpers.mounts import IMAFS, REPO
    b, mnt = world_tmp / "b", world_tmp / "m"
    b.mkdir()
    mnt.mkdir()
    p = subprocess.run(IMAFS + ["mount", str(b), str(mnt), "--ns-quota", "list:many"],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode != 0 and "list:many" in p.stderr


def test_digest_lists_of_a_child_at_its_quota(make_mount, world_tmp):
    """A container loads digest lists into its own namespace until its quota
    (``digest-lists:ENTRIES``): the next load is ENOSPC from write(2), audited once
    with the kind; the lists loaded stay; the host (no quota) loads as many as it
    likes."""
    import hashlib
    from imafs.ima import digest_lists as dl
    backing = world_tmp / "rootfs"
    backing.mkdir()
    _rootfs(backing)
    (backing / "lists").mkdir()
    for i in range(3):
        lst = dl.DigestList((dl.Block.of("file", "sha256",
                                          [hashlib.sha256(b"%d" % i).digest()]),))
        (backing / "lists" / f"l{i}.list").write_bytes(lst.to_bytes())
    pol = world_tmp / "policy"
    pol.write_text(POLICY)
    m = make_mount(["--policy", str(pol), "--ns-quota", "digest-lists:2"], backing=backing)
    r = _container(m, "lists", """
        for i in 0 1 2; do
          echo /lists/l$i.list > /.imafs/digest_list_add && echo loaded=$i || echo refused=$i
        done
        ls /.imafs/digest_lists_loaded/""")
    assert r.returncode == 0, r.stderr
    assert "loaded=0" in r.stdout and "loaded=1" in r.stdout and "refused=2" in r.stdout, \
        (r.stdout, r.stderr)
    assert "No space left on device" in r.stderr, r.stderr
    assert sorted(os.listdir(m.ctl("namespaces/lists/digest_lists_loaded"))) == \
        ["l0.list", "l1.list"]
    recs = [a for a in m.audit() if a["type"] == "quota_exceeded"]
    assert len(recs) == 1 and recs[0]["kind"] == "digest-lists" and recs[0]["ns"] == "/lists"
    assert "digest-lists quota reached (2 entries, at most 2)" in m.log_text()
    for i in range(3):               # the root namespace has no quota
        (m.ctl("digest_list_add")).write_text(f"{m.mnt}/lists/l{i}.list\n")
    assert len(os.listdir(m.ctl("digest_lists_loaded"))) == 3
