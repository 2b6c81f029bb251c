"""``imafs digest-list``: make digest lists from verified distribution sources, show one.

Thin: parse, call imafs.sources.* and imafs.ima.digest_lists, print.  docs/digest-lists.md
is the reference.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import imafs
from imafs.commands._files import algo_arg, write_whole
from imafs.ima import digest_lists as dl
from imafs.ima import hashing

HELP = "make digest lists (reference digests) from Debian or RPM packages; show one"
DESCRIPTION = """\
Make a digest list -- DIGLIM's compact list of file digests, with its provenance --
from sources a distribution signs, each verified before a digest is taken from it:

  from-dpkg ROOTFS -o LIST   every file of every package installed in ROOTFS, from the
                             .debs (apt's cache in ROOTFS, --debs DIRs, or --download),
                             each checked against a Packages index whose SHA256 is in a
                             Release whose signature gpgv verified with --keyring
  from-deb PKG.deb... -o LIST --release InRelease --packages Packages
  from-rpm PKG.rpm... -o LIST --keyring KEY.asc   header digests, header signature
                             checked by rpmkeys
  show LIST                  what a list holds and where it came from
  load MNT LIST [--ns N]     load a list into a mount (its namespace N) over the
                             mount's control socket (else through
                             MNT/.imafs/digest_list_add): measured and appraised there
                             as DIGEST_LIST_CHECK
  unload MNT LIST|NAME [--ns N]  remove it again (digest_list_del)

Sign the list like any file (imafs sign, evmctl ima_sign): its signature covers the
digests and the provenance.  md5sums files are never a source."""


class _Refused(Exception):
    pass


def register(subparsers) -> None:
    p = subparsers.add_parser("digest-list", help=HELP, description=DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="dl_cmd", metavar="SUBCOMMAND", required=True)

    def common(q, keyring_help):
        q.add_argument("-o", "--output", required=True, metavar="LIST",
                       help="the list file to write")
        q.add_argument("--keyring", action="append", default=None, metavar="K",
                       help=keyring_help)
        q.add_argument("--algo", default="sha256", type=_algo, metavar="ALG",
                       help="file digest algorithm (Debian sources; default sha256)")

    q = sub.add_parser("from-dpkg", help="every file of every package installed in ROOTFS")
    q.add_argument("rootfs", metavar="ROOTFS")
    common(q, "OpenPGP keyring the archive's Release must be signed with (repeatable; "
              "default: Debian's archive keyring)")
    q.add_argument("--debs", action="append", default=[], metavar="DIR",
                   help="a directory searched (with its subdirectories) for .debs and for "
                        "InRelease/Release/Packages files (repeatable)")
    q.add_argument("--release", action="append", default=[], metavar="FILE",
                   help="an InRelease (or Release with Release.gpg beside it) to use")
    q.add_argument("--packages", action="append", default=[], metavar="FILE",
                   help="a Packages index to use (its SHA256 must be in a Release)")
    q.add_argument("--download", action="store_true",
                   help="fetch the installed versions that are not found with apt-get, "
                        "from the archives ROOTFS's own sources list names")
    q.add_argument("--allow-missing", action="store_true",
                   help="write the list even if some packages cannot be had or verified "
                        "(they are reported, and recorded in the provenance)")
    q.set_defaults(func=_run, dl_func=_from_dpkg)

    q = sub.add_parser("from-deb", help="the files of the given .deb packages")
    q.add_argument("debs", nargs="+", metavar="PKG.deb")
    common(q, "OpenPGP keyring the Release must be signed with (repeatable; default: "
              "Debian's archive keyring)")
    q.add_argument("--release", action="append", default=[], metavar="FILE", required=True,
                   help="the archive's InRelease (or Release with Release.gpg beside it)")
    q.add_argument("--packages", action="append", default=[], metavar="FILE", required=True,
                   help="the Packages index naming the .debs (its SHA256 in the Release)")
    q.set_defaults(func=_run, dl_func=_from_deb)

    q = sub.add_parser("from-rpm", help="the header digests of the given RPM packages")
    q.add_argument("rpms", nargs="+", metavar="PKG.rpm")
    common(q, "armored OpenPGP public key the headers must be signed with (repeatable; "
              "required)")
    q.set_defaults(func=_run, dl_func=_from_rpm)

    q = sub.add_parser("show", help="what a list holds and where it came from")
    q.add_argument("list", metavar="LIST")
    q.add_argument("--digests", action="store_true",
                   help="also print every digest, with its package")
    q.set_defaults(func=_run, dl_func=_show)

    for name, helptext, fn in (
            ("load", "load a list into a mount (digest_list_add)", _load),
            ("unload", "remove a loaded list from a mount (digest_list_del)", _unload)):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("mount", metavar="MNT", help="an imafs mount point")
        q.add_argument("list", metavar="LIST" if name == "load" else "LIST|NAME",
                       help="the list file (read as this process sees it)"
                       + ("" if name == "load" else ", or the name it was loaded as"))
        q.add_argument("--ns", metavar="N", default=None,
                       help="a namespace below this process's (NAME or NAME/NAME...): "
                            "its file under namespaces/ is written")
        q.add_argument("--control-name", default=".imafs", metavar="NAME",
                       help="the mount's control directory, when the control socket "
                            "cannot be used (default .imafs)")
        q.set_defaults(func=_run, dl_func=fn)


def _algo(text: str) -> str:
    name = algo_arg(text)
    if name == "md5":
        raise argparse.ArgumentTypeError("md5 is no reference value")
    return name


def _run(args) -> int:
    from imafs.sources import SourceError
    try:
        return args.dl_func(args) or 0
    except (SourceError, _Refused, dl.DigestListError, OSError) as e:
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.strerror else e
        print(f"imafs digest-list {args.dl_cmd}: {msg}", file=sys.stderr)
        return 2


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _generator(args) -> str:
    return f"imafs {imafs.__version__} digest-list {args.dl_cmd}"


def _write(path: str, lst: dl.DigestList) -> None:
    data = lst.to_bytes()
    write_whole(path, data, 0o644)
    _say(f"{path}: {lst.count} digests of {len(lst.blocks)} packages ({len(data)} bytes)")


def _archive(args, release_files, packages_files, *, strict: bool, ar=None):
    """Verified Releases, then Packages (added to ``ar`` when given). Files named
    explicitly must verify; files found by name in directories that do not are
    reported and left out."""
    from imafs.sources import SourceError, debian
    ar = ar or debian.Archive(args.keyring)
    for path, explicit in release_files:
        try:
            r = ar.add_release(path)
            _say(f"verified {path}: {r.describe()}, signed by {', '.join(r.signed_by)}")
        except SourceError as e:
            if explicit or strict:
                raise
            _say(f"refused: {e}")
    for path, explicit in packages_files:
        try:
            n = ar.add_packages(path)
            _say(f"verified {path}: {n} packages")
        except SourceError as e:
            if explicit or strict:
                raise
            _say(f"refused: {e}")
    return ar


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="pkg", file=sys.stderr, leave=False,
                disable=not sys.stderr.isatty())


def _from_dpkg(args) -> int:
    from imafs.sources import debian
    rootfs = args.rootfs
    if not os.path.isdir(rootfs):
        raise _Refused(f"{rootfs}: not a directory")
    dirs = [os.path.join(rootfs, "var/lib/apt/lists")] + args.debs
    found_rel, found_pkg = [], []
    for d in dirs:
        if os.path.isdir(d):
            r, p = debian.index_files(d)
            found_rel += r
            found_pkg += p
        elif d in args.debs:
            raise _Refused(f"--debs {d}: not a directory")
    rel = [(p, True) for p in args.release] + [(p, False) for p in found_rel]
    pkg = [(p, True) for p in args.packages] + [(p, False) for p in found_pkg]
    ar = _archive(args, rel, pkg, strict=False)
    deb_dirs = [os.path.join(rootfs, "var/cache/apt/archives")] + args.debs
    installed = debian.installed_packages(rootfs)
    with _progress(len(installed), "packages") as bar:
        done, missing = debian.collect_installed(
            rootfs, ar, [d for d in deb_dirs if os.path.isdir(d)], args.algo,
            progress=lambda i: bar.update(1))
    if missing and args.download:
        with tempfile.TemporaryDirectory(prefix="imafs-apt-") as tmp:
            want = {(m.name, m.arch) for m in missing}
            wanted = [i for i in installed if (i.name, i.arch) in want]
            _say(f"downloading {len(wanted)} packages with apt-get")
            debian.apt_download(rootfs, wanted, ar.keyrings, tmp, log=_say)
            r, p = debian.index_files(os.path.join(tmp, "state", "lists"))
            _archive(args, [(x, False) for x in r], [(x, False) for x in p], strict=False,
                     ar=ar)
            more, missing = debian.collect_installed(rootfs, ar, [tmp], args.algo,
                                                     only=want)
            done += more
    lst = debian.make_list(done, ar, args.algo, _generator(args), missing)
    return _finish(args, lst, missing, len(installed))


def _finish(args, lst, missing, total: int) -> int:
    for m in missing:
        _say(f"missing: {m.name} {m.version} ({m.arch}): {m.reason}")
    if missing and not args.allow_missing:
        raise _Refused(f"{len(missing)} of {total} installed packages cannot be had or "
                       f"verified (named above); nothing written (--allow-missing writes "
                       f"the list without their files)")
    _write(args.output, lst)
    return 0


def _from_deb(args) -> int:
    from imafs.sources import debian
    ar = _archive(args, [(p, True) for p in args.release], [(p, True) for p in args.packages],
                  strict=True)
    done = []
    with _progress(len(args.debs), "packages") as bar:
        for path in args.debs:
            done.append(debian.deb_digests(path, args.algo, archive=ar))
            bar.update(1)
    _write(args.output, debian.make_list(done, ar, args.algo, _generator(args)))
    return 0


def _from_rpm(args) -> int:
    from imafs.sources import rpm
    keys = args.keyring or []
    done = []
    with _progress(len(args.rpms), "packages") as bar:
        for path in args.rpms:
            r = rpm.read_rpm(path, keys)
            _say(f"verified {path}: {r.name} {r.version} {r.arch}, header signed by key "
                 f"{r.keyid}")
            done.append(r)
            bar.update(1)
    _write(args.output, rpm.make_list(done, keys, _generator(args)))
    return 0


def _control_file(args, name: str) -> str:
    """MNT/.imafs/[namespaces/A/namespaces/B/]NAME."""
    ctl = os.path.join(args.mount, args.control_name)
    if not os.path.isdir(ctl):
        raise _Refused(f"{args.mount}: no imafs control directory {args.control_name}/ "
                       f"(not an imafs mount with integrity on?)")
    for part in (args.ns or "").strip("/").split("/"):
        if part:
            ctl = os.path.join(ctl, "namespaces", part)
    return os.path.join(ctl, name)


def _write_control(path: str, request: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as e:
        raise _Refused(f"{path}: {e.strerror}") from None
    try:
        os.write(fd, request.encode() + b"\n")
    except OSError as e:
        raise _Refused(f"{request}: refused by {os.path.basename(path)}: {e.strerror} "
                       f"(the reason is in the mount's log and audit log)") from None
    finally:
        os.close(fd)


def _over_socket(args, op: str, **request) -> dict | None:
    """``op`` over the mount's control socket: its answer; None when this process
    cannot use it (not the host's root, or a daemon without one): the control file is
    written instead. A refusal by the daemon is final (_Refused)."""
    from imafs.ctl.client import Client, CtlError
    try:
        client = Client.for_mount(args.mount)
    except CtlError as e:
        _say(f"(control socket: {e}; writing the control file instead)")
        return None
    pidfd = os.pidfd_open(os.getpid())
    try:
        with client:
            return client.call(op, fds={"pidfd": pidfd}, ns=args.ns or "", **request)
    except CtlError as e:
        why = f" ({e.errno})" if e.errno else ""
        raise _Refused(f"{request.get('path') or request.get('list')}: {e}{why}") from None
    finally:
        os.close(pidfd)


def _check_ns(args) -> None:
    if any(p in (".", "..") for p in (args.ns or "").split("/")):
        raise _Refused(f"--ns {args.ns}: a namespace path has no . or ..")


def _load(args) -> int:
    """Over the mount's control socket (imafs/ctl): the daemon opens the path as this
    process sees it; else through MNT/.imafs/digest_list_add, which does the same."""
    _check_ns(args)
    path = os.path.abspath(args.list)
    ans = _over_socket(args, "digest-list-add", path=path)
    if ans is None:
        _write_control(_control_file(args, "digest_list_add"), path)
        _say(f"{path}: loaded as {os.path.basename(path)}"
             + (f" into namespace {args.ns}" if args.ns else ""))
        return 0
    d = ans["digest_list"]
    _say(f"{path}: loaded as {d['label']} into namespace {d['namespace']} "
         f"({d['digests']} digests, {d['actions']}, {d['digest']})")
    return 0


def _unload(args) -> int:
    _check_ns(args)
    what = args.list
    if "/" in what or os.path.exists(what):
        what = os.path.abspath(what)
    ans = _over_socket(args, "digest-list-del", list=what)
    if ans is None:
        _write_control(_control_file(args, "digest_list_del"), what)
    _say(f"{what}: unloaded" + (f" from namespace {args.ns}" if args.ns else ""))
    return 0


def _show(args) -> int:
    with open(args.list, "rb") as f:
        data = f.read(dl.MAX_LIST_SIZE + 1)
    lst = dl.parse(data)
    out = sys.stdout
    algos = sorted({b.algo for b in lst.blocks})
    form = "imafs digest list" if lst.provenance else "DIGLIM compact list (no provenance)"
    out.write(f"{args.list}: {form}, {lst.count} digests in {len(lst.blocks)} blocks "
              f"({', '.join(algos) or 'none'}), {len(data)} bytes\n")
    p = lst.provenance
    if p is not None:
        out.write(f"source: {p.source}\ngenerator: {p.generator}\n")
        for i, a in enumerate(p.archives):
            desc = ", ".join(f"{k}: {v}" for k, v in a.items()
                             if k not in ("signed_by", "release_sha256"))
            out.write(f"archive {i}: {desc}\n  Release sha256: {a.get('release_sha256', '?')}"
                      f"\n  signed by: {', '.join(a.get('signed_by', [])) or '?'}\n")
        out.write(f"keys: {', '.join(p.keys) or 'none'}\n")
        out.write(f"packages: {len(p.packages)}\n")
        for pkg in p.packages:
            b = lst.blocks[pkg.block]
            extra = f", .deb sha256 {pkg.sha256}" if p.source == "debian" and pkg.sha256 \
                else (f", header sha256 {pkg.sha256}" if pkg.sha256 else "")
            key = f", key {pkg.key}" if pkg.key else ""
            out.write(f"  {pkg.name} {pkg.version} {pkg.arch}: {pkg.files} files, "
                      f"{b.count} digests{extra}{key}\n")
        if p.missing:
            out.write(f"missing: {len(p.missing)} (their files are not in the list)\n")
            for m in p.missing:
                out.write(f"  {m.get('name', '?')} {m.get('version', '?')} "
                          f"{m.get('arch', '')}: {m.get('reason', '')}\n")
    for i, b in enumerate(lst.blocks):
        if p is None or p.package_of_block(i) is None:
            out.write(f"block {i}: {dl.TYPE_NAMES[b.type]}, {b.describe()}\n")
    if args.digests:
        for i, typ, algo, d in lst.digests():
            pkg = lst.package_of_block(i)
            who = f"  {pkg.name} {pkg.version}" if pkg else ""
            out.write(f"{hashing.format_digest(algo, d)} {dl.TYPE_NAMES[typ]}{who}\n")
    return 0
