#!/usr/bin/env python3
"""Check an imafs ascii measurement list with keylime's own verifier code.

    keylime_check.py POLICY.json ASCII_LIST PCR_FILE [--host-list HOST_ASCII_LIST]

POLICY.json is a keylime runtime policy (``imafs keylime-policy``). PCR_FILE is an
imafs ``pcrs/sha1`` file; its PCR-10 line is the value the list must replay to.
``--host-list``: the list is a child namespace's; its ``ns-init`` entry must carry
the same data as an ``ns-create`` entry of the host list (that ties the two lists).
Exit 0 when keylime accepts the list and the PCR value.
"""
from __future__ import annotations

import argparse
import json
import sys
import types


def _keylime():
    try:
        import gpg  # noqa: F401  (keylime.signing imports it; the checker never uses it)
    except ImportError:
        sys.modules.setdefault("gpg", types.ModuleType("gpg"))
    import logging
    logging.disable(logging.WARNING)  # keylime warns about its missing config files
    from keylime.ima import ima
    return ima


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policy")
    ap.add_argument("ascii_list")
    ap.add_argument("pcr_file")
    ap.add_argument("--host-list")
    a = ap.parse_args()
    ima = _keylime()
    with open(a.policy) as f:
        policy = json.load(f)
    # no TPM here: the boot aggregate is all zeros (as the kernel records it)
    policy.setdefault("digests", {}).setdefault("boot_aggregate", []).append("00" * 32)
    if a.host_list:
        with open(a.host_list) as f:
            creates = [line.split()[3].split(":", 1)[1] for line in f
                       if len(line.split()) >= 5 and line.split()[4] == "ns-create"]
        policy.setdefault("ima-buf", {})["ns-init"] = creates
    ima.validate_runtime_policy(policy)
    with open(a.ascii_list) as f:
        lines = f.read().splitlines(True)
    pcr10 = None
    with open(a.pcr_file) as f:
        for line in f:
            if line.startswith("PCR-10:"):
                pcr10 = line.split()[1]
    if pcr10 is None:
        print(f"{a.pcr_file}: no PCR-10 line", file=sys.stderr)
        return 2
    running, failure = ima.process_measurement_list(None, lines, policy, pcrval=pcr10)
    if failure:
        for ev in failure.events:
            print(f"keylime: {ev.event_id}: {ev.context}", file=sys.stderr)
        return 1
    print(f"  keylime: {len(lines)} entries verified; PCR 10 replays to {running}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
