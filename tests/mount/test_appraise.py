"""Appraisal through real mounts: signed, unsigned, tampered, wrong-key and truncated
binaries executed from a shell; enforce, log and fix modes; writes to signed files;
``security.ima`` written through the mount; the ``keys`` control file; policy changes;
``ima-sig`` entries; the digest cache across a remount.  Interoperability with evmctl
both ways (marked ``interop``).  Expected values are computed here (hashlib over the
backing files, signatures made by imafs sign or evmctl)."""
from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from helpers.mounts import IMAFS, REPO, is_mounted, readable, run_as, wait_for
from imafs.cli import main as imafs_main
from imafs.ima import appraise as ap
from imafs.ima.keys import keyid_of
from imafs.ima.templates import parse_binary

from helpers import testkeys as tk

pytestmark = pytest.mark.mount

BUSYBOX = shutil.which("busybox") or "/bin/busybox"
HAVE_EVMCTL = bool(shutil.which("evmctl") and shutil.which("openssl"))
interop = pytest.mark.skipif(not HAVE_EVMCTL, reason="needs evmctl and openssl")
SH = 30  # timeout of every subprocess

OPENSSL_CNF = """\
[ req ]
distinguished_name = dn
prompt = no
string_mask = utf8only
x509_extensions = exts
[ dn ]
CN = {cn}
[ exts ]
basicConstraints = critical,CA:FALSE
keyUsage = digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


# -- keys -----------------------------------------------------------------------

class Key:
    def __init__(self, key: Path, der: Path, pem: Path | None = None):
        self.key, self.der, self.pem = key, der, pem

    @property
    def keyid(self) -> int:
        return keyid_of(self.der.read_bytes())

    def private(self):
        return serialization.load_pem_private_key(self.key.read_bytes(), None)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """imafs keygen keys (rsa, ec, other: never in a keyring unless a test adds it),
    and certificates a keyring must refuse (expired, no digitalSignature)."""
    base = tmp_path_factory.mktemp("appraise-keys")
    out = {}
    for name, extra in [("rsa", []), ("ec", ["--type", "ec"]), ("other", []),
                        ("p384", ["--type", "ec", "--curve", "secp384r1"])]:
        d = base / name
        assert imafs_main(["keygen", "--out", str(d), "--cn", f"imafs {name}", *extra]) == 0
        out[name] = Key(d / "signing_key.pem", d / "signing_cert.der", d / "signing_cert.pem")
    priv = tk.key("rsa", 7)
    (base / "expired.der").write_bytes(tk.der(tk.cert(
        priv, cn="expired", not_before=tk.NOW - dt.timedelta(days=60),
        not_after=tk.NOW - dt.timedelta(days=1))))
    (base / "nodigsig.der").write_bytes(tk.der(tk.cert(priv, cn="no digsig", digsig=False)))
    out["expired"] = base / "expired.der"
    out["nodigsig"] = base / "nodigsig.der"
    return out


@pytest.fixture(scope="module")
def ossl(tmp_path_factory):
    """openssl keys as INTEROP.md describes (DER certificates), for evmctl."""
    if not HAVE_EVMCTL:
        pytest.skip("needs evmctl and openssl")
    base = tmp_path_factory.mktemp("openssl-keys")
    out = {}
    for name, newkey in [("rsa", ["-newkey", "rsa:2048"]),
                         ("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]),
                         ("other", ["-newkey", "rsa:2048"])]:
        d = base / name
        d.mkdir()
        (d / "x.cnf").write_text(OPENSSL_CNF.format(cn=f"openssl {name}"))
        sh("openssl", "req", "-x509", "-new", "-nodes", "-utf8", "-sha256", "-days", "30",
           "-batch", "-config", d / "x.cnf", "-outform", "DER", "-out", d / "cert.der",
           "-keyout", d / "key.pem", *newkey)
        out[name] = Key(d / "key.pem", d / "cert.der")
    return out


# -- helpers --------------------------------------------------------------------

def sh(*argv, check=True, **kw):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=SH,
                       **kw)
    if check and p.returncode:
        raise AssertionError(f"{argv}: rc {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def sha(algo: str, path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algo).digest()


def sig_for(path, key: Key, algo: str = "sha256") -> bytes:
    """A signature v2 of the file's current content (imafs's own signer)."""
    return ap.sign_v2(key.private(), algo, sha(algo, path), key.keyid)


def imafs_sign(path, key: Key, algo: str = "sha256") -> bytes:
    assert imafs_main(["sign", "-q", "--key", str(key.key), "--cert", str(key.der),
                       "-a", algo, str(path)]) == 0
    return os.getxattr(path, "security.ima")


def xattr(path) -> bytes | None:
    try:
        return os.getxattr(path, "security.ima")
    except OSError as e:
        assert e.errno == errno.ENODATA, e
        return None


def policy(world_tmp, text: str) -> list[str]:
    p = world_tmp / f"policy-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
    p.write_text(text)
    return ["--policy", str(p)]


def sh_exec(path):
    """Run a busybox (by its path in the mount) from a shell: (exit status, stderr)."""
    p = sh("sh", "-c", '"$0" true', path, check=False)
    return p.returncode, p.stderr


def appraisals(m, path: str) -> list[tuple]:
    return [(r["result"], r["cause"], r["mode"]) for r in m.audit()
            if r["type"] == "appraise" and r["path"] == path]


def stats(m) -> dict:
    return json.loads(m.ctl("stats").read_text())


def add_key(m, data: bytes):
    """Write to MNT/.imafs/keys in one write; returns the errno (0 when accepted)."""
    fd = os.open(m.ctl("keys"), os.O_WRONLY)
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def busyboxes(backing: Path, names) -> dict[str, Path]:
    out = {}
    for n in names:
        (backing / n).mkdir()
        shutil.copy(BUSYBOX, backing / n / "busybox")
        out[n] = backing / n / "busybox"
    return out


EXEC_POLICY = "appraise func=BPRM_CHECK appraise_type=imasig\n" \
              "measure func=BPRM_CHECK template=ima-sig\n"


# -- enforce: binaries signed by evmctl --------------------------------------------

@pytest.mark.interop
@interop
def test_evmctl_signed_binaries_in_enforce_mode(make_mount, world_tmp, ossl):
    b = world_tmp / "backing1"
    b.mkdir()
    bins = busyboxes(b, ["rsa", "ec", "unsigned", "tampered", "wrongkey", "truncated",
                         "hashonly"])
    for n, k in [("rsa", "rsa"), ("ec", "ec"), ("tampered", "rsa"), ("wrongkey", "other"),
                 ("truncated", "ec")]:
        sh("evmctl", "ima_sign", "--key", ossl[k].key, "-a", "sha256", bins[n])
    with open(bins["tampered"], "ab") as f:
        f.write(b"\0")
    v = xattr(bins["truncated"])
    os.setxattr(bins["truncated"], "security.ima", v[:-1])
    sh("evmctl", "ima_hash", "-a", "sha256", bins["hashonly"])
    m = make_mount(policy(world_tmp, EXEC_POLICY)
                   + ["--key", str(ossl["rsa"].der), "--key", str(ossl["ec"].der)], backing=b)
    for n in ("rsa", "ec"):
        rc, err = sh_exec(m.mnt / n / "busybox")
        assert rc == 0, (n, err, m.log_text()[-2000:])
    expect = {"unsigned": ("nolabel", "IMA-signature-required"),
              "tampered": ("fail", "invalid-signature"),
              "wrongkey": ("fail", "invalid-signature"),
              "truncated": ("fail", "invalid-signature"),
              "hashonly": ("fail", "IMA-signature-required")}
    for n, (status, cause) in expect.items():
        rc, err = sh_exec(m.mnt / n / "busybox")
        assert rc == 126 and "Permission denied" in err, (n, rc, err)
        assert appraisals(m, f"/{n}/busybox") == [(status, cause, "enforce")], n
    # the second exec is refused again, on the cached verdict (no second hash)
    before = stats(m)["hashed_files"]
    assert sh_exec(m.mnt / "tampered" / "busybox")[0] == 126
    assert sh_exec(m.mnt / "rsa" / "busybox")[0] == 0
    assert stats(m)["hashed_files"] == before
    assert len(appraisals(m, "/tampered/busybox")) == 1     # audited once per version
    # query explains the refusal with the kernel's names
    q = m.query("exec /wrongkey/busybox")
    hook = [h for h in q["namespaces"][0]["hooks"] if h["func"] == "BPRM_CHECK"][0]
    a = hook["appraisal"]
    assert (a["status"], a["cause"], a["allowed"]) == ("fail", "invalid-signature", False)
    assert a["keyid"] == f"{ossl['other'].keyid:08x}" and "no key with id" in a["detail"]
    # ima-sig entries carry the whole security.ima of the signed binaries
    ents = {e.name: e for e in parse_binary(m.ctl("binary_runtime_measurements").read_bytes())}
    for n in ("rsa", "ec", "tampered"):
        e = ents[f"/{n}/busybox".encode()]
        assert e.template == "ima-sig" and e.get("sig") == xattr(bins[n]), n
        assert e.file_digest == (None, "sha256", sha("sha256", bins[n]))
    assert ents[b"/unsigned/busybox"].get("sig") == b""
    assert ents[b"/hashonly/busybox"].get("sig") == b""   # a hash is not a signature


# -- interop the other way: imafs signatures, evmctl verifies -----------------------

@pytest.mark.interop
@interop
def test_imafs_signatures_pass_evmctl_verify(make_mount, world_tmp, keys):
    b = world_tmp / "backing1"
    b.mkdir()
    for n, k in [("rsa", "rsa"), ("ec", "ec")]:
        (b / n).write_bytes(os.urandom(5000))
        imafs_sign(b / n, keys[k])
    (b / "late").write_bytes(b"signed through the mount\n" * 100)
    m = make_mount(policy(world_tmp, "appraise func=FILE_CHECK mask=MAY_READ "
                          "appraise_type=imasig\n")
                   + ["--keys", str(keys["rsa"].der.parent), "--key", str(keys["ec"].der)],
                   backing=b)
    lines = m.ctl("keys").read_text().splitlines()
    assert len(lines) == 2, lines    # DER and PEM of one --keys directory are one key
    for n in ("rsa", "ec"):
        for p in (b / n, m.mnt / n):             # backing file, and through the mount
            r = sh("evmctl", "ima_verify", "--key", keys[n].der, p, check=False)
            assert r.returncode == 0 and "verification is OK" in r.stdout + r.stderr, (p, r)
        r = sh("evmctl", "ima_verify", "--key", keys["other"].der, m.mnt / n, check=False)
        assert r.returncode != 0
    # a signature made by evmctl -n, written through the mount with setfattr
    assert not readable(m.mnt / "late")
    r = sh("evmctl", "ima_sign", "-n", "--key", keys["rsa"].key, "-a", "sha256", b / "late")
    value = re.search(r"^(0302[0-9a-f]+)$", r.stdout, re.M).group(1)
    sh("setfattr", "-n", "security.ima", "-v", "0x" + value, m.mnt / "late")
    assert xattr(b / "late") == bytes.fromhex(value)
    assert readable(m.mnt / "late")
    r = sh("evmctl", "ima_verify", "--key", keys["rsa"].der, m.mnt / "late", check=False)
    assert r.returncode == 0, r


@pytest.mark.interop
@interop
def test_evmctl_hash_values_pass_hash_rule(make_mount, world_tmp):
    b = world_tmp / "backing1"
    b.mkdir()
    for n in ("h256", "h512", "h1", "unlabeled", "tampered"):
        (b / n).write_bytes(os.urandom(3000))
    for n, algo in [("h256", "sha256"), ("h512", "sha512"), ("h1", "sha1"),
                    ("tampered", "sha256")]:
        sh("evmctl", "ima_hash", "-a", algo, b / n)
    assert xattr(b / "h256") == b"\x04\x04" + sha("sha256", b / "h256")
    with open(b / "tampered", "ab") as f:
        f.write(b"!")
    m = make_mount(policy(world_tmp, "appraise func=FILE_CHECK mask=MAY_READ\n"), backing=b)
    for n in ("h256", "h512", "h1"):
        assert (m.mnt / n).read_bytes() == (b / n).read_bytes(), n
        assert appraisals(m, f"/{n}") == []
    for n, want in [("unlabeled", ("nolabel", "missing-hash", "enforce")),
                    ("tampered", ("fail", "invalid-hash", "enforce"))]:
        with pytest.raises(PermissionError):
            (m.mnt / n).read_bytes()
        assert appraisals(m, f"/{n}") == [want], n


# -- modes ----------------------------------------------------------------------

def test_log_mode_allows_and_records(make_mount, world_tmp, keys):
    b = world_tmp / "backing1"
    b.mkdir()
    bins = busyboxes(b, ["signed", "unsigned", "tampered"])
    imafs_sign(bins["signed"], keys["rsa"])
    imafs_sign(bins["tampered"], keys["rsa"])
    with open(bins["tampered"], "ab") as f:
        f.write(b"\0")
    m = make_mount(policy(world_tmp, EXEC_POLICY)
                   + ["--appraise", "log", "--key", str(keys["rsa"].der)], backing=b)
    for _ in range(2):
        for n in bins:
            rc, err = sh_exec(m.mnt / n / "busybox")
            assert rc == 0, (n, err)
    assert appraisals(m, "/signed/busybox") == []
    assert appraisals(m, "/unsigned/busybox") == [("nolabel", "IMA-signature-required", "log")]
    assert appraisals(m, "/tampered/busybox") == [("fail", "invalid-signature", "log")]
    assert xattr(bins["unsigned"]) is None       # log mode never writes
    q = m.query("exec /tampered/busybox")
    a = [h for h in q["namespaces"][0]["hooks"] if h["func"] == "BPRM_CHECK"][0]["appraisal"]
    assert (a["status"], a["cause"], a["allowed"]) == ("fail", "invalid-signature", True)


def test_fix_mode_writes_hash_never_over_a_signature(make_mount, world_tmp, keys):
    b = world_tmp / "backing1"
    b.mkdir()
    for n in ("unlabeled", "wronghash", "signed", "badsig"):
        (b / n).write_bytes(os.urandom(6000))
    os.setxattr(b / "wronghash", "security.ima", b"\x04\x04" + bytes(32))
    imafs_sign(b / "signed", keys["rsa"])
    os.setxattr(b / "badsig", "security.ima", sig_for(b / "signed", keys["rsa"]))
    before = {n: xattr(b / n) for n in ("signed", "badsig")}
    m = make_mount(policy(world_tmp, "appraise func=FILE_CHECK mask=MAY_READ\n")
                   + ["--appraise", "fix", "--key", str(keys["rsa"].der)], backing=b)
    for n in ("unlabeled", "wronghash", "signed", "badsig"):
        assert (m.mnt / n).read_bytes() == (b / n).read_bytes(), n
    for n in ("unlabeled", "wronghash"):
        assert xattr(b / n) == b"\x04\x04" + sha("sha256", b / n), n
    assert {n: xattr(b / n) for n in ("signed", "badsig")} == before
    assert appraisals(m, "/unlabeled") == [("nolabel", "missing-hash", "fix")]
    assert appraisals(m, "/wronghash") == [("fail", "invalid-hash", "fix")]
    assert appraisals(m, "/badsig") == [("fail", "invalid-signature", "fix")]
    assert appraisals(m, "/signed") == []
    # the fixed files pass now: no new record
    for n in ("unlabeled", "wronghash"):
        (m.mnt / n).read_bytes()
        assert len(appraisals(m, f"/{n}")) == 1


def test_fix_mode_follows_the_kernel_algorithm_and_keeps_signatures(make_mount, world_tmp, keys):
    """ima_fix_xattr(): a wrong hash is rewritten in the algorithm its value names (a
    sha1 value stays sha1 with --hash sha256); a value refused only by appraise_algos=
    is left alone (that check follows the appraisal); a v3 (fs-verity) signature is
    never replaced."""
    b = world_tmp / "backing1"
    b.mkdir()
    for n in ("sha1", "algos", "v3"):
        (b / n).write_bytes(os.urandom(5000))
    os.setxattr(b / "sha1", "security.ima", b"\x01" + b"\x11" * 20)      # a wrong sha1 hash
    good256 = ap.hash_xattr("sha256", sha("sha256", b / "algos"))
    os.setxattr(b / "algos", "security.ima", good256)                    # right, but sha256
    v3 = b"\x06\x03\x04" + keys["rsa"].keyid.to_bytes(4, "big") + b"\x00\x04" + b"junk"
    os.setxattr(b / "v3", "security.ima", v3)
    m = make_mount(policy(world_tmp, "appraise func=FILE_CHECK mask=MAY_READ fowner=0 "
                          "appraise_algos=sha512,sha1\n")
                   + ["--appraise", "fix", "--hash", "sha256", "--key", str(keys["rsa"].der)],
                   backing=b)
    for n in ("sha1", "algos", "v3"):
        assert (m.mnt / n).read_bytes() == (b / n).read_bytes(), n
    assert xattr(b / "sha1") == b"\x01" + sha("sha1", b / "sha1")
    assert xattr(b / "algos") == good256
    assert appraisals(m, "/algos") == [("fail", "denied-hash-algorithm", "fix")]
    assert xattr(b / "v3") == v3


# -- writes ---------------------------------------------------------------------

def test_write_to_signed_file_refused_new_files_allowed(make_mount, world_tmp, keys):
    b = world_tmp / "backing1"
    b.mkdir()
    (b / "signed").write_bytes(b"signed content\n" * 50)
    imafs_sign(b / "signed", keys["rsa"])
    os.chown(b / "signed", 1000, 1000)
    (b / "hashed").write_bytes(b"hashed content\n" * 50)
    os.setxattr(b / "hashed", "security.ima", ap.hash_xattr("sha256", sha("sha256", b / "hashed")))
    content, label = (b / "signed").read_bytes(), xattr(b / "signed")
    m = make_mount(policy(world_tmp, "appraise func=FILE_CHECK fowner=1000 appraise_type=imasig\n"
                          "appraise func=FILE_CHECK\n")
                   + ["--key", str(keys["rsa"].der)], backing=b)
    signed = m.mnt / "signed"
    assert signed.read_bytes() == content
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND, os.O_WRONLY | os.O_TRUNC):
        with pytest.raises(PermissionError):
            os.close(os.open(signed, flags))
    r = sh("sh", "-c", 'echo x > "$0"', signed, check=False)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    assert (b / "signed").read_bytes() == content and xattr(b / "signed") == label
    assert [r["cause"] for r in m.audit() if r["type"] == "appraise"] == \
        ["write-signed-file"] * 5
    assert signed.read_bytes() == content        # still readable: the verdict is unchanged

    # a new file may be created and written; under a hash rule it is labelled when the
    # last writer closes (the kernel's ima_update_xattr), so it reads back
    new = m.mnt / "new"
    with open(new, "wb") as f:
        f.write(b"new file\n" * 100)
    # (FUSE RELEASE, where the last writer's close is seen, comes after close returns)
    assert wait_for(lambda: xattr(b / "new") == b"\x04\x04" + sha("sha256", b / "new"))
    assert new.read_bytes() == b"new file\n" * 100
    # a hash-labelled file that passed may be written; its label follows the content
    with open(m.mnt / "hashed", "ab") as f:
        f.write(b"more\n")
    assert wait_for(lambda: xattr(b / "hashed") == b"\x04\x04" + sha("sha256", b / "hashed"))
    assert (m.mnt / "hashed").read_bytes().endswith(b"more\n")


# -- security.ima through the mount ---------------------------------------------

def test_setxattr_through_mount_checked_and_resets_verdict(make_mount, world_tmp, keys):
    b = world_tmp / "backing1"
    b.mkdir()
    (b / "f").write_bytes(os.urandom(4096))
    (b / "g").write_bytes(os.urandom(4096))
    m = make_mount(policy(world_tmp, "appraise func=FILE_CHECK mask=MAY_READ "
                          "appraise_type=imasig\n") + ["--key", str(keys["rsa"].der)], backing=b)
    f = m.mnt / "f"
    assert not readable(f)
    # malformed values: EINVAL, the backing file keeps no value
    good = sig_for(b / "f", keys["rsa"])
    for bad in (b"\x01\x02", good[:-1], b"\x04\x04" + bytes(31), b"\x07" + bytes(20)):
        r = sh("setfattr", "-n", "security.ima", "-v", "0x" + bad.hex(), f, check=False)
        assert r.returncode != 0 and "Invalid argument" in r.stderr, (bad.hex(), r)
        assert xattr(b / "f") is None
    assert "refused security.ima on /f" in m.log_text()
    # a well-formed signature of other content: stored, still refused
    sh("setfattr", "-n", "security.ima", "-v", "0x" + sig_for(b / "g", keys["rsa"]).hex(), f)
    assert not readable(f)
    # the right signature: allowed at once (the verdict is re-derived)
    sh("setfattr", "-n", "security.ima", "-v", "0x" + good.hex(), f)
    assert xattr(b / "f") == good
    assert readable(f)
    # removed through the mount: refused again
    sh("setfattr", "-x", "security.ima", f)
    assert xattr(b / "f") is None
    assert not readable(f)
    assert [c for _, c, _ in appraisals(m, "/f")] == [
        "IMA-signature-required", "invalid-signature", "IMA-signature-required"]


# -- keys -----------------------------------------------------------------------

def test_keys_control_file(make_mount, world_tmp, keys):
    b = world_tmp / "backing1"
    b.mkdir()
    for n in ("rsa", "ec", "other", "p384"):
        (b / n).write_bytes(os.urandom(4096))
        imafs_sign(b / n, keys[n])
    (b / "certs").mkdir()
    shutil.copy(keys["rsa"].der, b / "certs" / "rsa.der")
    m = make_mount(policy(world_tmp, "appraise func=FILE_CHECK mask=MAY_READ "
                          "appraise_type=imasig\n"), backing=b)
    kf = m.ctl("keys")
    assert kf.read_text() == ""
    for n in ("rsa", "ec", "other", "p384"):    # refused, and the verdicts are cached
        assert not readable(m.mnt / n)
    assert appraisals(m, "/rsa") == [("fail", "invalid-signature", "enforce")]

    # a path inside the mount (shell echo: one write with a newline)
    sh("sh", "-c", 'echo /certs/rsa.der > "$0"', kf)
    assert readable(m.mnt / "rsa") and not readable(m.mnt / "ec")
    # DER bytes with cat
    sh("sh", "-c", 'cat "$1" > "$0"', kf, keys["ec"].der)
    assert readable(m.mnt / "ec") and not readable(m.mnt / "other")
    # PEM
    sh("sh", "-c", 'cat "$1" > "$0"', kf, keys["other"].pem)
    assert readable(m.mnt / "other") and not readable(m.mnt / "p384")
    # PEM after text, as ``openssl x509 -text`` writes it
    text = world_tmp / "p384.txt"
    text.write_bytes(b"Certificate:\n    Data:\n        Version: 3 (0x2)\n"
                     + keys["p384"].pem.read_bytes())
    sh("sh", "-c", 'cat "$1" > "$0"', kf, text)
    assert readable(m.mnt / "p384")
    lines = kf.read_text().splitlines()
    want = sorted([(keys["rsa"].keyid, "rsa", "2048", "CN=imafs rsa"),
                   (keys["ec"].keyid, "ecdsa-nist-p256", "256", "CN=imafs ec"),
                   (keys["other"].keyid, "rsa", "2048", "CN=imafs other"),
                   (keys["p384"].keyid, "ecdsa-nist-p384", "384", "CN=imafs p384")])
    got = []
    for line in lines:
        mt = re.fullmatch(r"([0-9a-f]{8}) (\S+) (\d+) (.+) \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", line)
        assert mt, line
        got.append((int(mt.group(1), 16), mt.group(2), mt.group(3), mt.group(4)))
    assert got == want

    # refused certificates: EINVAL and a clear line in the log and the audit log
    for name, why in [("expired", "certificate has expired"),
                      ("nodigsig", "certificate keyUsage lacks digitalSignature")]:
        assert add_key(m, keys[name].read_bytes()) == errno.EINVAL
        assert re.search(r"key write to namespace / rejected \(pid \d+\): " + why,
                         m.log_text()), name
        r = sh("sh", "-c", 'cat "$1" > "$0"', kf, keys[name], check=False)
        assert r.returncode != 0 and "Invalid argument" in r.stderr
    rejected = [r["error"] for r in m.audit() if r["type"] == "key_rejected"]
    assert len(rejected) == 4 and all(e.startswith("certificate") for e in rejected)
    assert kf.read_text().splitlines() == lines
    # not root: no key writes
    r = run_as(1000, 1000, ["sh", "-c", 'cat "$1" > "$0"', str(kf), str(keys["rsa"].der)],
               capture_output=True, text=True, timeout=SH)
    assert r.returncode != 0 and "Permission denied" in r.stderr


def test_mount_refuses_bad_certificates(world_tmp, keys):
    b, mnt = world_tmp / "b", world_tmp / "m"
    b.mkdir()
    mnt.mkdir()
    kd = world_tmp / "keys"
    kd.mkdir()
    shutil.copy(keys["nodigsig"], kd / "nodigsig.der")
    for args, want in [(["--key", str(keys["expired"])],
                        f"--key {keys['expired']}: certificate has expired"),
                       (["--keys", str(kd)], f"--keys {kd}: {kd}/nodigsig.der: certificate "
                                             "keyUsage lacks digitalSignature")]:
        r = sh(*IMAFS, "mount", b, mnt, "--state", world_tmp / "s", *args, check=False,
               cwd=REPO)
        assert r.returncode != 0 and want in r.stderr, r.stderr
        assert not is_mounted(str(mnt))


# -- policy ---------------------------------------------------------------------

def test_policy_append_rederives_verdicts_and_appraise_algos(make_mount, world_tmp, keys):
    b = world_tmp / "backing1"
    b.mkdir()
    for n in ("unsigned", "s256", "s512"):
        (b / n).write_bytes(os.urandom(4096))
    imafs_sign(b / "s256", keys["ec"])
    imafs_sign(b / "s512", keys["ec"], "sha512")
    m = make_mount(policy(world_tmp, EXEC_POLICY) + ["--key", str(keys["ec"].der)], backing=b)
    for n in ("unsigned", "s256", "s512"):
        assert readable(m.mnt / n), n
    with open(m.ctl("policy"), "a") as f:
        f.write("appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig "
                "appraise_algos=sha512\n")
    assert not readable(m.mnt / "unsigned")
    assert not readable(m.mnt / "s256")
    assert readable(m.mnt / "s512")
    assert appraisals(m, "/unsigned") == [("nolabel", "IMA-signature-required", "enforce")]
    assert appraisals(m, "/s256") == [("fail", "denied-hash-algorithm", "enforce")]
    q = m.query("/s256")
    a = q["namespaces"][0]["hooks"][0]["appraisal"]
    assert (a["status"], a["cause"], a["allowed"]) == ("fail", "denied-hash-algorithm", False)


# -- the digest cache -------------------------------------------------------------

CACHE_POLICY = "measure func=FILE_CHECK mask=MAY_READ template=ima-sig\n" \
               "appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig\n"


def test_remount_does_not_rehash_and_changes_are_seen(make_mount, world_tmp, keys):
    b = world_tmp / "backing1"
    (b / "d").mkdir(parents=True)
    names = [f"d/f{i:02d}" for i in range(20)]
    for n in names:
        (b / n).write_bytes(os.urandom(4096))
    assert imafs_main(["sign", "-q", "-r", "--key", str(keys["rsa"].key), "--cert",
                       str(keys["rsa"].der), str(b / "d")]) == 0
    (b / "unsigned").write_bytes(b"no signature\n")
    m = make_mount(policy(world_tmp, CACHE_POLICY) + ["--key", str(keys["rsa"].der)],
                   backing=b)

    def read_all():
        for n in names:
            assert (m.mnt / n).read_bytes() == (b / n).read_bytes(), n
        assert not readable(m.mnt / "unsigned")

    read_all()
    s = stats(m)
    assert s["hashed_files"] == 21 and s["hashed_bytes"] == 20 * 4096 + 13, s
    read_all()                                   # warm: no hashing at all
    assert stats(m)["hashed_files"] == 21
    # ima-sig: each entry carries the file's signature, and the digest it signs
    ents = {e.name: e for e in parse_binary(m.ctl("binary_runtime_measurements").read_bytes())}
    for n in names:
        e = ents[f"/{n}".encode()]
        assert e.get("sig") == xattr(b / n) and e.get("sig")[:2] == b"\x03\x02"
        assert e.file_digest == (None, "sha256", sha("sha256", b / n))
    assert ents[b"/unsigned"].get("sig") == b""

    # changed behind the mount, while mounted: never served on the old verdict
    with open(b / names[0], "ab") as f:
        f.write(b"\0")
    assert not readable(m.mnt / names[0])
    assert stats(m)["hashed_files"] == 22
    os.truncate(b / names[0], 4096)              # back to the signed content (new ctime)
    # changed through the mount (a write-only open is not appraised by a MAY_READ rule):
    # the next read is appraised again, and refused
    orig = (b / names[2]).read_bytes()
    fd = os.open(m.mnt / names[2], os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([orig[0] ^ 1]), 0)
    finally:
        os.close(fd)
    assert not readable(m.mnt / names[2])
    assert appraisals(m, f"/{names[2]}") == [("fail", "invalid-signature", "enforce")]
    assert stats(m)["hashed_files"] == 23
    (b / names[2]).write_bytes(orig)
    assert readable(m.mnt / names[2])            # hashed (24) and cached for the remount

    # remount with the same --state: digests come from LMDB
    m.restart()
    read_all()
    s = stats(m)
    assert s["hashed_files"] == 1 and s["cache_hits"] >= 20, s   # only the changed one
    m.restart()
    read_all()
    s = stats(m)
    assert s["hashed_files"] == 0 and s["cache_hits"] == 21, s
    # changed behind the mount while unmounted
    m.stop()
    with open(b / names[1], "r+b") as f:
        f.write(b"X")
    m.start()
    with pytest.raises(PermissionError):
        (m.mnt / names[1]).read_bytes()
    assert appraisals(m, f"/{names[1]}")[-1] == ("fail", "invalid-signature", "enforce")
    assert stats(m)["hashed_files"] == 1
