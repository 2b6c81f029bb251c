"""security.evm both ways with Debian's evmctl 1.4: on files of a real file system,
evmctl's portable and type-3 signatures verify with imafs.ima.evm and imafs's verify
with ``evmctl verify``; HMACs agree with ``evmctl hmac``. Through real mounts (the
end of this file): files evmctl signed (RSA, EC) pass a mount with ``--evm
enforce``; ``imafs sign --evm`` passes ``evmctl verify``; the HMACs the daemon
writes are evmctl's, and evmctl's pass the daemon."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import uuid as uuidlib
from dataclasses import replace
from pathlib import Path

import pytest

from imafs.ima import appraise as ap
from imafs.ima import evm
from imafs.ima import hashing
from imafs.ima.keys import Keyring

pytestmark = [pytest.mark.interop,
              pytest.mark.skipif(not shutil.which("evmctl") or not shutil.which("openssl"),
                                 reason="needs evmctl and openssl")]

OPENSSL_CNF = """\
[ req ]
distinguished_name = dn
prompt = no
x509_extensions = exts
[ dn ]
CN = evm interop key
[ exts ]
basicConstraints = critical,CA:FALSE
keyUsage = digitalSignature
subjectKeyIdentifier = hash
"""
FS_IOC_GETVERSION = 0x80087601      # _IOR('v', 1, long)
FS_IOC_GETFSUUID = 0x80111500       # _IOR(0x15, 0, struct fsuuid2)
EVM_KEY_PLAIN = Path("/etc/keys/evm-key-plain")
CAPS = bytes.fromhex("0100000200200000000000000000000000000000")   # cap_net_raw+ep


def sh(*argv, check=True):
    p = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(f"{argv}: rc {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


class Key:
    def __init__(self, d: Path, newkey_args):
        d.mkdir()
        (d / "x.cnf").write_text(OPENSSL_CNF)
        self.key, self.der = d / "key.pem", d / "cert.der"
        sh("openssl", "req", "-x509", "-new", "-nodes", "-sha256", "-days", "30", "-batch",
           "-config", d / "x.cnf", "-outform", "DER", "-out", self.der, "-keyout", self.key,
           *newkey_args)
        self.ring = Keyring()
        self.info = self.ring.add(self.der.read_bytes())

    def private(self):
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        return load_pem_private_key(self.key.read_bytes(), None)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    base = tmp_path_factory.mktemp("evm-keys")
    return {"rsa": Key(base / "rsa", ["-newkey", "rsa:2048"]),
            "ec": Key(base / "ec", ["-newkey", "ec", "-pkeyopt",
                                    "ec_paramgen_curve:prime256v1"])}


@pytest.fixture
def f(tmp_path):
    p = tmp_path / "prog"
    p.write_bytes(b"#!/bin/sh\necho evm interop\n" * 50)
    p.chmod(0o755)
    return p


# --- what the kernel would see of a file (the engine phase gets these from fs/sysio) -----


def generation(path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETVERSION, buf, True)
        return struct.unpack("<I", buf[:4])[0]
    finally:
        os.close(fd)


def fs_uuid(path) -> bytes:
    """sb->s_uuid, what the kernel hashes (FS_IOC_GETFSUUID, Linux 6.5+)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(17)
        fcntl.ioctl(fd, FS_IOC_GETFSUUID, buf, True)
        return bytes(buf[1:1 + buf[0]])
    finally:
        os.close(fd)


def describe(path, uuid: bytes | None = None, config=evm.DEFAULT_CONFIG) -> evm.FileMetadata:
    def getxattr(name):
        try:
            return os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            return None
    return evm.FileMetadata.collect(getxattr, os.lstat(path), generation=generation(path),
                                    fs_uuid=uuid, config=config)


def evm_value(path) -> bytes:
    return os.getxattr(path, "security.evm")


def check(path, key: Key | None = None, *, hmac_key=None, uuid=None,
          config=evm.DEFAULT_CONFIG) -> evm.EvmResult:
    return evm.evm_verify_hmac(evm_value(path), describe(path, uuid, config),
                               hmac_key=hmac_key, keyring=key.ring if key else None,
                               config=config)


def text_uuid(u: bytes) -> str:
    return str(uuidlib.UUID(bytes=u))


def ima_sign_ours(path, key: Key, algo="sha256"):
    digest = hashing.hash_bytes(Path(path).read_bytes(), algo)[algo]
    os.setxattr(path, "security.ima", ap.sign_v2(key.private(), algo, digest, key.info.keyid))


# --- portable signatures ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "ec"])
@pytest.mark.parametrize("algo", ["sha256", "sha1", "sha512"])
def test_evmctl_portable_signature_verifies_here(keys, f, kind, algo):
    k = keys[kind]
    sh("evmctl", "sign", "--portable", "--imasig", "-a", algo, "--key", k.key, f)
    assert evm_value(f)[:3] == bytes([5, 2, hashing.algo_id(algo)])
    r = check(f, k)
    assert r.status == "pass_immutable", r
    # not portable to another key
    other = keys["ec" if kind == "rsa" else "rsa"]
    assert check(f, other).cause == "invalid-signature"


@pytest.mark.parametrize("change", ["chmod u+s", "chown", "setcap", "ima"])
def test_evmctl_portable_signature_catches_metadata_changes(keys, f, change):
    k = keys["ec"]
    sh("evmctl", "sign", "--portable", "--imasig", "-a", "sha256", "--key", k.key, f)
    assert check(f, k).passed
    if change == "chmod u+s":
        os.chmod(f, 0o4755)
    elif change == "chown":
        os.chown(f, 1000, 1000)
    elif change == "setcap":
        os.setxattr(f, "security.capability", CAPS)
    else:
        ima = bytearray(os.getxattr(f, "security.ima"))
        ima[-1] ^= 1
        os.setxattr(f, "security.ima", bytes(ima))
    r = check(f, k)
    assert (r.status, r.cause) == ("fail_immutable", "invalid-signature")
    # and evmctl agrees
    assert sh("evmctl", "verify", "--key", k.der, f, check=False).returncode != 0


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_our_portable_signature_passes_evmctl_verify(keys, f, kind):
    k = keys[kind]
    ima_sign_ours(f, k)
    os.setxattr(f, "security.capability", CAPS)
    value = evm.sign_evm(k.private(), k.info.keyid, describe(f))
    os.setxattr(f, "security.evm", value)
    p = sh("evmctl", "-v", "verify", "--key", k.der, f, check=False)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "verification is OK" in p.stdout + p.stderr
    assert sh("evmctl", "ima_verify", "--key", k.der, f, check=False).returncode == 0
    os.chmod(f, 0o700)
    assert sh("evmctl", "verify", "--key", k.der, f, check=False).returncode != 0
    os.chmod(f, 0o755)
    os.chown(f, 0, 1)
    assert sh("evmctl", "verify", "--key", k.der, f, check=False).returncode != 0


def test_rsa_portable_signature_is_byte_identical_to_evmctl(keys, f):
    k = keys["rsa"]                       # RSA PKCS#1 v1.5 is deterministic
    sh("evmctl", "ima_sign", "-a", "sha256", "--key", k.key, f)
    p = sh("evmctl", "sign", "-n", "--portable", "-a", "sha384", "--key", k.key, f)
    theirs = bytes.fromhex(p.stdout.split()[-1])
    ours = evm.sign_evm(k.private(), k.info.keyid, describe(f), algo="sha384")
    assert ours == theirs


# --- type 3: inode, generation, UUID ---------------------------------------------------------


def test_type3_both_ways_with_the_file_systems_uuid(keys, f):
    """The UUID the kernel would hash (s_uuid) given to evmctl with --uuid (its blkid
    lookup needs /dev/block, which this machine lacks)."""
    k = keys["rsa"]
    u = fs_uuid(f)
    assert len(u) == 16
    sh("evmctl", "sign", "--imasig", "-a", "sha256", f"--uuid={text_uuid(u)}",
       "--key", k.key, f)
    assert evm_value(f)[0] == 3
    assert check(f, k, uuid=u).status == "pass"
    assert check(f, k, uuid=bytes(16) if any(u) else b"\1" * 16).cause == "invalid-signature"
    # the inode is covered: a copy with the same metadata fails
    g = f.with_name("copy")
    shutil.copy2(f, g)
    os.setxattr(g, "security.ima", os.getxattr(f, "security.ima"))
    os.setxattr(g, "security.evm", evm_value(f))
    assert check(g, k, uuid=u).cause == "invalid-signature"
    # ours, checked by evmctl
    value = evm.sign_evm(k.private(), k.info.keyid, describe(g, u), portable=False)
    os.setxattr(g, "security.evm", value)
    assert sh("evmctl", "verify", f"--uuid={text_uuid(u)}", "--key", k.der, g,
              check=False).returncode == 0


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_type3_with_a_given_uuid_and_generation(keys, f, kind):
    k = keys[kind]
    u = uuidlib.UUID("01234567-89ab-cdef-0123-456789abcdef")
    sh("evmctl", "sign", "--imasig", "-a", "sha256", f"--uuid={u}", "--key", k.key, f)
    assert check(f, k, uuid=u.bytes).passed
    assert not check(f, k, uuid=uuidlib.UUID(int=u.int ^ 1).bytes).passed
    # evmctl --generation overrides FS_IOC_GETVERSION: ours must hash the same number
    sh("evmctl", "sign", "-a", "sha256", f"--uuid={u}", "--generation", "7",
       "--key", k.key, f)
    m = describe(f, u.bytes)
    assert evm.evm_verify_hmac(evm_value(f), replace(m, generation=7), hmac_key=None,
                               keyring=k.ring).passed
    assert not evm.evm_verify_hmac(evm_value(f), replace(m, generation=8), hmac_key=None,
                                   keyring=k.ring).passed
    # ours with a UUID, evmctl with the same one and with another
    os.setxattr(f, "security.evm", evm.sign_evm(k.private(), k.info.keyid, m,
                                                portable=False, algo="sha512"))
    assert sh("evmctl", "verify", f"--uuid={u}", "--key", k.der, f,
              check=False).returncode == 0
    assert sh("evmctl", "verify", "--uuid=11234567-89ab-cdef-0123-456789abcdef",
              "--key", k.der, f, check=False).returncode != 0


def test_type3_without_uuid_and_32bit_h_misc(keys, f):
    """evmctl -u (no UUID) is EvmConfig(fsuuid=False); --m32 is bits=32."""
    k = keys["ec"]
    for extra, cfg in ((["-u"], evm.EvmConfig(fsuuid=False)),
                       (["-u", "--m32"], evm.EvmConfig(fsuuid=False, bits=32))):
        sh("evmctl", "sign", "--imasig", "-a", "sha256", *extra, "--key", k.key, f)
        assert check(f, k, config=cfg).passed, extra
        assert not check(f, k, config=evm.EvmConfig(fsuuid=False,
                                                     bits=96 - cfg.bits)).passed
        os.setxattr(f, "security.evm", evm.sign_evm(k.private(), k.info.keyid,
                                                    describe(f), portable=False,
                                                    config=cfg))
        assert sh("evmctl", "verify", *extra, "--key", k.der, f,
                  check=False).returncode == 0, extra


# --- the protected xattrs: all of them, and the SMACK extras ---------------------------------


def test_every_protected_xattr_both_ways(keys, f):
    k = keys["rsa"]
    os.setxattr(f, "security.selinux", b"system_u:object_r:bin_t:s0\0")
    os.setxattr(f, "security.SMACK64", b"_")
    os.setxattr(f, "security.apparmor", b"unconfined")
    os.setxattr(f, "security.capability", CAPS)
    os.setxattr(f, "user.unprotected", b"x")
    sh("evmctl", "sign", "--portable", "--imasig", "-a", "sha256", "--key", k.key, f)
    assert check(f, k).passed
    for name in ("security.selinux", "security.SMACK64", "security.apparmor"):
        old = os.getxattr(f, name)
        os.setxattr(f, name, old + b"!")
        assert not check(f, k).passed, name
        os.setxattr(f, name, old)
    os.setxattr(f, "user.unprotected", b"y")
    assert check(f, k).passed
    os.removexattr(f, "security.apparmor")
    assert not check(f, k).passed


def test_smack_extras_in_portable_signatures(keys, f):
    """The kernel hashes SMACK64EXEC/TRANSMUTE/MMAP into portable signatures whether or
    not they are enabled; evmctl only with --smack. So, like the kernel, imafs refuses
    evmctl's portable signature of a file carrying them unless --smack was given."""
    k = keys["ec"]
    os.setxattr(f, "security.SMACK64EXEC", b"exec_label")
    sh("evmctl", "sign", "--portable", "--imasig", "-a", "sha256", "--key", k.key, f)
    assert check(f, k).status == "fail_immutable"
    sh("evmctl", "sign", "--portable", "--smack", "-a", "sha256", "--key", k.key, f)
    assert check(f, k).status == "pass_immutable"
    assert sh("evmctl", "verify", "--smack", "--key", k.der, f, check=False).returncode == 0


# --- HMAC ------------------------------------------------------------------------------------


@pytest.fixture
def evm_key_plain():
    """Debian's evmctl 1.4 reads the HMAC key only from /etc/keys/evm-key-plain: write
    it, and put back whatever was there (or nothing), even when the test fails."""
    made_dir = not EVM_KEY_PLAIN.parent.exists()
    old = EVM_KEY_PLAIN.read_bytes() if EVM_KEY_PLAIN.exists() else None
    old_mode = EVM_KEY_PLAIN.stat().st_mode if old is not None else None

    def write(data: bytes) -> evm.HmacKey:
        EVM_KEY_PLAIN.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(EVM_KEY_PLAIN, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return evm.HmacKey.from_file(str(EVM_KEY_PLAIN))
    try:
        yield write
    finally:
        if old is None:
            with contextlib.suppress(FileNotFoundError):
                EVM_KEY_PLAIN.unlink()
            if made_dir:
                with contextlib.suppress(OSError):
                    EVM_KEY_PLAIN.parent.rmdir()
        else:
            EVM_KEY_PLAIN.write_bytes(old)
            os.chmod(EVM_KEY_PLAIN, old_mode & 0o7777)


NO_UUID = evm.EvmConfig(fsuuid=False)      # evmctl 1.4 hmac hashes no UUID


@pytest.mark.parametrize("keylen", [32, 64, 128])
def test_hmac_agrees_with_evmctl(evm_key_plain, f, keylen):
    key = evm_key_plain(os.urandom(keylen))
    sh("evmctl", "ima_hash", "-a", "sha256", f)
    os.setxattr(f, "security.capability", CAPS)
    os.setxattr(f, "security.selinux", b"system_u:object_r:bin_t:s0\0")
    sh("evmctl", "hmac", "-a", "sha1", f)
    theirs = evm_value(f)
    assert len(theirs) == 21 and theirs[0] == 2
    assert evm.hmac_xattr(key, describe(f), NO_UUID) == theirs
    assert check(f, hmac_key=key, config=NO_UUID).status == "pass"
    os.chown(f, 4242, 0)
    r = check(f, hmac_key=key, config=NO_UUID)
    assert (r.status, r.cause) == ("fail", "invalid-HMAC")
    # ours after the change (what the engine writes after a permitted chown) is what
    # evmctl computes for the new metadata
    ours = evm.evm_update_evmxattr(theirs, describe(f), key, NO_UUID)
    sh("evmctl", "hmac", "-a", "sha1", f)
    assert ours == evm_value(f)


def test_hmac_32bit_and_smack_agree_with_evmctl(evm_key_plain, f):
    key = evm_key_plain(b"k" * 48)
    os.setxattr(f, "security.SMACK64MMAP", b"mmap")
    sh("evmctl", "ima_hash", f)
    sh("evmctl", "hmac", "-a", "sha1", "--m32", f)
    assert evm_value(f) == evm.hmac_xattr(key, describe(f), evm.EvmConfig(fsuuid=False,
                                                                           bits=32))
    sh("evmctl", "hmac", "-a", "sha1", "--smack", f)
    cfg = evm.EvmConfig.with_smack_extras(fsuuid=False)
    assert evm_value(f) == evm.hmac_xattr(key, describe(f), cfg)
    assert evm_value(f) != evm.hmac_xattr(key, describe(f), NO_UUID)


def test_evmctl_default_hmac_is_not_the_kernels(evm_key_plain, f):
    """Without -a sha1, evmctl 1.4 writes an HMAC-SHA256 (02 + 32 bytes): the kernel
    refuses its length, and so does imafs -- with a hint."""
    key = evm_key_plain(bytes(range(40)))
    sh("evmctl", "ima_hash", f)
    sh("evmctl", "hmac", f)
    v = evm_value(f)
    assert len(v) == 33
    assert evm.evm_calc_hmac(key, describe(f), NO_UUID, algo="sha256") == v[1:]
    with pytest.raises(evm.EvmXattrError, match="-a sha1"):
        evm.parse_evm_xattr(v)
    r = check(f, hmac_key=key, config=NO_UUID)
    assert (r.status, r.cause) == ("fail", "malformed-evm")


def test_hmac_with_the_uuid_is_the_kernels_default(evm_key_plain, f):
    """With EVM_ATTR_FSUUID (distribution kernels) the HMAC covers the UUID, which
    evmctl 1.4 leaves out: the two differ exactly by it."""
    key = evm_key_plain(os.urandom(32))
    sh("evmctl", "ima_hash", f)
    sh("evmctl", "hmac", "-a", "sha1", f)
    u = fs_uuid(f)
    assert check(f, hmac_key=key, uuid=u).cause == "invalid-HMAC"
    m = describe(f, u)
    h = key.new()
    for name in evm.DEFAULT_CONFIG.names:
        if name in m.xattrs and evm.DEFAULT_CONFIG.is_protected(name):
            h.update(m.xattrs[name])
    h.update(evm.h_misc(evm.EVM_XATTR_HMAC, m) + u)
    assert evm.evm_calc_hmac(key, m) == h.digest()


# --- through a mount ----------------------------------------------------------------------

PROG = shutil.which("true") or "/bin/true"
IMAFS = [sys.executable, "-m", "imafs"]


def runs(path) -> int:
    """0 when the program ran, else the errno of the refused exec."""
    try:
        subprocess.run([str(path)], check=True, timeout=30)
        return 0
    except OSError as e:
        return e.errno


def policy_args(d: Path, text: str) -> list[str]:
    p = d / "policy"
    p.write_text(text)
    return ["--policy", str(p)]


def test_evmctl_portable_signatures_pass_a_mount(keys, make_mount, world_tmp):
    b = world_tmp / "backing"
    b.mkdir()
    for kind in ("rsa", "ec"):
        shutil.copy(PROG, b / kind)
        sh("evmctl", "sign", "--portable", "--imasig", "-a", "sha256", "--key",
           keys[kind].key, b / kind)
        assert evm_value(b / kind)[0] == 5
    m = make_mount(["--evm", "enforce", "--key", str(keys["rsa"].der), "--key",
                    str(keys["ec"].der)]
                   + policy_args(world_tmp, "appraise func=BPRM_CHECK appraise_type=imasig\n"),
                   backing=b)
    for kind in ("rsa", "ec"):
        assert runs(m.mnt / kind) == 0, kind
        os.chmod(b / kind, 0o4755)
        assert runs(m.mnt / kind) == errno.EACCES, kind
        os.chmod(b / kind, 0o755)
        assert runs(m.mnt / kind) == 0, kind
    # evmctl's ima_hash + portable signature of the metadata: a hash in security.ima
    # protected by a portable signature counts as a signature (PASS_IMMUTABLE)
    shutil.copy(PROG, b / "hashed")
    sh("evmctl", "ima_hash", "-a", "sha256", b / "hashed")
    sh("evmctl", "sign", "--portable", "-a", "sha256", "--key", keys["ec"].key, b / "hashed")
    assert os.getxattr(b / "hashed", "security.ima")[0] == 4
    assert runs(m.mnt / "hashed") == 0


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_imafs_sign_evm_passes_evmctl_verify(keys, world_tmp, kind):
    k = keys[kind]
    f = world_tmp / "prog"
    shutil.copy(PROG, f)
    os.setxattr(f, "security.capability", CAPS)
    sign = IMAFS + ["sign", "-q", "--evm", "--key", str(k.key), "--cert", str(k.der)]
    sh(*sign, "--portable", f)
    assert evm_value(f)[0] == 5
    p = sh("evmctl", "verify", "--key", k.der, f, check=False)
    assert p.returncode == 0, p.stderr + p.stdout
    # type 3, with the file system's UUID (as the kernel), a given one, and none
    u = fs_uuid(f)
    sh(*sign, f)
    assert evm_value(f)[0] == 3
    assert sh("evmctl", "verify", f"--uuid={text_uuid(u)}", "--key", k.der, f,
              check=False).returncode == 0
    given = "01234567-89ab-cdef-0123-456789abcdef"
    sh(*sign, "--uuid", given, "-a", "sha512", f)
    assert sh("evmctl", "verify", f"--uuid={given}", "--key", k.der, f,
              check=False).returncode == 0
    sh(*sign, "--uuid", "none", "--m32", f)
    assert sh("evmctl", "verify", "-u", "--m32", "--key", k.der, f,
              check=False).returncode == 0
    # and imafs verify --evm reads what evmctl signs
    sh("evmctl", "sign", "--portable", "--imasig", "-a", "sha256", "--key", k.key, f)
    p = sh(*IMAFS, "verify", "-q", "--evm", "--key", k.der, f)
    assert p.stdout.strip() == f"{f}: pass [evm: INTEGRITY_PASS_IMMUTABLE]"
    os.chmod(f, 0o700)
    p = sh(*IMAFS, "verify", "-q", "--evm", "--key", k.der, f, check=False)
    assert p.returncode == 1 and "fail (invalid-fail-immutable)" in p.stdout


def test_daemon_hmacs_are_evmctls(evm_key_plain, make_mount, world_tmp):
    """The same key for evmctl (/etc/keys/evm-key-plain) and the mount (--evm-key),
    HMACs without the UUID (--evm-fsuuid off, as evmctl 1.4): evmctl's HMAC passes
    the daemon, and the HMAC the daemon writes after a chmod through the mount is the
    one evmctl computes for the new metadata."""
    raw = os.urandom(48)
    evm_key_plain(raw)
    kf = world_tmp / "evm.key"
    fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    b = world_tmp / "backing"
    b.mkdir()
    prog = b / "prog"
    shutil.copy(PROG, prog)
    sh("evmctl", "ima_hash", "-a", "sha256", prog)
    sh("evmctl", "hmac", "-a", "sha1", prog)
    theirs = evm_value(prog)
    m = make_mount(["--evm", "enforce", "--evm-key", str(kf), "--evm-fsuuid", "off"]
                   + policy_args(world_tmp, "appraise func=BPRM_CHECK\n"), backing=b)
    assert runs(m.mnt / "prog") == 0
    os.chmod(m.mnt / "prog", 0o750)
    ours = evm_value(prog)
    assert ours != theirs and runs(m.mnt / "prog") == 0
    sh("evmctl", "hmac", "-a", "sha1", prog)
    assert evm_value(prog) == ours
    os.setxattr(m.mnt / "prog", "security.capability", CAPS)
    ours = evm_value(prog)
    sh("evmctl", "hmac", "-a", "sha1", prog)
    assert evm_value(prog) == ours
    os.chmod(prog, 0o755)                           # behind the mount
    assert runs(m.mnt / "prog") == errno.EACCES
