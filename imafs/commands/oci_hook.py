"""``imafs oci-hook``: the OCI runtime hook (imafs/ctl/oci.py)."""
from __future__ import annotations

import json
import sys

from imafs.commands import CommandError

DESCRIPTION = """\
An OCI runtime hook: put it in a bundle's config.json as a createRuntime (or prestart)
and a poststop hook, with the container's root (root.path) an imafs mount:

  "hooks": {"createRuntime": [{"path": "/usr/local/bin/imafs", "args": ["imafs", "oci-hook"]}],
            "poststop":      [{"path": "/usr/local/bin/imafs", "args": ["imafs", "oci-hook"]}]}

At createRuntime it creates the container's integrity namespace from the host (named
after the container id, or annotation org.imafs.namespace) with the policy, keys and
options of the profile annotation org.imafs.profile names, and binds the container's
init before any of its code runs; at poststop it archives the namespace's list and
removes it. Configuration: /etc/imafs/oci-hook.conf (docs/namespaces.md). Any refusal
is one line on stderr and exit status 2: the runtime then fails the container."""


def _run(args) -> int:
    from imafs.ctl import oci
    from imafs.ctl.client import CtlError
    from imafs.ctl.profiles import ProfileError, load_config
    try:
        cfg = load_config(args.config)
        data = sys.stdin.buffer.read(oci.MAX_STATE + 1)
        out = oci.run(data, cfg, args.stage, args.state)
    except (oci.HookError, ProfileError, CtlError) as e:
        raise CommandError(str(e)) from None
    if args.verbose and out is not None:
        print(json.dumps(out, indent=2), file=sys.stderr)
    return 0


def register(sub) -> None:
    import argparse
    p = sub.add_parser("oci-hook", help="OCI runtime hook: a container's integrity "
                                        "namespace, made from the host",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", metavar="STAGE",
                   help="createRuntime, prestart or poststop (optional: the state's "
                        "status tells them apart; given, it is checked)")
    p.add_argument("--config", metavar="FILE",
                   help="the hook's configuration (default /etc/imafs/oci-hook.conf, "
                        "defaults when it does not exist)")
    p.add_argument("--state", metavar="DIR",
                   help="the mount's state directory (default: as its daemon recorded "
                        "under /run/imafs)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print the namespace made or removed on stderr")
    p.set_defaults(func=_run)
