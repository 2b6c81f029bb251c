"""Digest lists through real mounts (issue 17): the suite's Debian rootfs (an overlay
of the shared cache: never changed) appraised with NO per-file signature -- only the
list from ``imafs digest-list from-dpkg``, signed with a test key, loaded through
``digest_list_add`` -- and real programs run chrooted into the mount: they run; a
binary changed behind the mount, and one from no package, are refused; the list's own
signature is required; the list vouches for nothing once removed, and survives a
remount. Then the predictable PCR: two fresh mounts run the same commands in
different orders, at once, and end with the same PCR 10."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO, Mount, overlay_of

pytestmark = [pytest.mark.mount, pytest.mark.slow, pytest.mark.timeout(900)]

POLICY = """\
measure func=DIGEST_LIST_CHECK
appraise func=DIGEST_LIST_CHECK appraise_type=imasig
measure func=BPRM_CHECK digest_cache=content pcr=10
measure func=MMAP_CHECK digest_cache=content pcr=10
appraise func=BPRM_CHECK digest_cache=content
appraise func=MMAP_CHECK digest_cache=content
"""

COMMANDS = [
    ("dpkg -l", lambda out: "ii  dpkg " in out and "ii  apt " in out),
    ("apt-get --version", lambda out: out.startswith("apt ")),
    ("ls -lR /usr", lambda out: "/usr/bin:" in out and out.count("\n") > 1000),
]


def imafs(*args, ok=True):
    p = subprocess.run([*IMAFS, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    assert (p.returncode == 0) == ok, f"{args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def chroot(m: Mount, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["chroot", str(m.mnt), "/bin/sh", "-c", command],
                          capture_output=True, text=True, timeout=300)


def setup_rootfs(root: Path, dlist) -> None:
    (root / "lists").mkdir(exist_ok=True)
    shutil.copy2(dlist.list, root / "lists" / "debian.list")       # with security.ima
    shutil.copyfile(dlist.unsigned, root / "lists" / "unsigned.list")
    data = bytearray(dlist.list.read_bytes())
    data[-1] ^= 1                                     # one digest changed
    (root / "lists" / "tampered.list").write_bytes(data)
    os.setxattr(root / "lists" / "tampered.list", "security.ima",
                os.getxattr(dlist.list, "security.ima"))


def mount(work: Path, root: Path, keys: Path, policy: str = POLICY) -> Mount:
    (work / "policy").write_text(policy)
    m = Mount(root, work / "mnt", work / "state",
              ["--policy", str(work / "policy"), "--keys", str(keys)])
    m.mnt.mkdir(exist_ok=True)
    return m.start()


def entries(m: Mount) -> list[list[str]]:
    return [ln.split() for ln in m.ctl("ascii_runtime_measurements").read_text().splitlines()]


@pytest.fixture
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("dl-mount")
    os.chmod(d, 0o755)
    return d


def test_rootfs_appraised_by_its_digest_list(debian_rootfs, debian_digest_list, work):
    if os.geteuid() != 0 or shutil.which("chroot") is None:
        pytest.skip("needs root and chroot")
    with overlay_of(debian_rootfs, work / "ov") as root:
        setup_rootfs(root, debian_digest_list)
        # a binary from no package: a copy of one, one byte longer
        stray = root / "usr/local/bin/stray"
        stray.write_bytes((root / "usr/bin/true").read_bytes() + b"\0")
        stray.chmod(0o755)
        m = mount(work, root, debian_digest_list.keys)
        try:
            # no list yet: nothing runs (no file carries a signature)
            assert chroot(m, "true").returncode == 126
            # the list's own signature is required
            p = imafs("digest-list", "load", m.mnt, m.mnt / "lists/unsigned.list", ok=False)
            assert "/lists/unsigned.list: nolabel (IMA-signature-required)" in p.stderr
            assert "(EACCES)" in p.stderr
            # through the control file (what a container's root, who cannot reach the
            # host's control socket, writes)
            with pytest.raises(PermissionError):
                m.ctl("digest_list_add").write_text(str(m.mnt / "lists/tampered.list"))
            assert m.ctl("digests_count").read_text().startswith("Parser digests: 0\n"
                                                                 "File digests: 0\n")
            log = m.log_text()
            assert "unsigned.list: nolabel" in log and "tampered.list: fail" in log
            imafs("digest-list", "load", m.mnt, m.mnt / "lists/debian.list")
            count = m.ctl("digests_count").read_text()
            assert "Digest list digests: 1\n" in count
            assert int(count.split("File digests: ")[1].split("\n")[0]) > 4000
            assert os.listdir(m.ctl("digest_lists_loaded")) == ["debian.list"]
            shown = m.ctl("digest_lists_loaded/debian.list").read_text()
            assert "actions: measured,appraised,appraised_digsig" in shown
            assert "-- coreutils 9.1-1 (amd64)" in shown and '"source": "debian"' in shown

            for cmd, check in COMMANDS:
                p = chroot(m, cmd)
                assert p.returncode == 0 and check(p.stdout), (cmd, p.stderr)
            # measured: the shell refused before any list, the lists tried (measured,
            # then refused by appraisal, as the kernel does), the list; no file run
            # after it: every one was in it
            assert [e[-1] for e in entries(m)] == [
                "boot_aggregate", "/usr/bin/dash", "/lists/unsigned.list",
                "/lists/tampered.list", "/lists/debian.list"]

            ans = m.query("exec /usr/bin/ls")
            assert "digest in list debian.list (from coreutils 9.1-1)" in json.dumps(ans)
            assert p_ok(chroot(m, "ls / >/dev/null"))
            # a binary from no package, and one changed behind the mount
            assert chroot(m, "/usr/local/bin/stray").returncode == 126
            with open(root / "usr/bin/ls", "ab") as f:
                f.write(b"\0")
            assert chroot(m, "ls /").returncode == 126
            assert [e[-1] for e in entries(m)][5:] == ["/usr/local/bin/stray", "/usr/bin/ls"]
            refused = {r["path"] for r in m.audit() if r["type"] == "appraise"}
            assert refused >= {"/usr/local/bin/stray", "/usr/bin/ls"}

            # the index is in LMDB: a remount keeps the list (and its verdicts)
            restart(m)
            assert "Digest list digests: 1\n" in m.ctl("digests_count").read_text()
            assert p_ok(chroot(m, "dpkg -l >/dev/null"))
            # removed, it vouches for nothing: no verdict it gave survives
            m.ctl("digest_list_del").write_text(str(m.mnt / "lists/debian.list") + "\n")
            assert m.ctl("digests_count").read_text().startswith("Parser digests: 0\n"
                                                                 "File digests: 0\n")
            assert chroot(m, "dpkg -l").returncode == 126
            assert os.listdir(m.ctl("digest_lists_loaded")) == []
        finally:
            m.stop()


def restart(m: Mount) -> None:
    """Unmount, wait for the daemon to let go of its state, mount again."""
    m.stop()
    deadline = time.monotonic() + 60
    while True:
        try:
            m.start()
            return
        except RuntimeError as e:
            if "is in use by imafs daemon" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def p_ok(p: subprocess.CompletedProcess) -> bool:
    assert p.returncode == 0, p.stderr
    return True


PCR_COMMANDS = ["dpkg -l", "apt-get --version", "ls -l /usr/bin", "tar --version",
                "sed --version", "grep --version", "gzip --version", "find /etc -name x"]


def run_all(m: Mount, commands: list[str], out: dict) -> None:
    out[m.mnt] = [chroot(m, c).returncode for c in commands]


def test_predictable_pcr(debian_rootfs, debian_digest_list, work):
    """Two fresh mounts, the same commands in opposite orders, each mount's commands
    in two threads at once: the same PCR 10 and the same list (boot aggregate, the
    digest list), though every program and library was measured with digest_cache."""
    if os.geteuid() != 0 or shutil.which("chroot") is None:
        pytest.skip("needs root and chroot")
    with overlay_of(debian_rootfs, work / "a") as ra, overlay_of(debian_rootfs, work / "b") as rb:
        mounts = []
        try:
            for w, root in ((work / "a", ra), (work / "b", rb)):
                setup_rootfs(root, debian_digest_list)
                m = mount(w, root, debian_digest_list.keys)
                mounts.append(m)
                imafs("digest-list", "load", m.mnt, m.mnt / "lists/debian.list")
            half = len(PCR_COMMANDS) // 2
            orders = [PCR_COMMANDS, list(reversed(PCR_COMMANDS))]
            results: dict = {}
            threads = []
            for m, cmds in zip(mounts, orders):
                for part in (cmds[:half], cmds[half:]):
                    r: dict = {}
                    t = threading.Thread(target=run_all, args=(m, part, r))
                    t.start()
                    threads.append((t, r))
            for t, r in threads:
                t.join(300)
                for codes in r.values():
                    assert codes and set(codes) == {0}, r
            pcrs = [m.ctl("pcrs/sha256").read_text().splitlines()[10] for m in mounts]
            assert pcrs[0] == pcrs[1] and pcrs[0] != "PCR-10: " + "00" * 32
            lists = [m.ctl("ascii_runtime_measurements").read_text() for m in mounts]
            assert lists[0] == lists[1]
            assert [ln.split()[-1] for ln in lists[0].splitlines()] == [
                "boot_aggregate", "/lists/debian.list"]
            # and every program was decided: its verdict came from the list
            ans = mounts[0].query("exec /usr/bin/dpkg")
            assert "debian.list (from dpkg " in json.dumps(ans)
        finally:
            for m in mounts:
                m.stop()


def test_a_containers_list_does_not_vouch_for_the_host(make_mount, world_tmp):
    """A process in a child namespace loads a list of its own (signed for its own
    security.ima, its own key): its rules take it, the host's never do -- the host
    (and the child's opens, which the host's rules decide too) read the file only once
    the host has loaded a list of its own."""
    import hashlib
    from cryptography.hazmat.primitives import serialization
    from imafs.ima import appraise as ap
    from imafs.ima import digest_lists as dl
    from imafs.ima.keys import keyid_of
    b = world_tmp / "backing"
    (b / "lists").mkdir(parents=True)
    (b / "data").write_bytes(b"vouched for by a list\n")
    lst = dl.DigestList((dl.Block.of("file", "sha256",
                                      [hashlib.sha256(b"vouched for by a list\n").digest()]),))
    (b / "lists" / "c.list").write_bytes(lst.to_bytes())
    (b / "lists" / "h.list").write_bytes(lst.to_bytes())          # the same digests
    # the host appraises the lists its own user 12345 owns (the child's: its own rules)
    os.chown(b / "lists" / "h.list", 12345, 12345)
    keys = world_tmp / "keys"
    imafs("keygen", "--out", keys, "--type", "ec")
    imafs("sign", "-q", "--key", keys / "signing_key.pem", "--cert",
          keys / "signing_cert.der", b / "lists" / "h.list")
    rules = ("appraise func=DIGEST_LIST_CHECK appraise_type=imasig\n"
             "appraise func=FILE_CHECK mask=MAY_READ digest_cache=content\n")
    pol = world_tmp / "policy"
    pol.write_text("appraise func=DIGEST_LIST_CHECK fowner=12345 appraise_type=imasig\n"
                   "appraise func=FILE_CHECK mask=MAY_READ digest_cache=content\n")
    m = make_mount(["--policy", str(pol), "--keys", str(keys)], backing=b)
    mnt = m.mnt
    # the child labels its list through the mount (setxattr: its own security.ima)
    priv = serialization.load_pem_private_key((keys / "signing_key.pem").read_bytes(), None)
    sig = ap.sign_v2(priv, "sha256", hashlib.sha256(lst.to_bytes()).digest(),
                     keyid_of((keys / "signing_cert.der").read_bytes()))
    r = subprocess.run(["sh", "-c", f"""
        echo c > {mnt}/.imafs/ns-create || exit 9
        printf '%s' "{rules}" > {mnt}/.imafs/policy || exit 8
        cat {keys}/signing_cert.der > {mnt}/.imafs/keys || exit 7
        setfattr -n security.ima -v 0x{sig.hex()} {mnt}/lists/c.list || exit 6
        echo {mnt}/lists/c.list > {mnt}/.imafs/digest_list_add || exit 5
        cat {mnt}/.imafs/digests_count
        cat {mnt}/data && exit 4 || true"""], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "File digests: 1\n" in r.stdout        # the child's list is loaded
    child = m.ctl("namespaces/c/digest_lists_loaded")
    assert os.listdir(child) == ["c.list"]
    # the host has no list: neither its reads nor (above) the child's pass its rules
    assert m.ctl("digests_count").read_text().startswith("Parser digests: 0\nFile digests: 0")
    with pytest.raises(PermissionError):
        (mnt / "data").read_bytes()
    p = imafs("digest-list", "load", mnt, mnt / "lists/h.list", "--ns", "nosuch", ok=False)
    assert "no namespace 'nosuch' under /" in p.stderr and "(ENOENT)" in p.stderr
    p = imafs("digest-list", "load", mnt, mnt / "lists/h.list")     # the control socket
    assert "loaded as h.list into namespace / (1 digests, appraised,appraised_digsig" \
        in p.stderr
    assert (mnt / "data").read_bytes() == b"vouched for by a list\n"
    imafs("digest-list", "unload", mnt, "h.list")
    assert m.ctl("digests_count").read_text().startswith("Parser digests: 0\nFile digests: 0")
