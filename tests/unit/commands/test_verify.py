"""``imafs verify`` (in process): offline appraisal with keys, and with
``--policy`` the verdict a mount with that policy gives (the mount itself:
tests/mount/test_verify.py)."""
from __future__ import annotations

import os

import pytest

from imafs.commands import verify
from imafs.ima.keys import Keyring

from helpers.cli import files, keydir, run  # noqa: F401 (fixtures)
from helpers.verify_kinds import (LIST_POLICY, LISTED_VERDICTS,  # noqa: F401 (fixtures)
                                  PASS_ALL, POLICY_VERDICTS, UNAPPRAISED_LIST_POLICY, kinds,
                                  listed, policy_file, verdicts)


def test_verify_keys_dir_ignores_private_keys_and_reports_junk(keydir, files, tmp_path, capsys):
    d = tmp_path / "k"
    d.mkdir()
    for n in ("signing_key.pem", "signing_cert.der"):
        (d / n).write_bytes((keydir / n).read_bytes())
    (d / "junk.der").write_bytes(b"junk")
    run(capsys, "sign", "--key", keydir / "signing_key.pem", files / "a")
    rc, out, err = run(capsys, "verify", "--keys", d, files / "a")
    assert rc == 0 and "junk.der" in err and "signing_key" not in err
    rc, _, err = run(capsys, "verify", "--key", d / "junk.der", files / "a")
    assert rc == 2 and "not an X.509 certificate" in err


def test_verify_without_policy_is_unchanged(capsys, keydir, kinds):
    rc, got, _ = verdicts(capsys, keydir, kinds)
    assert rc == 1 and got == {**PASS_ALL, "none": "fail (missing-hash)",
                               "bad-v2": "fail (invalid-signature)"}
    rc, got, _ = verdicts(capsys, keydir, kinds, "--require-sig")
    assert got == {"v2": "pass", "v2-512": "pass", "v3": "pass",
                   "hash": "fail (IMA-signature-required)",
                   "hash-512": "fail (IMA-signature-required)",
                   "none": "fail (IMA-signature-required)", "bad-v2": "fail (invalid-signature)"}


@pytest.mark.parametrize("rule, want", POLICY_VERDICTS)
def test_verify_policy_gives_the_rules_verdict(capsys, keydir, kinds, tmp_path, rule, want):
    rc, got, err = verdicts(capsys, keydir, kinds, "--policy", policy_file(tmp_path, rule + "\n"))
    assert got == want and err == ""
    assert rc == (1 if any(v.startswith("fail") for v in want.values()) else 0)


def test_verify_policy_exec_dont_appraise_and_verbose(capsys, keydir, kinds, tmp_path):
    pol = policy_file(tmp_path, "dont_appraise fowner=1000\n"
                  "appraise func=BPRM_CHECK mask=MAY_EXEC appraise_type=imasig\n")
    os.chown(kinds / "none", 1000, 1000)
    rc, got, _ = verdicts(capsys, keydir, kinds, "--policy", pol)
    assert rc == 0 and set(got.values()) == {"not appraised"}
    rc, got, _ = verdicts(capsys, keydir, kinds, "--policy", pol, "--exec")
    assert rc == 1 and got["none"] == "not appraised" and got["v2"] == "pass"
    assert got["hash"] == "fail (IMA-signature-required)"
    rc, out, _ = run(capsys, "verify", "-v", "--keys", keydir, "--policy", pol, "--exec",
                     kinds / "v2", kinds / "hash")
    lines = out.splitlines()
    assert lines[0].startswith(f"{kinds}/v2: pass (signed by key ")
    assert lines[0].endswith("; BPRM_CHECK rule 'appraise func=BPRM_CHECK mask=MAY_EXEC "
                             "appraise_type=imasig')")
    assert lines[1].startswith(f"{kinds}/hash: fail (IMA-signature-required) [fail: ")
    rc, out, _ = run(capsys, "verify", "--failures-only", "--keys", keydir, "--policy", pol,
                     kinds / "v2", kinds / "none")
    assert (rc, out) == (0, "")


def test_verify_policy_builtin_uses_the_file_system(capsys, keydir, tmp_path):
    """appraise_tcb: root's files are appraised, except on tmpfs (fsmagic), as the
    mount decides from the backing file's file system."""
    import shutil
    import tempfile
    disk = tmp_path / "f"
    disk.write_bytes(b"unsigned")
    shm = tempfile.mkdtemp(dir="/dev/shm")
    try:
        mem = os.path.join(shm, "f")
        with open(mem, "wb") as f:
            f.write(b"unsigned")
        rc, out, _ = run(capsys, "verify", "--policy", "appraise_tcb", disk, mem)
        assert rc == 1 and out == f"{disk}: fail (missing-hash)\n{mem}: not appraised\n"
    finally:
        shutil.rmtree(shm)


def test_verify_policy_usage_errors(capsys, keydir, files, tmp_path):
    rc, _, err = run(capsys, "verify", "--policy", "tcb", "--require-sig", files / "a")
    assert rc == 2 and "--require-sig and --policy" in err
    rc, _, err = run(capsys, "verify", "--exec", files / "a")
    assert rc == 2 and "--exec needs --policy" in err
    bad = policy_file(tmp_path, "appraise func=FILE_CHECK\nappraise bogus=1\n")
    rc, _, err = run(capsys, "verify", "--policy", bad, files / "a")
    assert rc == 2 and f"imafs verify: --policy: {bad}: line 2, column 10: " in err, err
    rc, _, err = run(capsys, "verify", "--policy", tmp_path / "missing", files / "a")
    assert rc == 2 and "cannot read policy" in err


def test_verify_policy_mmap_check_for_elf_files(capsys, keydir, tmp_path):
    """A read-only open of an ELF file is also the dynamic loader's MMAP_CHECK, as the
    mount takes it (FUSE sees no mmap); other files are not."""
    import shutil
    elf, text = tmp_path / "lib.so", tmp_path / "notes"
    shutil.copy("/bin/true", elf)
    text.write_bytes(b"not an ELF file")
    pol = policy_file(tmp_path, "appraise func=MMAP_CHECK appraise_type=imasig\n")
    rc, out, _ = run(capsys, "verify", "--keys", keydir, "--policy", pol, elf, text)
    assert rc == 1 and out == f"{elf}: fail (IMA-signature-required)\n{text}: not appraised\n"
    assert run(capsys, "sign", "-q", "--key", keydir / "signing_key.pem", elf)[0] == 0
    for opts in ([], ["--exec"]):     # an exec maps the ELF's segments too
        rc, out, _ = run(capsys, "verify", "--keys", keydir, "--policy", pol, *opts, elf, text)
        assert rc == 0 and out == f"{elf}: pass\n{text}: not appraised\n"


def test_verify_policy_exec_creds_check_sees_the_set_id_credentials(capsys, keydir, tmp_path):
    import shutil
    plain, setuid = tmp_path / "plain", tmp_path / "setuid"
    for p in (plain, setuid):
        shutil.copy("/bin/true", p)
    os.chown(setuid, 1000, 0)
    os.chmod(setuid, 0o4755)
    pol = policy_file(tmp_path, "appraise func=CREDS_CHECK euid=1000 appraise_type=imasig\n")
    rc, out, _ = run(capsys, "verify", "--keys", keydir, "--policy", pol, "--exec", plain,
                     setuid)
    assert rc == 1 and out == (f"{plain}: not appraised\n"
                               f"{setuid}: fail (IMA-signature-required)\n")
    rc, out, _ = run(capsys, "verify", "--keys", keydir, "--policy", pol, setuid)
    assert rc == 0 and out == f"{setuid}: not appraised\n"        # a read: no CREDS_CHECK


def test_verify_policy_sees_the_file_systems_uuid(capsys, tmp_path, monkeypatch):
    """fsuuid= rules compare the backing file system's UUID, as the mount does (the
    file-system facts are read for every policy, not only for those Policy.needs
    names: it leaves fsuuid out, since None is the null UUID there)."""
    from imafs.ima.iint import FsInfo
    uuid = "6f1a2b3c-0000-4000-8000-00000000abcd"
    monkeypatch.setattr(verify, "fs_info",
                        lambda fd, dev: FsInfo(magic=0xEF53, name="ext4", uuid=uuid))
    f = tmp_path / "f"
    f.write_bytes(b"unsigned")
    rc, out, _ = run(capsys, "verify", "--policy",
                     policy_file(tmp_path, f"appraise fsuuid={uuid}\n"), f)
    assert (rc, out) == (1, f"{f}: fail (missing-hash)\n")
    other = "6f1a2b3c-0000-4000-8000-000000000000"
    rc, out, _ = run(capsys, "verify", "--policy",
                     policy_file(tmp_path, f"appraise fsuuid={other}\n"), f)
    assert (rc, out) == (0, f"{f}: not appraised\n")


@pytest.mark.parametrize("policy_text", [
    "appraise func=FILE_CHECK\n", "appraise func=MMAP_CHECK_REQPROT\n",
    "appraise fowner=0\n", "measure func=BPRM_CHECK\n"])
def test_verify_policy_events_are_the_engines(tmp_path, policy_text):
    """verify --policy asks Policy.match about the events the engine derives from the
    same open (a guard against the two hook mappings drifting apart)."""
    import shutil
    from imafs.ima import hooks
    from imafs.ima.engine import Engine, FileRef, Subject
    from imafs.ima.keys import Keyring

    from imafs.ima.measurelog import MeasurementList
    from imafs.ima.namespaces import Namespace, NamespaceTree
    from imafs.ima.policy import Policy
    from imafs.ima.policy_parse import parse_policy
    from imafs.store import Store
    elf, suid, text = tmp_path / "elf", tmp_path / "suid", tmp_path / "text"
    shutil.copy("/bin/true", elf)
    shutil.copy("/bin/true", suid)
    os.chmod(suid, 0o6755)
    os.chown(suid, 1000, 1000)
    text.write_bytes(b"#!/bin/sh\n")
    store = Store(str(tmp_path / "lmdb"), sync=False)
    try:
        policy = Policy(parse_policy(policy_text))
        root = Namespace(id=0, name="", parent=None, policy=policy,
                         mlist=MeasurementList(store, 0), keyring=Keyring())
        engine = Engine(NamespaceTree(root), store=store)
        me = Subject(os.getpid(), 0, 0)
        for p in (elf, suid, text):
            fd = os.open(p, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                f = FileRef(fd=fd, st=st, path=b"/x", readable=True, reopen=lambda: -1,
                            getxattr=lambda n: None, setxattr=lambda n, v: None)
                ii = engine.iints.get(f.key)
                for exec_ in (False, True):
                    role = engine.exec_roles.role(me, f, ii) if exec_ else None
                    theirs = hooks.events(root.chain(), me, f, ii,
                                          0 if exec_ else 4, exec_, role=role)
                    ours = verify._root_events(policy, "/x", fd, st, exec_)
                    key = lambda e: (e.func, e.mask, e.uid, e.euid, e.gid, e.egid,  # noqa
                                     e.fowner, e.fgroup)
                    assert [key(e) for e in ours] == [key(e) for e in theirs], (p, exec_)
            finally:
                os.close(fd)
    finally:
        store.close()


def _snapshot(root):
    """Every file under root: name, size, mtime, xattrs (to see that nothing changed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p)] = (st.st_size, st.st_mtime_ns,
                       {a: os.getxattr(p, a) for a in os.listxattr(p)})
    return out


def test_verify_digest_list_vouches_for_its_files(capsys, keydir, listed, tmp_path):
    """With the signed list, the files it holds pass (-v: by the list), a file it does
    not hold is appraised by its security.ima (signed: pass, none: fail), a file
    changed since fails; without the list the listed files fail. A list loaded while
    no rule appraises DIGEST_LIST_CHECK vouches for no appraisal (said on stderr)."""
    files, lists = listed / "files", listed / "lists"
    pol = policy_file(tmp_path, LIST_POLICY)
    rc, got, err = verdicts(capsys, keydir, files, "--policy", pol)
    assert rc == 1 and err == "" and got == {**LISTED_VERDICTS, "listed-1": "fail (missing-hash)",
                                             "listed-2": "fail (missing-hash)"}
    rc, got, err = verdicts(capsys, keydir, files, "--policy", pol,
                            "--digest-list", lists / "t.list")
    assert rc == 1 and err == "" and got == LISTED_VERDICTS
    rc, out, err = run(capsys, "verify", "-q", "-v", "--keys", keydir, "--policy", pol,
                       "--digest-list", lists / "t.list", files / "listed-1", files / "signed")
    assert rc == 0 and f"{lists / 't.list'}: loaded as t.list (3 digests, measured,appraised," \
        "appraised_digsig)" in err
    assert f"{files / 'listed-1'}: pass (digest in list t.list; FILE_CHECK rule" in out
    assert f"{files / 'signed'}: pass (signed" in out, out
    unappraised = policy_file(tmp_path, UNAPPRAISED_LIST_POLICY)
    rc, got, err = verdicts(capsys, keydir, files, "--policy", unappraised,
                            "--digest-list", lists / "unsigned.list")
    assert rc == 1 and got["listed-1"] == "fail (missing-hash)" and got["signed"] == "pass"
    assert "loaded as unsigned.list (measured): no rule appraises DIGEST_LIST_CHECK" in err


@pytest.mark.parametrize("lst, keys, want", [
    ("unsigned.list", True, ": nolabel (IMA-signature-required): no security.ima (EACCES)"),
    ("t.list", False, ": fail (invalid-signature): no key with id"),
    ("bad.list", True, ": bad.list: byte "),        # signed, appraised, then parsed
    ("missing.list", True, ": No such file or directory"),
])
def test_verify_digest_list_refused(capsys, keydir, listed, tmp_path, lst, keys, want):
    """A list the mount would refuse (unsigned when the policy appraises it, a
    signature no key verifies, malformed, missing), after a good one: exit 2, a message
    naming the file, no verdict printed, nothing changed, no scratch index left."""
    import tempfile
    files, lists = listed / "files", listed / "lists"
    pol = policy_file(tmp_path, LIST_POLICY)
    first = ("--digest-list", lists / "t.list") if keys else ()
    before = _snapshot(listed)
    left = set(os.listdir(tempfile.gettempdir()))
    rc, out, err = run(capsys, "verify", "-q", *(("--keys", keydir) if keys else ()),
                       "--policy", pol, *first, "--digest-list", lists / lst,
                       *sorted(files.iterdir()))
    assert rc == 2 and out == "", (out, err)
    assert err.startswith(f"imafs verify: --digest-list {lists / lst}: ") and want in err, err
    assert _snapshot(listed) == before
    assert set(os.listdir(tempfile.gettempdir())) == left


def test_verify_digest_list_usage_errors(capsys, keydir, listed, tmp_path):
    lists = listed / "lists"
    rc, _, err = run(capsys, "verify", "--digest-list", lists / "t.list",
                     listed / "files" / "listed-1")
    assert rc == 2 and "--digest-list needs --policy" in err
    rc, out, err = run(capsys, "verify", "--keys", keydir, "--policy",
                       policy_file(tmp_path, LIST_POLICY), "--digest-list", lists / "t.list",
                       "--digest-list", lists / "t.list", listed / "files" / "listed-1")
    assert rc == 2 and out == "" and "a digest list named 't.list' is already loaded" in err \
        and "(EEXIST)" in err
