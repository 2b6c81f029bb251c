"""Debian as a source of reference digests, verified link by link.

The chain (docs/digest-lists.md):

1. ``InRelease`` (or ``Release`` + ``Release.gpg``) -- its OpenPGP signature checked by
   ``gpgv`` against the archive keyring (Debian's ``debian-archive-keyring`` by default).
   Only the bytes gpgv says were signed are read.  At least one good signature from a
   key of the keyring is needed (as apt does); a bad signature refuses the file.
2. ``Packages`` -- its SHA256 (of the file, or of its decompressed form) must be one of
   the SHA256 lines of a verified Release.
3. each ``.deb`` -- its SHA256 must be the one the verified Packages gives for that
   package, version and architecture.
4. the digests of the regular files of the .deb's ``data.tar.*`` are computed here
   (sha256 by default).  ``md5sums`` inside the .deb is never read.

python-debian (deb822 for Release and dpkg's status; ``debfile`` for the ar and tar
layers of a .deb, gz/xz/bz2/zst) does the parsing, except for the large Packages
indexes (a scan for the six fields used, 20x faster); imafs does the checking.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

from debian import deb822, debfile

from imafs.ima import hashing
from imafs.sources import SourceError

DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- Release

@dataclass
class Release:
    """A verified Release: what its signature covers, and who signed it."""
    path: str
    signed: bytes                   # the signed text, as gpgv output it
    signed_by: list[str]            # primary key fingerprints of the good signatures
    fields: dict
    sha256: dict[str, tuple[str, int]] = field(default_factory=dict)  # name -> (hex, size)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.signed).hexdigest()

    def summary(self) -> dict:
        out = {k.lower(): self.fields[k] for k in ("Origin", "Label", "Suite", "Codename",
                                                  "Version", "Date") if k in self.fields}
        out["release_sha256"] = self.digest
        out["signed_by"] = list(self.signed_by)
        return out

    def describe(self) -> str:
        f = self.fields
        return (f"{f.get('Origin', '?')} {f.get('Codename') or f.get('Suite') or '?'} "
                f"({f.get('Date', 'no date')})")


def _gpgv(keyrings: list[str], args: list[str], what: str) -> tuple[list[str], bytes]:
    """Run gpgv; return (fingerprints of good signatures, the signed data if asked)."""
    for k in keyrings:
        if not os.path.isfile(k):
            raise SourceError(f"keyring {k}: no such file")
    with tempfile.TemporaryDirectory(prefix="imafs-gpgv-") as home:
        out = os.path.join(home, "signed")
        cmd = ["gpgv", "--homedir", home, "--status-fd", "1"]
        for k in keyrings:
            cmd += ["--keyring", os.path.abspath(k)]
        if args[0] == "--output":
            args = ["--output", out] + args[1:]
        try:
            p = subprocess.run(cmd + args, capture_output=True, timeout=120)
        except FileNotFoundError:
            raise SourceError("gpgv is not installed (Debian package gpgv)") from None
        good, bad, errs = _signatures(p.stdout.decode("utf-8", "replace"))
        if bad:
            raise SourceError(f"{what}: BAD signature by key {', '.join(bad)} -- the file "
                              f"was changed after it was signed")
        if not good:
            why = "; ".join(errs) or p.stderr.decode("utf-8", "replace").strip() \
                or f"gpgv exit status {p.returncode}"
            raise SourceError(f"{what}: no good signature from a key of "
                              f"{', '.join(keyrings)} ({why})")
        data = b""
        if args[0] == "--output":
            with open(out, "rb") as f:
                data = f.read()
        return good, data


def _signatures(status: str) -> tuple[list[str], list[str], list[str]]:
    """gpgv's status lines -> (good primary fingerprints, bad key ids, other errors).
    A signature counts as good only with GOODSIG and VALIDSIG in its NEWSIG block
    (EXPKEYSIG, REVKEYSIG, EXPSIG are not good)."""
    good, bad, errs = [], [], []
    blocks: list[list[list[str]]] = [[]]
    for line in status.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        w = line[9:].split()
        if not w:
            continue
        if w[0] == "NEWSIG":
            blocks.append([])
        blocks[-1].append(w)
    for b in blocks:
        kinds = {w[0]: w for w in b}
        if "BADSIG" in kinds:
            bad.append(kinds["BADSIG"][1])
        elif "GOODSIG" in kinds and "VALIDSIG" in kinds:
            v = kinds["VALIDSIG"]
            good.append(v[10] if len(v) > 10 else v[1])
        else:
            for k, words in _SIG_ERRORS:
                if k in kinds:
                    w = kinds[k]
                    errs.append(f"{k}: {words.format(w[1] if len(w) > 1 else '?')}")
                    break
    return list(dict.fromkeys(good)), bad, list(dict.fromkeys(errs))


_SIG_ERRORS = (("NO_PUBKEY", "key {} is not in the keyring"), ("EXPKEYSIG", "key {} has expired"),
               ("REVKEYSIG", "key {} is revoked"), ("EXPSIG", "signature by {} has expired"),
               ("ERRSIG", "signature by {} cannot be checked"))


def verify_release(path: str, keyrings: list[str] | None = None,
                   signature: str | None = None) -> Release:
    """Verify an InRelease (clearsigned) or a Release with its detached ``signature``
    (Release.gpg; looked for beside ``path`` when the file is not clearsigned)."""
    keyrings = list(keyrings or [DEFAULT_KEYRING])
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror}") from None
    if head.startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
        signed_by, text = _gpgv(keyrings, ["--output", path], path)
    else:
        sig = signature or path + ".gpg"
        if not os.path.exists(sig):
            raise SourceError(f"{path}: not clearsigned and no detached signature {sig}")
        signed_by, _ = _gpgv(keyrings, [sig, path], f"{path} (signature {sig})")
        with open(path, "rb") as f:
            text = f.read()
    try:
        rel = deb822.Release(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{path}: the signed Release cannot be read: {e}") from None
    sums = {}
    for e in rel.get("SHA256", []) or []:
        try:
            sums[e["name"]] = (e["sha256"].lower(), int(e["size"]))
        except (KeyError, ValueError):
            raise SourceError(f"{path}: malformed SHA256 line {e!r}") from None
    if not sums:
        raise SourceError(f"{path}: the signed Release lists no SHA256 checksums")
    fields = {k: v for k, v in rel.items() if isinstance(v, str)}
    return Release(path, text, signed_by, fields, sums)


# --------------------------------------------------------------------------- Packages

@dataclass(frozen=True)
class Entry:
    """One package of a verified Packages index."""
    name: str
    version: str
    arch: str
    sha256: str
    size: int
    filename: str
    release: int                    # index into the verifier's releases

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.name, self.version, self.arch)

    def label(self) -> str:
        return f"{self.name} {self.version} ({self.arch})"


_MAGICS = ((b"\xfd7zXZ\x00", lzma.decompress), (b"\x1f\x8b", gzip.decompress),
           (b"BZh", bz2.decompress))


class Archive:
    """The verified indexes of one or more archives: Releases, then Packages."""

    def __init__(self, keyrings: list[str] | None = None):
        self.keyrings = list(keyrings or [DEFAULT_KEYRING])
        self.releases: list[Release] = []
        self.by_key: dict[tuple[str, str, str], Entry] = {}
        self.by_sha256: dict[str, Entry] = {}

    def add_release(self, path: str, signature: str | None = None) -> Release:
        rel = verify_release(path, self.keyrings, signature)
        for r in self.releases:
            if r.digest == rel.digest:
                return r
        self.releases.append(rel)
        return rel

    def add_packages(self, path: str) -> int:
        """Verify a Packages file against the Releases added so far; index it.
        Returns how many entries it added."""
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise SourceError(f"{path}: {e.strerror}") from None
        found = self._listed(raw)
        data = raw
        if found is None:
            for magic, decompress in _MAGICS:
                if raw.startswith(magic):
                    try:
                        data = decompress(raw)
                    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
                        raise SourceError(f"{path}: cannot decompress: {e}") from None
                    found = self._listed(data)
                    break
        elif found[1].endswith((".xz", ".gz", ".bz2")):
            for magic, decompress in _MAGICS:
                if raw.startswith(magic):
                    data = decompress(raw)
                    break
        if found is None:
            if not self.releases:
                raise SourceError(f"{path}: no verified Release to check it against "
                                  f"(give --release)")
            raise SourceError(
                f"{path}: SHA256 {hashlib.sha256(raw).hexdigest()} is in no verified Release "
                f"({', '.join(r.path for r in self.releases)}): a Packages index the archive "
                f"did not sign")
        rel_i = found[0]
        n = 0
        for e in _parse_packages(data, path):
            entry = Entry(e[0], e[1], e[2], e[3], e[4], e[5], rel_i)
            self.by_key.setdefault(entry.key, entry)
            self.by_sha256.setdefault(entry.sha256, entry)
            n += 1
        return n

    def _listed(self, data: bytes) -> tuple[int, str] | None:
        h = hashlib.sha256(data).hexdigest()
        for i, r in enumerate(self.releases):
            for name, (sha, size) in r.sha256.items():
                if sha == h and size == len(data) and os.path.basename(name).startswith(
                        "Packages"):
                    return i, name
        return None

    def entry_for(self, name: str, version: str, arch: str) -> Entry | None:
        e = self.by_key.get((name, version, arch))
        if e is None and arch != "all":
            e = self.by_key.get((name, version, "all"))
        return e


def _parse_packages(data: bytes, path: str):
    """(name, version, arch, sha256, size, filename) of every paragraph that has them.
    A paragraph without SHA256 cannot vouch for a .deb and is skipped.  A scan for the
    six single-line fields it needs: deb822.Packages takes 20 s on Debian main's
    63,000 paragraphs, this 1 s."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{path}: not UTF-8 at byte {e.start}") from None
    for para in _PARA_SPLIT.split(text):
        f = dict(_FIELD.findall(para))
        try:
            sha = f["SHA256"].strip().lower()
            if not _HEX64.fullmatch(sha):
                continue
            yield (f["Package"].strip(), f["Version"].strip(), f["Architecture"].strip(),
                   sha, int(f.get("Size", "-1")), f.get("Filename", "").strip())
        except (KeyError, ValueError):
            continue


_PARA_SPLIT = re.compile(r"\n[ \t]*\n")
_FIELD = re.compile(r"^(Package|Version|Architecture|SHA256|Size|Filename):[ \t]*(.*?)[ \t]*$",
                    re.M)
_HEX64 = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- .deb

@dataclass
class DebDigests:
    """The file digests of one verified .deb."""
    path: str
    sha256: str
    name: str
    version: str
    arch: str
    files: list[tuple[str, bytes]]  # (absolute path in the package, digest)
    release: int = -1               # the verified Release its Packages came through


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def deb_digests(path: str, algo: str = "sha256", *, expect: Entry | None = None,
                archive: Archive | None = None) -> DebDigests:
    """Verify ``path`` (against ``expect``, or by its SHA256 in ``archive``) and compute
    the ``algo`` digest of every regular file of its data.tar.  A .deb that matches
    neither is refused (SourceError) before its contents are read."""
    a = hashing.hash_algo(algo)
    a.constructor()
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise SourceError(f"{path}: {e.strerror}") from None
    if expect is None:
        if archive is None:
            raise SourceError(f"{path}: no verified Packages index to check it against")
        expect = archive.by_sha256.get(digest)
        if expect is None:
            raise SourceError(f"{path}: its SHA256 {digest} is in no verified Packages "
                              f"index: not a package the archive signed (changed, or from "
                              f"elsewhere)")
    elif digest != expect.sha256:
        raise SourceError(f"{path}: SHA256 {digest} does not match the Packages index's "
                          f"{expect.sha256} for {expect.label()}: the .deb was changed or is "
                          f"another build")
    try:
        deb = debfile.DebFile(filename=path)
        try:
            ctl = deb.debcontrol()
            got = (ctl.get("Package"), ctl.get("Version"), ctl.get("Architecture"))
            if got != expect.key:
                raise SourceError(f"{path}: its control file says {' '.join(map(str, got))}, "
                                  f"the Packages index {expect.label()}")
            files = []
            tf = deb.data.tgz()
            for m in tf:
                if not m.isreg():
                    continue        # directories, symlinks, hard links (same content)
                h = a.new()
                f = tf.extractfile(m)
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                name = m.name[1:] if m.name.startswith("./") else m.name
                files.append(("/" + name.lstrip("/"), h.digest()))
        finally:
            deb.close()
    except SourceError:
        raise
    except (debfile.DebError, debfile.ArError, OSError, EOFError, ValueError,
            lzma.LZMAError) as e:
        raise SourceError(f"{path}: cannot read the package: {e}") from None
    return DebDigests(path, digest, expect.name, expect.version, expect.arch, files,
                      expect.release)


# --------------------------------------------------------------------------- a rootfs

@dataclass(frozen=True)
class Installed:
    name: str
    version: str
    arch: str

    def label(self) -> str:
        return f"{self.name} {self.version} ({self.arch})"


def installed_packages(rootfs: str) -> list[Installed]:
    """The packages dpkg's status file in ``rootfs`` says are installed."""
    status = os.path.join(rootfs, "var/lib/dpkg/status")
    try:
        with open(status, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        raise SourceError(f"{status}: {e.strerror} (is {rootfs} a Debian root "
                          f"filesystem?)") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{status}: not UTF-8 at byte {e.start}") from None
    out = []
    for p in deb822.Deb822.iter_paragraphs(text.splitlines(keepends=True), use_apt_pkg=False):
        st = p.get("Status", "").split()
        if len(st) == 3 and st[2] == "installed" and "Package" in p and "Version" in p:
            out.append(Installed(p["Package"], p["Version"], p.get("Architecture", "all")))
    return sorted(set(out), key=lambda i: (i.name, i.arch, i.version))


def index_files(directory: str) -> tuple[list[str], list[str]]:
    """(Release-like files, Packages-like files) under ``directory``, by name only
    (every one is verified before use): ``*InRelease``, ``*Release`` with a
    ``.gpg`` beside it, ``*Packages``, ``*Packages.{xz,gz,bz2}``."""
    rels, pkgs = [], []
    for top, dirs, names in os.walk(directory):
        dirs.sort()
        for n in sorted(names):
            p = os.path.join(top, n)
            if n.endswith("InRelease") or (n.endswith("Release") and
                                           os.path.exists(p + ".gpg")):
                rels.append(p)
            elif re.search(r"Packages(\.(xz|gz|bz2))?$", n):
                pkgs.append(p)
    return rels, pkgs


def deb_files(directory: str) -> dict[str, list[str]]:
    """Every ``*.deb`` under ``directory``, by file name (a name is only a hint)."""
    out: dict[str, list[str]] = {}
    for top, dirs, names in os.walk(directory):
        dirs.sort()
        for n in sorted(names):
            if n.endswith(".deb"):
                out.setdefault(n, []).append(os.path.join(top, n))
    return out


def deb_names(entry: Entry) -> list[str]:
    """File names a .deb of ``entry`` may have: the pool's, and apt's cache form
    (epoch colon as %3a)."""
    names = []
    if entry.filename:
        names.append(os.path.basename(entry.filename))
    v = entry.version.replace(":", "%3a")
    names.append(f"{entry.name}_{v}_{entry.arch}.deb")
    if ":" in entry.version:
        names.append(f"{entry.name}_{entry.version.split(':', 1)[1]}_{entry.arch}.deb")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- lists

@dataclass(frozen=True)
class Missing:
    """A package whose exact version could not be had or verified, and why."""
    name: str
    version: str
    arch: str
    reason: str

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "arch": self.arch,
                "reason": self.reason}


def collect_installed(rootfs: str, archive: Archive, deb_dirs: list[str], algo: str,
                      progress=None, only: set | None = None
                      ) -> tuple[list[DebDigests], list[Missing]]:
    """Every package installed in ``rootfs`` (or those of ``only``, a set of (name,
    arch)): its verified .deb's file digests, or a :class:`Missing` saying why not (no
    verified index entry for that exact version, no .deb of it, a .deb that fails its
    check)."""
    found: dict[str, list[str]] = {}
    for d in deb_dirs:
        for n, paths in deb_files(d).items():
            found.setdefault(n, []).extend(paths)
    done, missing = [], []
    for inst in installed_packages(rootfs):
        if only is not None and (inst.name, inst.arch) not in only:
            continue
        if progress:
            progress(inst)
        e = archive.entry_for(inst.name, inst.version, inst.arch)
        if e is None:
            missing.append(Missing(inst.name, inst.version, inst.arch,
                                   "this version is in no verified Packages index"))
            continue
        paths = [p for n in deb_names(e) for p in found.get(n, [])]
        if not paths:
            missing.append(Missing(inst.name, inst.version, inst.arch,
                                   "no .deb of this version was found"))
            continue
        errors = []
        for p in paths:             # the first that verifies
            try:
                done.append(deb_digests(p, algo, expect=e))
                break
            except SourceError as err:
                errors.append(str(err))
        else:
            missing.append(Missing(inst.name, inst.version, inst.arch, "; ".join(errors)))
    return done, missing


def make_list(debs: list[DebDigests], archive: Archive, algo: str, generator: str,
              missing: list[Missing] = ()):
    """A digest list: one COMPACT_FILE block per package (its distinct file digests,
    sorted, so a list is reproducible), the provenance naming each package, its .deb's
    SHA256, the verified Release it came through and the keys that signed it."""
    from imafs.ima import digest_lists as dl
    used: dict[int, int] = {}
    archives = []
    blocks, packages = [], []
    for i, d in enumerate(sorted(debs, key=lambda d: (d.name, d.arch, d.version))):
        if d.release not in used:
            used[d.release] = len(archives)
            archives.append(archive.releases[d.release].summary())
        digests = sorted({dg for _, dg in d.files})
        blocks.append(dl.Block.of(dl.COMPACT_FILE, algo, digests))
        packages.append(dl.Package(d.name, d.version, i, arch=d.arch, files=len(d.files),
                                   sha256=d.sha256, archive=used[d.release]))
    keys = sorted({k for a in archives for k in a["signed_by"]})
    prov = dl.Provenance("debian", generator=generator, algo=hashing.hash_algo(algo).name,
                         archives=tuple(archives), keys=tuple(keys),
                         packages=tuple(packages),
                         missing=tuple(m.to_json() for m in missing))
    return dl.DigestList(blocks, prov)


def rootfs_arch(rootfs: str) -> str:
    for i in installed_packages(rootfs):
        if i.name == "dpkg":
            return i.arch
    raise SourceError(f"{rootfs}: dpkg is not installed there: its architecture is unknown")


def apt_download(rootfs: str, wanted: list[Installed], keyrings: list[str], dest: str,
                 log=None) -> list[str]:
    """Fetch the exact versions ``wanted`` with apt-get, from the archives ``rootfs``'s
    own sources list names, into ``dest`` (a private apt state: nothing of the host's
    or the rootfs's apt is changed).  apt checks what it fetches; imafs checks it all
    again (``dest`` is then searched like a --debs directory: the InRelease and
    Packages apt fetched are verified with ``keyrings``, each .deb against them).
    Returns the names of the packages apt could not fetch."""
    if shutil.which("apt-get") is None:
        raise SourceError("apt-get is not installed: cannot download packages")
    state, cache, debs = (os.path.join(dest, d) for d in ("state", "cache", "debs"))
    for d in (os.path.join(state, "lists", "partial"),
              os.path.join(cache, "archives", "partial"), debs, os.path.join(dest, "parts")):
        os.makedirs(d, exist_ok=True)
    trusted = os.path.join(dest, "trusted.gpg")
    with open(trusted, "wb") as out:
        for k in keyrings:
            with open(k, "rb") as f:
                out.write(f.read())
    opts = []
    for k, v in (("Dir::Etc::SourceList", os.path.join(rootfs, "etc/apt/sources.list")),
                 ("Dir::Etc::SourceParts", os.path.join(rootfs, "etc/apt/sources.list.d")),
                 ("Dir::Etc::Trusted", trusted),
                 ("Dir::Etc::TrustedParts", os.path.join(dest, "parts")),
                 ("Dir::Etc::Preferences", "/dev/null"),
                 ("Dir::Etc::PreferencesParts", os.path.join(dest, "parts")),
                 ("Dir::State", state),
                 ("Dir::State::status", os.path.join(rootfs, "var/lib/dpkg/status")),
                 ("Dir::Cache", cache), ("APT::Architecture", rootfs_arch(rootfs)),
                 ("Acquire::Languages", "none"), ("Debug::NoLocking", "1")):
        opts += ["-o", f"{k}={v}"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
    p = subprocess.run(["apt-get", "-q", *opts, "update"], capture_output=True, text=True,
                       env=env, timeout=600)
    if p.returncode != 0:
        raise SourceError(f"apt-get update for {rootfs}'s sources failed: "
                          f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    # apt keeps its lists lz4-compressed (not in Python's stdlib): its helper gives the
    # plain Packages back, whose SHA256 the Release lists
    lists = os.path.join(state, "lists")
    for n in os.listdir(lists):
        if n.endswith("Packages.lz4"):
            with open(os.path.join(lists, n[:-4]), "wb") as out:
                subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", os.path.join(lists, n)],
                               stdout=out, check=False, timeout=300)

    def spec(i):
        return f"{i.name}:{i.arch}={i.version}"
    # all at once; when apt refuses the batch (one version it cannot find), one by one
    p = subprocess.run(["apt-get", "-q", *opts, "download", *map(spec, wanted)], cwd=debs,
                       capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode == 0:
        return []
    failed = []
    for i in wanted:
        p = subprocess.run(["apt-get", "-q", *opts, "download", spec(i)], cwd=debs,
                           capture_output=True, text=True, env=env, timeout=600)
        if p.returncode != 0:
            failed.append(i.name)
            if log:
                log(f"{i.label()}: apt-get download failed: "
                    f"{(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return failed
