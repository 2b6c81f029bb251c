#!/usr/bin/env python3
"""Check an imafs ascii measurement list with keylime's own verifier code.

    keylime_check.py POLICY.json ASCII_LIST PCR_FILE [--host-list HOST_ASCII_LIST]

POLICY.json is a keylime runtime policy (``imafs keylime-policy``), used exactly as
written: it is checked with keylime's ``validate_runtime_policy``, its
"verification-keys" become the keyring keylime checks ima-sig signatures with (as
keylime's verifier does), and ``process_measurement_list`` replays the list against
it. PCR_FILE is an imafs ``pcrs/sha1`` or ``pcrs/sha256`` file; its PCR-10 line is
the value the list must replay to (the bank follows from the value's size).
``--host-list``: the list is a child namespace's; its ``ns-init`` entry must carry
the same data as an ``ns-create`` entry of the host list (that ties the two lists).
Exit 0 when keylime accepts the list and the PCR value, 1 when it does not (each
failure on one line), 2 for unusable input.
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
    logging.disable(logging.ERROR)  # keylime logs its config files' absence, and what we print
    from keylime.common.algorithms import Hash
    from keylime.ima import file_signatures, ima
    return ima, file_signatures, Hash


def _buffers(path: str, name: str) -> list[str]:
    """The data (hex) of every ima-buf entry called ``name`` of an ascii list."""
    out = []
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split(" ")
            if len(fields) >= 6 and fields[2] == "ima-buf" and fields[4] == name:
                out.append(fields[5])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("policy")
    ap.add_argument("ascii_list")
    ap.add_argument("pcr_file")
    ap.add_argument("--host-list")
    a = ap.parse_args()
    ima, file_signatures, Hash = _keylime()
    try:
        with open(a.policy) as f:
            policy = json.load(f)
        with open(a.ascii_list) as f:
            lines = f.read().splitlines(True)
        with open(a.pcr_file) as f:
            pcr10 = next((line.split()[1] for line in f if line.startswith("PCR-10:")), None)
    except (OSError, ValueError) as e:
        print(f"keylime_check: {e}", file=sys.stderr)
        return 2
    try:
        ima.validate_runtime_policy(policy)
    except ima.ImaValidationError as e:
        print(f"keylime_check: {a.policy}: keylime refuses the policy: {e.message}",
              file=sys.stderr)
        return 2
    if pcr10 is None:
        print(f"keylime_check: {a.pcr_file}: no PCR-10 line", file=sys.stderr)
        return 2
    banks = {40: Hash.SHA1, 64: Hash.SHA256, 96: Hash.SHA384, 128: Hash.SHA512}
    if len(pcr10) not in banks:
        print(f"keylime_check: {a.pcr_file}: PCR-10 is no sha1/sha256/sha384/sha512 value",
              file=sys.stderr)
        return 2
    if a.host_list:
        inits = _buffers(a.ascii_list, "ns-init")
        creates = _buffers(a.host_list, "ns-create")
        if len(inits) != 1 or inits[0] not in creates:
            print(f"keylime_check: {a.ascii_list}: its ns-init entry ({len(inits)} found) is "
                  f"no ns-create entry of {a.host_list}", file=sys.stderr)
            return 1
    # what keylime's verifier does with the policy's keys (cloud_verifier_common)
    keyrings = file_signatures.ImaKeyrings()
    keyrings.set_tenant_keyring(file_signatures.ImaKeyring.from_string(
        policy.get("verification-keys") or ""))
    running, failure = ima.process_measurement_list(
        None, lines, policy, pcrval=pcr10, ima_keyrings=keyrings, hash_alg=banks[len(pcr10)])
    if failure:
        for ev in failure.events:
            ctx = ev.context
            try:
                ctx = json.loads(ctx) if isinstance(ctx, str) else ctx
            except ValueError:
                pass
            if isinstance(ctx, dict) and "got" in ctx:   # name the entries with that digest
                names = sorted({f[4] for f in (x.split(" ") for x in lines)
                                if len(f) > 4 and f[3].split(":")[-1] == ctx["got"]})
                ctx = f"{', '.join(names) or '?'}: {ctx.get('message')}: {ctx['got']}"
            elif isinstance(ctx, dict) and "message" in ctx:
                ctx = ctx["message"]
            print(f"keylime: {ev.event_id}: {ctx}", file=sys.stderr)
        return 1
    tied = "; tied to the host list's ns-create" if a.host_list else ""
    print(f"keylime: {sum(1 for x in lines if x.strip())} entries verified; PCR 10 "
          f"({banks[len(pcr10)].value}) replays to {running}{tied}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
