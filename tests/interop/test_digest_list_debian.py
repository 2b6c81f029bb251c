"""Digest lists from Debian sources, with the real tools: .debs built by dpkg-deb, a
Packages and a Release written here and signed by a throw-away gpg key, verified by
gpgv; every broken link of the chain refused with a message saying which and why.
Then from-dpkg on the suite's debootstrap rootfs (scripts/rootfs.sh) when it exists."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers.mounts import IMAFS, REPO
from imafs.ima import digest_lists as dl

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

for _tool in ("gpg", "gpgv", "dpkg-deb"):
    if shutil.which(_tool) is None:
        pytestmark.append(pytest.mark.skip(reason=f"{_tool} is not installed"))

ROOTFS = Path(os.environ.get("IMAFS_ROOTFS_CACHE", "/var/cache/imafs/rootfs-bookworm-minbase"))

FILES = {
    "hello": {"usr/bin/hello": b"#!/bin/sh\necho hello\n", "usr/share/hello/a": b"alpha\n",
              "usr/share/hello/same": b"alpha\n"},
    "world": {"usr/bin/world": b"#!/bin/sh\necho world\n", "etc/world.conf": b"x=1\n"},
}


def run(*args, ok=True, **kw):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if ok is not None:
        assert (p.returncode == 0) == ok, f"{args}: rc {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def imafs(*args, ok=True):
    return run(*IMAFS, *args, ok=ok, cwd=REPO)


def gen_key(home: Path, uid: str) -> Path:
    home.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(home))
    run("gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key", uid, "ed25519",
        "sign", "never", env=env)
    ring = home / "keyring.gpg"
    ring.write_bytes(subprocess.run(["gpg", "--batch", "--export", uid], env=env,
                                    capture_output=True, check=True).stdout)
    return ring


def build_deb(work: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    root = work / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: t <t@t>\n"
        f"Description: test package\n")
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(0o755 if "/bin/" in rel else 0o644)
    (root / "usr/share").mkdir(parents=True, exist_ok=True)
    (root / "usr/share" / f"{name}-link").symlink_to("/etc/passwd")
    out = work / f"{name}_{version}_all.deb"
    run("dpkg-deb", "--root-owner-group", "-Zxz", "--build", root, out)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_index(work: Path, debs: list[tuple[str, str, Path]], home: Path) -> tuple[Path, Path]:
    pk = work / "Packages"
    pk.write_text("".join(
        f"Package: {n}\nVersion: {v}\nArchitecture: all\nFilename: pool/main/{d.name}\n"
        f"Size: {d.stat().st_size}\nSHA256: {sha256(d)}\nDescription: test\n\n"
        for n, v, d in debs))
    rel = work / "Release"
    rel.write_text(f"Origin: imafs-test\nLabel: imafs-test\nSuite: testing\nCodename: test\n"
                   f"Date: Mon, 07 Dec 2026 00:00:00 UTC\nArchitectures: all\n"
                   f"Components: main\nSHA256:\n"
                   f" {sha256(pk)} {pk.stat().st_size} main/binary-all/Packages\n")
    inrel = work / "InRelease"
    env = dict(os.environ, GNUPGHOME=str(home))
    run("gpg", "--batch", "--yes", "--clearsign", "--output", inrel, rel, env=env)
    return inrel, pk


@pytest.fixture
def archive(tmp_path):
    home = tmp_path / "gnupg"
    ring = gen_key(home, "imafs archive test <archive@example.org>")
    debs = [("hello", "1.0-1", build_deb(tmp_path, "hello", "1.0-1", FILES["hello"])),
            ("world", "2:0.5", build_deb(tmp_path, "world", "2:0.5", FILES["world"]))]
    inrel, pk = write_index(tmp_path, debs, home)
    fpr = subprocess.run(["gpg", "--batch", "--with-colons", "--fingerprint"],
                         env=dict(os.environ, GNUPGHOME=str(home)), capture_output=True,
                         text=True).stdout.split("fpr:::::::::")[1].split(":")[0]
    return {"dir": tmp_path, "home": home, "ring": ring, "debs": debs, "inrel": inrel,
            "packages": pk, "fpr": fpr}


def expected_digests(*names) -> set[bytes]:
    return {hashlib.sha256(data).digest() for n in names for data in FILES[n].values()}


def from_deb(a, out, *debs, ok=True, keyring=True):
    extra = ["--keyring", a["ring"]] if keyring else []
    return imafs("digest-list", "from-deb", *(debs or [d for _, _, d in a["debs"]]), "-o", out,
                 "--release", a["inrel"], "--packages", a["packages"], *extra, ok=ok)


def test_from_deb_verified_chain(archive):
    out = archive["dir"] / "test.list"
    p = from_deb(archive, out)
    assert "2 packages" in p.stderr
    lst = dl.parse(out.read_bytes())
    assert {d for _, _, _, d in lst.digests()} == expected_digests("hello", "world")
    prov = lst.provenance
    assert prov.source == "debian" and prov.keys == (archive["fpr"],)
    assert prov.archives[0]["codename"] == "test"
    assert prov.archives[0]["signed_by"] == [archive["fpr"]]
    assert [(p.name, p.version, p.files) for p in prov.packages] == [
        ("hello", "1.0-1", 3), ("world", "2:0.5", 2)]
    assert prov.packages[0].sha256 == sha256(archive["debs"][0][2])
    # reproducible: the same sources give the same bytes (the same signature)
    from_deb(archive, archive["dir"] / "again.list")
    assert (archive["dir"] / "again.list").read_bytes() == out.read_bytes()
    show = imafs("digest-list", "show", out, "--digests").stdout
    assert "hello 1.0-1 all: 3 files, 2 digests, .deb sha256 " in show
    assert archive["fpr"] in show and "codename: test" in show
    h = hashlib.sha256(FILES["world"]["usr/bin/world"]).hexdigest()
    assert f"sha256:{h} file  world 2:0.5" in show


def test_tampered_deb_is_refused(archive):
    deb = archive["debs"][0][2]
    data = bytearray(deb.read_bytes())
    data[-10] ^= 0xFF
    bad = archive["dir"] / "bad" / deb.name
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    p = from_deb(archive, archive["dir"] / "x.list", bad, ok=False)
    assert f"{bad}: its SHA256 {sha256(bad)} is in no verified Packages index" in p.stderr
    assert not (archive["dir"] / "x.list").exists()


def test_packages_hash_mismatch_is_refused(archive):
    pk = archive["packages"]
    pk.write_text(pk.read_text().replace("Description: test", "Description: changed", 1))
    p = from_deb(archive, archive["dir"] / "x.list", ok=False)
    assert f"{pk}: SHA256 {sha256(pk)} is in no verified Release" in p.stderr
    assert "did not sign" in p.stderr


def test_bad_release_signature_is_refused(archive):
    inrel = archive["inrel"]
    inrel.write_text(inrel.read_text().replace("Suite: testing", "Suite: tasting"))
    p = from_deb(archive, archive["dir"] / "x.list", ok=False)
    assert f"{inrel}: BAD signature" in p.stderr and "changed after it was signed" in p.stderr


def test_release_from_an_unknown_key_is_refused(archive, tmp_path):
    other = gen_key(tmp_path / "other", "someone else <other@example.org>")
    p = imafs("digest-list", "from-deb", archive["debs"][0][2], "-o", tmp_path / "x.list",
              "--release", archive["inrel"], "--packages", archive["packages"],
              "--keyring", other, ok=False)
    assert f"{archive['inrel']}: no good signature from a key of {other}" in p.stderr
    assert "NO_PUBKEY: key " in p.stderr and "is not in the keyring" in p.stderr
    # Debian's archive keyring (the default) does not know the test key either
    if Path("/usr/share/keyrings/debian-archive-keyring.gpg").exists():
        p = from_deb(archive, tmp_path / "x.list", keyring=False, ok=False)
        assert "no good signature from a key of /usr/share/keyrings/" in p.stderr


def test_md5_is_no_reference_value(archive):
    p = imafs("digest-list", "from-deb", archive["debs"][0][2], "-o", "/dev/null", "--algo",
              "md5", "--release", archive["inrel"], "--packages", archive["packages"], ok=False)
    assert "md5 is no reference value" in p.stderr


def fake_rootfs(tmp_path: Path, installed: list[tuple[str, str]]) -> Path:
    root = tmp_path / "rootfs"
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text("".join(
        f"Package: {n}\nStatus: install ok installed\nArchitecture: all\nVersion: {v}\n"
        f"Description: x\n\n" for n, v in installed) +
        "Package: gone\nStatus: deinstall ok config-files\nArchitecture: all\nVersion: 1\n\n")
    return root


def test_from_dpkg_reports_missing_packages_by_name(archive, tmp_path):
    root = fake_rootfs(tmp_path, [("hello", "1.0-1"), ("world", "2:0.5"), ("extra", "3")])
    debs = tmp_path / "debs"
    debs.mkdir()
    for f in (archive["inrel"], archive["packages"]):
        shutil.copy(f, debs)
    # apt's cache names a version with an epoch with %3a
    shutil.copy(archive["debs"][0][2], debs)
    shutil.copy(archive["debs"][1][2], debs / "world_2%3a0.5_all.deb")
    out = tmp_path / "r.list"
    args = ["digest-list", "from-dpkg", root, "-o", out, "--debs", debs,
            "--keyring", archive["ring"]]
    p = imafs(*args, ok=False)
    assert "missing: extra 3 (all): this version is in no verified Packages index" in p.stderr
    assert "1 of 3 installed packages cannot be had or verified" in p.stderr
    assert not out.exists()
    p = imafs(*args, "--allow-missing")
    lst = dl.parse(out.read_bytes())
    assert {d for _, _, _, d in lst.digests()} == expected_digests("hello", "world")
    assert [m["name"] for m in lst.provenance.missing] == ["extra"]
    assert "missing: 1" in imafs("digest-list", "show", out).stdout

    # a tampered .deb in the cache: reported as not verified, its files left out
    (debs / "world_2%3a0.5_all.deb").write_bytes(b"!<arch>\nnot a package")
    p = imafs(*args, "--allow-missing")
    assert "missing: world 2:0.5 (all):" in p.stderr and "does not match" in p.stderr
    assert {d for _, _, _, d in dl.parse(out.read_bytes()).digests()} == \
        expected_digests("hello")
    # a Packages index found in a directory that does not verify: reported, not used
    (debs / "Packages").write_text((debs / "Packages").read_text() + "\n")
    p = imafs(*args, ok=False)
    assert f"refused: {debs / 'Packages'}: SHA256" in p.stderr
    assert "missing: hello 1.0-1 (all): this version is in no verified Packages" in p.stderr


@pytest.mark.slow
def test_from_dpkg_on_the_suite_rootfs(tmp_path):
    """Every package of the debootstrap rootfs verified through Debian's signed chain,
    and every regular file under /usr found in the list."""
    archive = Path(str(ROOTFS) + ".archive")
    if not (Path(str(ROOTFS) + ".complete").exists() and archive.is_dir()):
        pytest.skip(f"no Debian rootfs with its archive at {ROOTFS} (scripts/rootfs.sh)")
    out = tmp_path / "debian.list"
    p = imafs("digest-list", "from-dpkg", ROOTFS, "-o", out, "--debs", archive)
    assert "missing:" not in p.stderr
    lst = dl.parse(out.read_bytes())
    have = {d for _, _, _, d in lst.digests()}
    names = {p.name for p in lst.provenance.packages}
    assert {"bash", "coreutils", "dpkg", "apt", "libc6"} <= names
    assert lst.provenance.archives[0]["origin"] == "Debian"
    missing = []
    for top, _, files in os.walk(ROOTFS / "usr"):
        for f in files:
            path = Path(top, f)
            if path.is_symlink() or not path.is_file():
                continue
            if hashlib.sha256(path.read_bytes()).digest() not in have:
                missing.append(str(path))
    assert missing == []
