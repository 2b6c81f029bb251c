"""``imafs sign`` (in process): the security.ima forms it writes, recursion,
refusals, --hash-only, --print-only, key ids, fs-verity signatures."""
from __future__ import annotations

import errno
import hashlib
import os
import socket

import pytest
from cryptography import x509

from imafs.cli import main
from imafs.commands import sign
from imafs.ima import appraise as ap
from imafs.ima import hashing
from imafs.ima.verity import fsverity_digest_fd
from imafs.ima.keys import Keyring, keyid_of, keyid_of_public_key

from helpers import testkeys as tk
from helpers.cli import files, keydir, run  # noqa: F401 (fixtures)


def ima(path, name="security.ima"):
    return os.getxattr(path, name)


# --- sign ---------------------------------------------------------------------------
def test_sign_and_verify(keydir, files, capsys):
    rc, out, err = run(capsys, "sign", "--key", keydir / "signing_key.pem",
                       files / "a", files / "b")
    assert (rc, out, err) == (0, "", "")
    cert = x509.load_der_x509_certificate((keydir / "signing_cert.der").read_bytes())
    for n in "ab":
        x = ap.parse_ima_xattr(ima(files / n))
        assert (x.type, x.algo, x.keyid) == (3, "sha256", keyid_of(cert))
    rc, out, _ = run(capsys, "verify", "--keys", keydir, files / "a", files / "b")
    assert rc == 0 and out == f"{files}/a: pass\n{files}/b: pass\n"
    (files / "a").write_bytes(b"tampered\n")
    rc, out, _ = run(capsys, "verify", "--key", keydir / "signing_cert.der", files / "a",
                     files / "b")
    assert rc == 1 and out == f"{files}/a: fail (invalid-signature)\n{files}/b: pass\n"
    rc, out, _ = run(capsys, "verify", "-v", "--failures-only", "--key",
                     keydir / "signing_cert.der", files / "a", files / "b")
    assert out.startswith(f"{files}/a: fail (invalid-signature) [fail: key ")
    assert f"{files}/b" not in out        # (a bare "b:" may end the hex key id)


def test_sign_refuses_special_files_one_message_each(keydir, files, capsys):
    os.mkfifo(files / "fifo")
    os.symlink("a", files / "link")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(files / "sock"))
    os.mkdir(files / "dir")
    try:
        rc, _, err = run(capsys, "sign", "-q", "--key", keydir / "signing_key.pem", files / "fifo",
                         files / "a", files / "link", files / "sock", files / "dir",
                         files / "missing", files / "b")
    finally:
        s.close()
    assert rc == 1
    lines = err.splitlines()
    assert lines == [
        f"imafs sign: {files}/fifo: is a fifo, not a regular file",
        f"imafs sign: {files}/link: is a symbolic link (sign its target instead)",
        f"imafs sign: {files}/sock: is a socket, not a regular file",
        f"imafs sign: {files}/dir: is a directory (use -r)",
        f"imafs sign: {files}/missing: No such file or directory",
        "imafs sign: 5 of 7 file(s) not signed",
    ]
    assert ima(files / "a")[0] == 3 and ima(files / "b")[0] == 3


def test_sign_refuses_unreadable_files(keydir, files, capsys, monkeypatch):
    real = sign.open_regular

    def fake(path):
        if path.endswith("/a"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(path)
    monkeypatch.setattr(sign, "open_regular", fake)
    rc, _, err = run(capsys, "sign", "--key", keydir / "signing_key.pem", files / "a", files / "b")
    assert rc == 1 and f"{files}/a: cannot open: Permission denied" in err
    assert ima(files / "b")[0] == 3


def test_sign_recursive(keydir, files, capsys):
    (files / "d" / "e").mkdir(parents=True)
    (files / "d" / "e" / "f").write_bytes(b"deep")
    os.symlink("f", files / "d" / "e" / "g")
    os.symlink("e", files / "d" / "elink")
    rc, _, err = run(capsys, "sign", "-r", "--key", keydir / "signing_key.pem", files)
    assert rc == 1 and err.count("symbolic link") == 2
    assert ima(files / "d" / "e" / "f")[0] == 3
    rc, _, err = run(capsys, "sign", "-r", "--skip-special", "--key", keydir / "signing_key.pem",
                     files)
    assert (rc, err) == (0, "")
    rc, out, _ = run(capsys, "verify", "-r", "--skip-special", "--keys", keydir, files)
    assert rc == 0 and out.count(": pass") == 3


def _as_nobody(tmp, *argv):
    """``imafs ARGV`` (options first, then one or more paths starting with ``/``) in
    a forked child running as nobody: a fork, not an exec, since the interpreter and
    its standard library may live where nobody cannot reach them (so the command is
    first run here as root on an empty directory, to import what it imports)."""
    import subprocess
    import sys
    opts = [str(a) for a in argv if not str(a).startswith("/")]
    empty = tmp / "nobody.empty"
    empty.mkdir(exist_ok=True)
    main(opts + [str(empty)])
    out, err = tmp / "nobody.out", tmp / "nobody.err"
    pid = os.fork()
    if pid == 0:                                   # child: never returns into pytest
        rc = 99
        try:
            with open(out, "w") as o, open(err, "w") as e:    # opened as root
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                sys.stdout, sys.stderr = o, e
                try:
                    rc = main([str(a) for a in argv])
                except SystemExit as x:
                    rc = x.code if isinstance(x.code, int) else 98
                except BaseException:   # noqa: BLE001 - shown by the test's assertion
                    import traceback
                    traceback.print_exc(file=e)
                finally:
                    o.flush()
                    e.flush()
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status),
                                       out.read_text(), err.read_text())


@pytest.mark.parametrize("sub", ["zz", "aa"])
def test_recursive_reports_every_unreadable_directory(world_tmp, sub):
    """An unreadable directory is an error with a message, wherever the walk meets
    it: before other directories ("aa"), as the last one visited ("zz"), or as the
    path itself; the readable rest is still signed."""
    t = world_tmp / "t3"
    (t / "locked").mkdir(parents=True)
    os.chmod(t / "locked", 0o700)                  # root's: nobody cannot list it
    (t / sub).mkdir()
    (t / sub / "z").write_bytes(b"zzz\n")
    os.chown(t / sub / "z", 65534, 65534)
    locked_msg = f"{t}/locked: cannot list directory: Permission denied"
    p = _as_nobody(world_tmp, "sign", "-q", "--xattr", "user", "--hash-only", "-r", t)
    assert p.returncode == 1, p
    assert f"imafs sign: {locked_msg}" in p.stderr.splitlines(), p.stderr
    assert "1 of 2 file(s) not signed" in p.stderr
    assert ima(t / sub / "z", "user.ima") == b"\x04\x04" + hashlib.sha256(b"zzz\n").digest()
    p = _as_nobody(world_tmp, "verify", "-q", "--xattr", "user", "-r", t)
    assert p.returncode == 1, p
    assert sorted(p.stdout.splitlines()) == sorted([f"{t}/locked: error ("
                                                    "cannot list directory: Permission denied)",
                                                    f"{t}/{sub}/z: pass"]), p.stdout
    # the path itself, and a nested one after the last file
    (t / sub / "zlast").mkdir()
    os.chmod(t / sub / "zlast", 0o700)
    p = _as_nobody(world_tmp, "sign", "-q", "--xattr", "user", "--hash-only", "-r", t / "locked",
                   t / sub)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"imafs sign: {locked_msg}",
                                     f"imafs sign: {t}/{sub}/zlast: cannot list directory: "
                                     "Permission denied",
                                     "imafs sign: 2 of 3 file(s) not signed"], p.stderr


def test_sign_hash_only_and_user_xattr(files, capsys):
    assert run(capsys, "sign", "--hash-only", files / "a")[0] == 0
    assert ima(files / "a") == b"\x04\x04" + hashlib.sha256(b"alpha\n").digest()
    assert run(capsys, "sign", "--hash-only", "-a", "sha1", "--xattr", "user", files / "b")[0] == 0
    assert ima(files / "b", "user.ima") == b"\x01" + hashlib.sha1(b"beta\n" * 1000).digest()
    rc, out, _ = run(capsys, "verify", files / "a")
    assert rc == 0 and out.endswith("a: pass\n")
    rc, out, _ = run(capsys, "verify", "--require-sig", files / "a")
    assert rc == 1 and out.endswith("a: fail (IMA-signature-required)\n")
    rc, out, _ = run(capsys, "verify", "--xattr", "user", files / "b")
    assert rc == 0
    rc, out, _ = run(capsys, "verify", files / "b")          # no security.ima on b
    assert rc == 1 and out.endswith("b: fail (missing-hash)\n")


def test_sign_help_says_which_hash_form_each_algorithm_gets(capsys):
    """What --hash-only writes, as the help says it: 01 for md4, md5, sha1, else 04."""
    with pytest.raises(SystemExit):
        main(["sign", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "01 <digest> for md4, md5 and sha1, else 04 <algo> <digest>" in out
    for algo in ("md4", "md5", "sha1", "sha256"):
        form = ap.hash_xattr(algo, bytes(hashing.digest_size(algo)))[0]
        assert form == (1 if algo in ("md4", "md5", "sha1") else 4), algo


def test_sign_print_only(keydir, files, capsys):
    rc, out, _ = run(capsys, "sign", "-n", "--key", keydir / "signing_key.pem", files / "a")
    assert rc == 0 and out.startswith(f"{files}/a: 0302")
    with pytest.raises(OSError):
        ima(files / "a")
    # RSA PKCS#1 v1.5 is deterministic: the printed value is what sign writes
    run(capsys, "sign", "--key", keydir / "signing_key.pem", files / "a")
    assert ima(files / "a").hex() == out.split(": ")[1].strip()


def test_sign_key_ids(tmp_path, files, capsys):
    k = tk.key("ec")
    (tmp_path / "k.pem").write_bytes(tk.key_pem(k))
    c = tk.cert(k, ski=b"\x00" * 16 + b"\xab\xcd\xef\x01")
    (tmp_path / "c.der").write_bytes(tk.der(c))
    run(capsys, "sign", "--key", tmp_path / "k.pem", "--cert", tmp_path / "c.der", files / "a")
    assert ap.parse_ima_xattr(ima(files / "a")).keyid == 0xABCDEF01
    run(capsys, "sign", "--key", tmp_path / "k.pem", files / "a")       # evmctl's fallback
    assert ap.parse_ima_xattr(ima(files / "a")).keyid == keyid_of_public_key(k.public_key())
    (tmp_path / "kc.pem").write_bytes(tk.key_pem(k) + tk.pem(c))       # cert in the key file
    run(capsys, "sign", "--key", tmp_path / "kc.pem", files / "a")
    assert ap.parse_ima_xattr(ima(files / "a")).keyid == 0xABCDEF01
    run(capsys, "sign", "--key", tmp_path / "k.pem", "--keyid", "1234", files / "a")
    assert ap.parse_ima_xattr(ima(files / "a")).keyid == 0x1234
    (tmp_path / "other.der").write_bytes(tk.der(tk.cert(tk.key("rsa"))))
    rc, _, err = run(capsys, "sign", "--key", tmp_path / "k.pem", "--cert", tmp_path / "other.der",
                     files / "a")
    assert rc == 2 and "does not hold the public key" in err


def test_sign_usage_errors(keydir, files, capsys):
    rc, _, err = run(capsys, "sign", files / "a")
    assert rc == 2 and "--key is required" in err
    rc, _, err = run(capsys, "sign", "--key", keydir / "signing_cert.pem", files / "a")
    assert rc == 2 and "not a usable private key" in err
    rc, _, err = run(capsys, "sign", "--key", keydir / "signing_key.pem", "-a", "wp512",
                     files / "a")
    assert rc == 2 and "wp512" in err
    rc, _, err = run(capsys, "sign", "--verity", "-a", "sha384", "--key",
                     keydir / "signing_key.pem", files / "a")
    assert rc == 2 and "--verity needs" in err


def test_sign_verity(keydir, files, capsys):
    assert run(capsys, "sign", "--verity", "--key", keydir / "signing_key.pem", files / "b")[0] == 0
    v = ima(files / "b")
    assert v[:3] == b"\x06\x03\x04"
    fd = os.open(files / "b", os.O_RDONLY)
    try:
        vd = fsverity_digest_fd(fd)
    finally:
        os.close(fd)
    ring = Keyring()
    ring.load_dir(str(keydir))
    r = ap.appraise(v, lambda a: b"", ring, require_sig=False, sigv3_required=True,
                    verity_digest=lambda a: vd)
    assert r.passed
    rc, out, _ = run(capsys, "verify", "--keys", keydir, files / "b")
    assert rc == 0 and out.endswith("b: pass\n")


def test_streaming_hash_matches_hashlib(tmp_path):
    p = tmp_path / "big"
    data = os.urandom((1 << 20) * 2 + 12345)     # three of hash_fd's chunks
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    try:
        got = hashing.hash_fd(fd, ["sha256", "sha512"]).digests
    finally:
        os.close(fd)
    assert got == {"sha256": hashlib.sha256(data).digest(), "sha512": hashlib.sha512(data).digest()}
