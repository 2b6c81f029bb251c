"""``imafs ns create|list|remove``: integrity namespaces of a mount, made and removed
from the host over the mount's control socket (imafs/ctl)."""
from __future__ import annotations

import base64
import json
import os
import sys

from imafs.commands import CommandError

CREATE_DESCRIPTION = """\
Create integrity namespace NAME as a child of the mount's root namespace and bind
process PID (and everything it starts afterwards) to it, over the mount's control
socket -- nothing goes through the mount, so a read-only mount works too.

Its policy, keys and options come from a profile (--profile P: the directory
PROFILES/P/ with policy, keys/ and options; PROFILES defaults to the OCI hook's,
/etc/imafs/profiles), or from --policy FILE and --keys DIR, plus OPTION=VALUE words
of the namespace-options grammar (docs/namespaces.md): template=, hash=, appraise=,
evm=enforce|log|off, evm_key=FILE (its EVM HMAC key, read by the daemon), policy=FILE,
keys=DIR, model=learn|FILE (a behaviour model: learning, or from a model file of the
host). An option given twice (by the profile and a word) is refused.
Everything is checked before anything is made; a refusal makes nothing."""


def _client(args):
    from imafs.ctl.client import Client, CtlError
    try:
        return Client.for_mount(args.mnt, state=args.state)
    except CtlError as e:
        raise CommandError(str(e)) from None


def _create(args) -> int:
    from imafs.ctl.client import CtlError
    from imafs.ctl.profiles import HostOptions, ProfileError, load_config, load_profile, \
        parse_option_words
    if args.profile and (args.policy or args.keys):
        raise CommandError("give --profile, or --policy and --keys, not both")
    words = list(args.options)
    if args.policy:
        words.append(f"policy={os.path.abspath(args.policy)}")
    if args.keys:
        words.append(f"keys={os.path.abspath(args.keys)}")
    try:
        opts = HostOptions()
        if args.profile:
            base = args.profiles or load_config().profiles
            opts = load_profile(base, args.profile)
        extra = parse_option_words(words, host_files=True, source="imafs ns create",
                                   strict=False)
        opts.merge(extra, "the command line",
                   f"profile {args.profile}" if args.profile else "nobody")
    except ProfileError as e:
        raise CommandError(str(e)) from None
    try:
        pidfd = os.pidfd_open(args.pid)
    except OSError as e:
        raise CommandError(f"--pid {args.pid}: {e.strerror}") from None
    try:
        with _client(args) as c:
            ans = c.call("ns-create", name=args.name, pid=args.pid, options=opts.options,
                         policy=opts.policy,
                         certs=[base64.b64encode(d).decode() for d in opts.certs],
                         model=opts.model, fds={"pidfd": pidfd})
    except CtlError as e:
        raise CommandError(str(e)) from None
    finally:
        os.close(pidfd)
    ns = ans["namespace"]
    model = f", model {ns['model']}" if ns.get("model") else ""
    print(f"namespace {ns['path']} (id {ns['id']}, uuid {ns['uuid']}): {ns['rules']} "
          f"rule(s), {len(ns['keys'])} key(s), appraise {ns['appraise']}{model}; pid "
          f"{args.pid} bound")
    return 0


def _list(args) -> int:
    from imafs.ctl.client import CtlError
    try:
        with _client(args) as c:
            spaces = c.call("ns-list")["namespaces"]
    except CtlError as e:
        raise CommandError(str(e)) from None
    if args.json:
        print(json.dumps(spaces, indent=2))
        return 0
    rows = [("NAMESPACE", "ID", "PROCS", "ENTRIES", "ORIGIN", "OPTIONS", "UUID")]
    for ns in spaces:
        rows.append((ns["path"], str(ns["id"]), str(ns["processes"]), str(ns["entries"]),
                     ns["origin"], f"template={ns['template']} hash={ns['hash']} "
                                   f"appraise={ns['appraise']} evm={ns['evm']} "
                                   f"rules={ns['rules']} "
                                   f"keys={len(ns['keys'])}"
                                   + (f" model={ns['model']}" if ns.get("model") else ""),
                     ns["uuid"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _remove(args) -> int:
    from imafs.ctl.client import CtlError
    dfd = None
    if args.archive:
        try:
            os.makedirs(args.archive, mode=0o700, exist_ok=True)
            dfd = os.open(args.archive, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CommandError(f"--archive {args.archive}: {e.strerror}") from None
    try:
        with _client(args) as c:
            ns = c.call("ns-remove", name=args.name, uuid=args.uuid,
                        fds={"archive": dfd} if dfd is not None else None)["namespace"]
    except CtlError as e:
        raise CommandError(str(e)) from None
    finally:
        if dfd is not None:
            os.close(dfd)
    pcr = ns.get("pcr10_sha256") or ns.get("pcr10_sha1", "")
    where = f"; archived in {os.path.join(args.archive, ns['archive'])}" \
        if "archive" in ns else ""
    print(f"namespace {ns['path']} (id {ns['id']}) removed: {ns['entries']} entries, "
          f"PCR 10 {pcr}{where}")
    return 0


def register(sub) -> None:
    import argparse
    p = sub.add_parser("ns", help="create, list and remove a mount's integrity namespaces "
                                  "from the host",
                       description="Integrity namespaces of a mount, over its control "
                                   "socket (docs/namespaces.md).")
    s = p.add_subparsers(dest="ns_cmd", metavar="ACTION")
    p.set_defaults(func=lambda args: (p.print_help(sys.stderr), 2)[1])

    def common(q):
        q.add_argument("mnt", metavar="MNT", help="the imafs mount point")
        q.add_argument("--state", metavar="DIR",
                       help="the mount's state directory (default: as its daemon "
                            "recorded under /run/imafs)")

    c = s.add_parser("create", help="create a namespace and bind a process to it",
                     description=CREATE_DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common(c)
    c.add_argument("name", metavar="NAME", help="up to 64 letters, digits, '.', '_', '-'")
    c.add_argument("options", metavar="OPTION=VALUE", nargs="*",
                   help="namespace options (docs/namespaces.md)")
    c.add_argument("--pid", type=int, required=True,
                   help="the process to bind (a container's init)")
    c.add_argument("--profile", metavar="P", help="the profile PROFILES/P/")
    c.add_argument("--profiles", metavar="DIR",
                   help="where profiles live (default: the OCI hook's, /etc/imafs/profiles)")
    c.add_argument("--policy", metavar="FILE", help="the namespace's policy (host file)")
    c.add_argument("--keys", metavar="DIR", help="the namespace's certificates (host "
                                                 "directory)")
    c.set_defaults(func=_create, trailing="options")

    ls = s.add_parser("list", help="list the namespaces of a mount",
                      description="Every namespace below the mount's root: path, id, "
                                  "processes bound, list entries, origin (host: made by "
                                  "imafs ns or the OCI hook; inside: by ns-create), "
                                  "options, UUID.")
    common(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    r = s.add_parser("remove", help="remove a namespace without processes",
                     description="Remove NAME, a child of the mount's root namespace, "
                                 "once no process is left in it; its removal is recorded "
                                 "in the root's list (ns-remove: final entry count and PCR "
                                 "10). --archive DIR first writes its lists and PCR files "
                                 "into DIR/NAME.ID/ (evmctl and imafs verify-log replay "
                                 "them).")
    common(r)
    r.add_argument("name", metavar="NAME")
    r.add_argument("--archive", metavar="DIR", help="archive the namespace's list here")
    r.add_argument("--uuid", metavar="UUID",
                   help="remove it only if it is this one (its UUID)")
    r.set_defaults(func=_remove)
