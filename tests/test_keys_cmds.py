"""``imafs keygen``, ``imafs sign`` and ``imafs verify`` (in process, no external tools)."""
from __future__ import annotations

import errno
import hashlib
import os
import socket
import stat

import pytest
from cryptography import x509

from imafs.cli import main
from imafs.commands import sign, verify
from imafs.ima import appraise as ap
from imafs.ima import hashing
from imafs.ima.verity import fsverity_digest_fd
from imafs.ima.keys import Keyring, keyid_of, keyid_of_public_key

import _ima_testkeys as tk


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ima(path, name="security.ima"):
    return os.getxattr(path, name)


@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    assert main(["keygen", "--out", str(d), "--cn", "unit test"]) == 0
    return d


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a").write_bytes(b"alpha\n")
    (tmp_path / "b").write_bytes(b"beta\n" * 1000)
    return tmp_path


# --- keygen -------------------------------------------------------------------------


def test_keygen_files(keydir, capsys):
    key = keydir / "signing_key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    cert = x509.load_der_x509_certificate((keydir / "signing_cert.der").read_bytes())
    assert x509.load_pem_x509_certificate((keydir / "signing_cert.pem").read_bytes()) == cert
    ext = cert.extensions
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert cert.subject.rfc4514_string() == "CN=unit test"
    info = Keyring().add((keydir / "signing_cert.der").read_bytes())
    assert info.algo == "rsa" and info.bits == 2048
    assert keyid_of(cert) == keyid_of_public_key(cert.public_key())


def test_keygen_ec_and_refusals(tmp_path, capsys):
    rc, out, _ = run(capsys, "keygen", "--out", tmp_path, "--type", "ec", "--curve",
                     "secp384r1", "--days", "10")
    assert rc == 0 and out.startswith("key id ")
    info = Keyring().add((tmp_path / "signing_cert.der").read_bytes())
    assert info.algo == "ecdsa-nist-p384"
    assert out.split()[2].rstrip(":") == f"{info.keyid:08x}"
    rc, _, err = run(capsys, "keygen", "--out", tmp_path)
    assert rc == 2 and "exists; use --force" in err
    assert run(capsys, "keygen", "--out", tmp_path, "--force", "--type", "ec")[0] == 0
    rc, _, err = run(capsys, "keygen", "--out", tmp_path / "x", "--type", "ec", "--curve", "nope")
    assert rc == 2 and "--curve nope" in err
    rc, _, err = run(capsys, "keygen", "--out", tmp_path / "x", "--bits", "512")
    assert rc == 2 and "1024..16384" in err
    rc, _, err = run(capsys, "keygen", "--out", tmp_path / "x", "--curve", "secp384r1")
    assert rc == 2 and "--curve applies to EC keys" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bits, curve", [(None, "secp256r1"), ("256", "secp256r1"),
                                         ("384", "secp384r1"), ("521", "secp521r1")])
def test_keygen_ec_bits_name_the_curve(tmp_path, capsys, bits, curve):
    argv = ["keygen", "--out", tmp_path, "--type", "ec"] + (["--bits", bits] if bits else [])
    rc, out, err = run(capsys, *argv)
    assert (rc, err) == (0, "")
    cert = x509.load_der_x509_certificate((tmp_path / "signing_cert.der").read_bytes())
    assert cert.public_key().curve.name == curve
    ext = cert.extensions          # what evmctl and the kernel need, as for RSA
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    info = Keyring().add((tmp_path / "signing_cert.der").read_bytes())
    assert info.bits == int(bits or 256) and out.split()[2] == f"{info.keyid:08x}:"
    key = sign._load_private_key(str(tmp_path / "signing_key.pem"), None)[0]
    assert key.curve.name == curve


@pytest.mark.parametrize("argv, want", [
    (["--bits", "512"], "--bits 512: EC keys have 256 (P-256), 384 (P-384) or 521 (P-521) bits"),
    (["--bits", "2048"], "--bits 2048: EC keys have 256"),
    (["--bits", "384", "--curve", "prime256v1"],
     "--bits 384 is secp384r1, but --curve prime256v1 is secp256r1"),
])
def test_keygen_ec_bits_refusals(tmp_path, capsys, argv, want):
    rc, _, err = run(capsys, "keygen", "--out", tmp_path / "k", "--type", "ec", *argv)
    assert rc == 2 and want in err, err
    assert not (tmp_path / "k").exists()
    # the same size through --curve and --bits is fine
    assert run(capsys, "keygen", "--out", tmp_path / "ok", "--type", "ec", "--bits", "384",
               "--curve", "p384")[0] == 0


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


# --- verify --policy: the mount's verdict ------------------------------------------


@pytest.fixture
def kinds(keydir, tmp_path, capsys):
    """One file per kind of security.ima value (and one without)."""
    d = tmp_path / "kinds"
    d.mkdir()
    key = str(keydir / "signing_key.pem")
    for n in ("v2", "v2-512", "v3", "hash", "hash-512", "none", "bad-v2"):
        (d / n).write_bytes(n.encode() * 1000)
    for argv in (["--key", key, d / "v2", d / "bad-v2"], ["--key", key, "-a", "sha512", d / "v2-512"],
                 ["--verity", "--key", key, d / "v3"], ["--hash-only", d / "hash"],
                 ["--hash-only", "-a", "sha512", d / "hash-512"]):
        assert main(["sign", "-q", *map(str, argv)]) == 0
    with open(d / "bad-v2", "ab") as f:
        f.write(b"!")
    capsys.readouterr()
    return d


def verdicts(capsys, keydir, kinds, *opts):
    rc, out, err = run(capsys, "verify", "-q", "--keys", keydir, *opts,
                       *sorted(kinds.iterdir()))
    got = {}
    for line in out.splitlines():
        path, _, v = line.partition(": ")
        got[path.rsplit("/", 1)[1]] = v
    return rc, got, err


def _policy(tmp_path, text):
    p = tmp_path / f"policy{abs(hash(text))}"
    p.write_text(text)
    return p


PASS_ALL = {"v2": "pass", "v2-512": "pass", "v3": "pass", "hash": "pass", "hash-512": "pass"}


def test_verify_without_policy_is_unchanged(capsys, keydir, kinds):
    rc, got, _ = verdicts(capsys, keydir, kinds)
    assert rc == 1 and got == {**PASS_ALL, "none": "fail (missing-hash)",
                               "bad-v2": "fail (invalid-signature)"}
    rc, got, _ = verdicts(capsys, keydir, kinds, "--require-sig")
    assert got == {"v2": "pass", "v2-512": "pass", "v3": "pass",
                   "hash": "fail (IMA-signature-required)",
                   "hash-512": "fail (IMA-signature-required)",
                   "none": "fail (IMA-signature-required)", "bad-v2": "fail (invalid-signature)"}


POLICY_VERDICTS = [
    # appraise_type=imasig without digest_type: a v3 signature is refused, as the mount does
    ("appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig",
     {"v2": "pass", "v2-512": "pass", "v3": "fail (IMA-signature-required)",
      "hash": "fail (IMA-signature-required)", "hash-512": "fail (IMA-signature-required)",
      "none": "fail (IMA-signature-required)", "bad-v2": "fail (invalid-signature)"}),
    # a plain appraise rule: v3 is checked over the file digest, and fails
    ("appraise func=FILE_CHECK",
     {**PASS_ALL, "v3": "fail (invalid-verity-signature)", "none": "fail (missing-hash)",
      "bad-v2": "fail (invalid-signature)"}),
    ("appraise func=FILE_CHECK digest_type=verity appraise_type=sigv3",
     {"v2": "fail (verity-signature-required)", "v2-512": "fail (verity-signature-required)",
      "v3": "pass", "hash": "fail (verity-signature-required)",
      "hash-512": "fail (verity-signature-required)",
      "none": "fail (verity-signature-required)", "bad-v2": "fail (verity-signature-required)"}),
    ("appraise func=FILE_CHECK appraise_algos=sha512",
     {"v2": "fail (denied-hash-algorithm)", "v2-512": "pass",
      "v3": "fail (invalid-verity-signature)", "hash": "fail (denied-hash-algorithm)",
      "hash-512": "pass", "none": "fail (missing-hash)", "bad-v2": "fail (invalid-signature)"}),
    # digest_type=verity from a measure rule is OR-ed into the decision (kernel, engine)
    ("measure func=FILE_CHECK digest_type=verity template=ima-ngv2\n"
     "appraise func=FILE_CHECK appraise_type=imasig",
     {"v2": "fail (verity-signature-required)", "v2-512": "fail (verity-signature-required)",
      "v3": "pass", "hash": "fail (verity-signature-required)",
      "hash-512": "fail (verity-signature-required)",
      "none": "fail (verity-signature-required)", "bad-v2": "fail (verity-signature-required)"}),
    # rules for other hooks, masks or owners: not appraised, allowed
    ("appraise func=BPRM_CHECK appraise_type=imasig\nappraise func=FILE_CHECK mask=MAY_WRITE\n"
     "appraise fowner=1000", {n: "not appraised" for n in (*PASS_ALL, "none", "bad-v2")}),
]


@pytest.mark.parametrize("rule, want", POLICY_VERDICTS)
def test_verify_policy_gives_the_rules_verdict(capsys, keydir, kinds, tmp_path, rule, want):
    rc, got, err = verdicts(capsys, keydir, kinds, "--policy", _policy(tmp_path, rule + "\n"))
    assert got == want and err == ""
    assert rc == (1 if any(v.startswith("fail") for v in want.values()) else 0)


def test_verify_policy_exec_dont_appraise_and_verbose(capsys, keydir, kinds, tmp_path):
    pol = _policy(tmp_path, "dont_appraise fowner=1000\n"
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
    bad = _policy(tmp_path, "appraise func=FILE_CHECK\nappraise bogus=1\n")
    rc, _, err = run(capsys, "verify", "--policy", bad, files / "a")
    assert rc == 2 and f"imafs verify: --policy: {bad}: line 2, column 10: " in err, err
    rc, _, err = run(capsys, "verify", "--policy", tmp_path / "missing", files / "a")
    assert rc == 2 and "cannot read policy" in err


@pytest.mark.mount
def test_verify_policy_agrees_with_the_mount(capsys, keydir, kinds, tmp_path, make_mount):
    """For each policy: what a mount with it says of a read by root of each file (its
    query file's appraisal, the open allowed or EACCES, the cause in its audit log) is
    what verify --policy says."""
    import json
    for rule, _ in POLICY_VERDICTS:
        pol = _policy(tmp_path, rule + "\n")
        rc, said, _ = verdicts(capsys, keydir, kinds, "--policy", pol)
        m = make_mount(["--policy", str(pol), "--keys", str(keydir)], backing=kinds)
        try:
            did = {}
            for n in said:
                q = m.query(f"/{n}")
                hooks = [h["appraisal"] for h in q["namespaces"][0]["hooks"]
                         if "appraisal" in h]
                fails = [a for a in hooks if a["status"] != "pass"]
                verdict = ("not appraised" if not hooks else
                           f"fail ({fails[0]['cause']})" if fails else "pass")
                try:
                    (m.mnt / n).read_bytes()
                    assert not fails, (rule, n, q)
                except PermissionError:
                    assert fails, (rule, n, q)
                    log = [json.loads(x) for x in
                           (m.state / "audit.log").read_text().splitlines()]
                    assert [r["cause"] for r in log if r["type"] == "appraise"
                            and r["path"] == f"/{n}"][-1] == fails[0]["cause"]
                did[n] = verdict
        finally:
            m.stop()
        assert did == said, rule


def test_verify_policy_mmap_check_for_elf_files(capsys, keydir, tmp_path):
    """A read-only open of an ELF file is also the dynamic loader's MMAP_CHECK, as the
    mount takes it (FUSE sees no mmap); other files are not."""
    import shutil
    elf, text = tmp_path / "lib.so", tmp_path / "notes"
    shutil.copy("/bin/true", elf)
    text.write_bytes(b"not an ELF file")
    pol = _policy(tmp_path, "appraise func=MMAP_CHECK appraise_type=imasig\n")
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
    pol = _policy(tmp_path, "appraise func=CREDS_CHECK euid=1000 appraise_type=imasig\n")
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
                     _policy(tmp_path, f"appraise fsuuid={uuid}\n"), f)
    assert (rc, out) == (1, f"{f}: fail (missing-hash)\n")
    other = "6f1a2b3c-0000-4000-8000-000000000000"
    rc, out, _ = run(capsys, "verify", "--policy",
                     _policy(tmp_path, f"appraise fsuuid={other}\n"), f)
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
