"""Digest lists from RPM packages built by rpmbuild and signed by rpmsign here (Debian's
``rpm`` package), the header signature checked by rpmkeys: a list holds exactly the
regular files' digests; an unsigned package, a changed header, a package signed by a
key that was not given, and no key at all are each refused, saying which and why."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO
from imafs.ima import digest_lists as dl
from imafs.sources import SourceError, rpm

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]
for _tool in ("rpmbuild", "rpmsign", "rpmkeys", "gpg"):
    if shutil.which(_tool) is None:
        pytestmark.append(pytest.mark.skip(reason=f"{_tool} is not installed (Debian rpm)"))

HELLO = b"#!/bin/sh\necho hello\n"
DATA = b"data\n"


def imafs(*args, ok=True):
    p = subprocess.run([*IMAFS, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    assert (p.returncode == 0) == ok, f"{args}: rc {p.returncode}\n{p.stderr}"
    return p


def gpg_key(home: Path, uid: str) -> tuple[Path, str]:
    home.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(home))
    subprocess.run(["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key", uid,
                    "rsa2048", "sign", "never"], env=env, check=True, capture_output=True)
    asc = home / "key.asc"
    asc.write_bytes(subprocess.run(["gpg", "--batch", "--armor", "--export", uid], env=env,
                                   check=True, capture_output=True).stdout)
    fpr = subprocess.run(["gpg", "--batch", "--with-colons", "--fingerprint", uid], env=env,
                         capture_output=True, text=True).stdout.split("fpr:::::::::")[1][:40]
    return asc, fpr


def build_rpm(top: Path, name: str, version: str) -> Path:
    (top / "SPECS").mkdir(parents=True, exist_ok=True)
    spec = top / "SPECS" / f"{name}.spec"
    spec.write_text(f"""Name: {name}
Version: {version}
Release: 1
Epoch: 3
Summary: imafs test package
License: MIT
BuildArch: noarch
%description
test
%install
mkdir -p %{{buildroot}}/usr/bin %{{buildroot}}/usr/share/{name}
printf '#!/bin/sh\\necho hello\\n' > %{{buildroot}}/usr/bin/{name}
chmod 755 %{{buildroot}}/usr/bin/{name}
printf 'data\\n' > %{{buildroot}}/usr/share/{name}/data
ln -s {name} %{{buildroot}}/usr/bin/{name}-link
%files
/usr/bin/{name}
/usr/bin/{name}-link
/usr/share/{name}
""")
    subprocess.run(["rpmbuild", "--define", f"_topdir {top}", "-bb", str(spec)], check=True,
                   capture_output=True)
    return next((top / "RPMS" / "noarch").glob(f"{name}-{version}-*.rpm"))


def sign(path: Path, home: Path, uid: str) -> None:
    subprocess.run(["rpmsign", "--define", f"_gpg_name {uid}", "--define", "__gpg /usr/bin/gpg",
                    "--addsign", str(path)], env=dict(os.environ, GNUPGHOME=str(home)),
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    t = tmp_path_factory.mktemp("rpm")
    uid = "imafs rpm test <rpm@example.org>"
    asc, fpr = gpg_key(t / "gnupg", uid)
    other_uid = "other <other@example.org>"
    other_asc, _ = gpg_key(t / "other", other_uid)
    good = build_rpm(t / "top", "hello", "1.0")
    sign(good, t / "gnupg", uid)
    unsigned = build_rpm(t / "top2", "plain", "1.0")
    by_other = build_rpm(t / "top3", "stranger", "1.0")
    sign(by_other, t / "other", other_uid)
    return {"dir": t, "asc": asc, "fpr": fpr, "good": good, "unsigned": unsigned,
            "other": by_other, "other_asc": other_asc}


def test_from_rpm_lists_the_header_digests(pkgs):
    out = pkgs["dir"] / "rpm.list"
    p = imafs("digest-list", "from-rpm", pkgs["good"], "-o", out, "--keyring", pkgs["asc"])
    assert f"header signed by key {pkgs['fpr'][-8:].lower()}" in p.stderr
    lst = dl.parse(out.read_bytes())
    assert {d for _, _, _, d in lst.digests()} == {hashlib.sha256(HELLO).digest(),
                                                   hashlib.sha256(DATA).digest()}
    prov = lst.provenance
    assert prov.source == "rpm" and prov.keys == (pkgs["fpr"],)
    (pkg,) = prov.packages
    assert (pkg.name, pkg.version, pkg.arch, pkg.files, pkg.key) == (
        "hello", "3:1.0-1", "noarch", 2, pkgs["fpr"])
    show = imafs("digest-list", "show", out).stdout
    assert f"hello 3:1.0-1 noarch: 2 files, 2 digests, header sha256 " in show
    assert pkgs["fpr"] in show


def test_file_names_and_modes_from_the_header(pkgs):
    r = rpm.read_rpm(str(pkgs["good"]), [str(pkgs["asc"])])
    assert [n for n, _ in r.files] == ["/usr/bin/hello", "/usr/share/hello/data"]
    assert r.algo == "sha256"


def test_unsigned_package_is_refused(pkgs):
    p = imafs("digest-list", "from-rpm", pkgs["unsigned"], "-o", pkgs["dir"] / "x.list",
              "--keyring", pkgs["asc"], ok=False)
    assert f"{pkgs['unsigned']}: the package has no header signature" in p.stderr


def test_bad_header_signature_is_refused(pkgs):
    data = pkgs["good"].read_bytes()
    digest = hashlib.sha256(HELLO).hexdigest().encode()
    i = data.index(digest)
    bad = pkgs["dir"] / "bad.rpm"
    # a header that names another file content: the header signature no longer matches
    bad.write_bytes(data[:i] + hashlib.sha256(b"evil").hexdigest().encode() + data[i + 64:])
    p = imafs("digest-list", "from-rpm", bad, "-o", pkgs["dir"] / "x.list",
              "--keyring", pkgs["asc"], ok=False)
    assert f"{bad}: header signature refused:" in p.stderr and "BAD" in p.stderr
    assert not (pkgs["dir"] / "x.list").exists()


def test_package_signed_by_another_key_is_refused(pkgs):
    p = imafs("digest-list", "from-rpm", pkgs["other"], "-o", pkgs["dir"] / "x.list",
              "--keyring", pkgs["asc"], ok=False)
    assert "header signature refused:" in p.stderr and "NOKEY" in p.stderr
    # the right key accepts it
    imafs("digest-list", "from-rpm", pkgs["other"], "-o", pkgs["dir"] / "o.list",
          "--keyring", pkgs["other_asc"])


def test_no_key_is_refused(pkgs):
    p = imafs("digest-list", "from-rpm", pkgs["good"], "-o", pkgs["dir"] / "x.list", ok=False)
    assert "no key to check the header signature with" in p.stderr


def test_malformed_headers_are_refused_with_the_byte(pkgs):
    data = pkgs["good"].read_bytes()
    with pytest.raises(SourceError, match="byte 0: not an RPM package"):
        path = pkgs["dir"] / "junk.rpm"
        path.write_bytes(b"\0" * 200)
        rpm.read_rpm(str(path), [str(pkgs["asc"])])
    with pytest.raises(SourceError, match=r"byte 104: header of \d+ entries and \d+ bytes"):
        rpm.parse_header(data[:104] + b"\xff\xff\xff\xff" + data[108:], 96, "x")
    with pytest.raises(SourceError, match="header needs"):
        rpm.parse_header(data[:200], 96, "x")


def test_wrong_tag_types_are_refused():
    import struct
    entries = [(1117, 4, 0, 1), (1118, 8, 4, 1), (1116, 4, 0, 1), (1035, 8, 4, 1),
               (1030, 3, 0, 1), (5011, 4, 0, 1)]
    store = b"\0\0\0\x08/usr/\0"
    raw = (b"\x8e\xad\xe8\x01\0\0\0\0" + struct.pack(">II", len(entries), len(store)) +
           b"".join(struct.pack(">IIII", *e) for e in entries) + store)
    h = rpm.parse_header(raw, 0, "x")
    with pytest.raises(SourceError, match="tag 1117 has the wrong type"):
        rpm._digests("x", h, raw, "0")


def test_rpm_list_appraises_the_packages_files_through_a_mount(pkgs, make_mount, world_tmp):
    """A list from a signed package's header vouches, through a mount, for exactly the
    package's files (FILE_CHECK with digest_cache=content); the list is appraised by
    its imafs signature when it is loaded."""
    out = world_tmp / "rpm.list"
    imafs("digest-list", "from-rpm", pkgs["good"], "-o", out, "--keyring", pkgs["asc"])
    keys = world_tmp / "keys"
    imafs("keygen", "--out", keys, "--type", "ec")
    b = world_tmp / "backing1"
    (b / "usr/bin").mkdir(parents=True)
    (b / "usr/share/hello").mkdir(parents=True)
    (b / "usr/bin/hello").write_bytes(HELLO)
    (b / "usr/share/hello/data").write_bytes(DATA)
    (b / "usr/share/hello/other").write_bytes(b"in no package\n")
    (b / "lists").mkdir()
    (b / "lists/rpm.list").write_bytes(out.read_bytes())
    imafs("sign", "-q", "--key", keys / "signing_key.pem", "--cert",
          keys / "signing_cert.der", b / "lists/rpm.list")
    policy = world_tmp / "policy"
    policy.write_text("measure func=DIGEST_LIST_CHECK\n"
                      "appraise func=DIGEST_LIST_CHECK appraise_type=imasig\n"
                      "appraise func=FILE_CHECK mask=MAY_READ digest_cache=content\n")
    m = make_mount(["--policy", str(policy), "--keys", str(keys)], backing=b)
    with pytest.raises(PermissionError):
        (m.mnt / "usr/bin/hello").read_bytes()          # no list yet
    imafs("digest-list", "load", m.mnt, m.mnt / "lists/rpm.list")
    assert (m.mnt / "usr/bin/hello").read_bytes() == HELLO
    assert (m.mnt / "usr/share/hello/data").read_bytes() == DATA
    with pytest.raises(PermissionError):
        (m.mnt / "usr/share/hello/other").read_bytes()
    shown = m.ctl("digest_lists_loaded/rpm.list").read_text()
    assert "-- hello 3:1.0-1 (noarch)" in shown and pkgs["fpr"] in shown
    h = hashlib.sha256(HELLO).hexdigest()
    fd = os.open(m.ctl("digest_query"), os.O_RDWR)
    try:
        os.write(fd, f"sha256:{h}\n".encode())
        ans = os.pread(fd, 4096, 0).decode()
    finally:
        os.close(fd)
    assert ans.startswith("rpm.list (actions: 7): version: 1, algo: sha256, type: 1")
    assert ans.rstrip().endswith("-- hello 3:1.0-1")
