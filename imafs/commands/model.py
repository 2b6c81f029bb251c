"""``imafs model``: behaviour models (docs/models.md).

``imafs model export MNT [--ns NAME[/NAME...]] -o FILE`` writes a namespace's model as
a model file (aggregate, pseudonyms, coefficients, state, seal, end), asked of the
daemon over the mount's control socket (``model-export``), or -- when the socket
cannot be used -- read from the mount's control files
(``.imafs/namespaces/NAME/model/export``; without ``--ns``, the caller's own
namespace's). ``imafs model check FILE`` parses a model file as a ``load`` would and
prints what it holds.
"""
from __future__ import annotations

import sys
from pathlib import Path

from imafs.commands import CommandError
from imafs.commands._files import write_whole
from imafs.ima.modelfile import MAX_MODEL_BYTES, ModelFileError, parse_model


def model_dir(mnt: str, ns: str | None, control: str = ".imafs") -> Path:
    """The control directory of namespace ``ns`` (``a/b``: b below a) seen from the
    mount's root namespace (or the caller's own without ``ns``)."""
    d = Path(mnt) / control
    if not d.is_dir():
        raise CommandError(f"{mnt}: no imafs mount here (no {control}/)")
    for part in (ns or "").strip("/").split("/"):
        if part:
            if part in (".", "..") or "/" in part:
                raise CommandError(f"--ns {ns}: a namespace path is NAME[/NAME...]")
            d = d / "namespaces" / part
    return d / "model"


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MODEL_BYTES + 1)
    except FileNotFoundError:
        raise CommandError(f"{path}: no such namespace, or it has no behaviour model") \
            from None
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    return data


def _over_socket(args) -> tuple[bytes, str] | None:
    """The model file over the control socket, or None when the socket cannot be
    used (so the control files are read); CommandError for a refusal."""
    from imafs.ctl.client import Client, CtlError
    if not args.ns:
        return None
    try:
        c = Client.for_mount(args.mnt, state=args.state)
    except CtlError as e:
        if not args.quiet:
            print(f"imafs model export: control socket: {e}; reading the control files",
                  file=sys.stderr)
        return None
    try:
        with c:
            ans = c.call("model-export", ns=args.ns)
    except CtlError as e:
        if e.errno == "EFBIG":
            return None
        raise CommandError(str(e)) from None
    return ans["model"].encode("ascii"), "control socket"


def _export(args) -> int:
    got = _over_socket(args)
    if got is not None:
        data, src = got
    else:
        path = model_dir(args.mnt, args.ns, args.control_name) / "export"
        data, src = _read(path), str(path)
    try:
        mf = parse_model(data)
    except ModelFileError as e:         # what the mount gave is no model file
        raise CommandError(f"{src}: {e}") from None
    if args.output == "-":
        sys.stdout.buffer.write(data)
    else:
        try:
            write_whole(args.output, data)
        except OSError as e:
            raise CommandError(f"{args.output}: {e.strerror}") from None
    if not args.quiet:
        print(f"{args.output if args.output != '-' else '<stdout>'}: "
              f"{len(mf.coefficients)} coefficient(s), {len(mf.pseudonyms)} pseudonym(s), "
              f"state {mf.computed_state().hex()} (from {src})", file=sys.stderr)
    return 0


def _check(args) -> int:
    data = sys.stdin.buffer.read(MAX_MODEL_BYTES + 1) if args.file == "-" \
        else _read(Path(args.file))
    try:
        mf = parse_model(data)
    except ModelFileError as e:
        print(f"imafs model check: {args.file}: {e}", file=sys.stderr)
        return 1
    print(f"aggregate {mf.aggregate.hex()}\ncoefficients {len(mf.coefficients)}\n"
          f"pseudonyms {len(mf.pseudonyms)}\nstate {mf.computed_state().hex()}\n"
          f"sealed {'yes' if mf.sealed else 'no'}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "model", help="export or check behaviour models",
        description="Behaviour models of integrity namespaces (docs/models.md).")
    sub = p.add_subparsers(dest="model_cmd", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])

    e = sub.add_parser(
        "export", help="write a namespace's model as a model file",
        description="Write the behaviour model of namespace NAME of the mount MNT (its "
                    "in-model coefficients, pseudonyms, state, seal) as a model file, "
                    "which a 'load' or an ns-create model=PATH takes (sign it when the "
                    "policy appraises POLICY_CHECK). Asked of the daemon over the "
                    "mount's control socket (root of the host), else read from "
                    "MNT/.imafs/namespaces/NAME/model/export.")
    e.add_argument("mnt", metavar="MNT")
    e.add_argument("--ns", metavar="NAME[/NAME...]",
                   help="the namespace, below the caller's own (default: the caller's)")
    e.add_argument("-o", "--output", required=True, metavar="FILE", help="'-': stdout")
    e.add_argument("--control-name", default=".imafs",
                   help="the mount's control directory (as mount's --control-name)")
    e.add_argument("--state", metavar="DIR",
                   help="the daemon's state directory, when /run/imafs has no record of it")
    e.add_argument("-q", "--quiet", action="store_true")
    e.set_defaults(func=_export)

    c = sub.add_parser(
        "check", help="parse a model file and say what it holds",
        description="Parse FILE ('-': stdin) as a load would; exit 1 with the line of "
                    "the first error.")
    c.add_argument("file", metavar="FILE")
    c.set_defaults(func=_check)
