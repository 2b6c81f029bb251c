"""imafs verify-log: replay a measurement list offline, as a verifier would."""
from __future__ import annotations

import os
import string
import sys

from imafs.commands import CommandError


def _pcr_arg(text: str):
    bank, sep, path = text.partition(",")
    if not sep or not bank or not path:
        raise CommandError(f"--pcrs takes BANK,FILE (e.g. sha256,MNT/.imafs/pcrs/sha256), not {text!r}")
    return bank, path


def _pcr_value(text: str):
    """``BANK:INDEX=HEX``, HEX as ``tpm2_pcrread`` prints it too (``0x`` prefix, upper
    case): (bank, index, value). The value must be exactly the bank's digest size."""
    from imafs.ima.template_lib import hash_size
    from imafs.ima.verifylog import NUM_PCRS
    usage = f"--pcr takes BANK:INDEX=HEX (e.g. sha256:10=0x0831d9...), not {text!r}"
    head, sep, value = text.partition("=")
    bank, sep2, n = head.partition(":")
    if not sep or not sep2 or not bank.strip() or not n.strip():
        raise CommandError(usage)
    bank, n, value = bank.strip().lower(), n.strip(), value.strip()
    if not n.isdigit() or int(n) >= NUM_PCRS:
        raise CommandError(f"--pcr {text!r}: the index must be 0-{NUM_PCRS - 1}")
    try:
        size = hash_size(bank)
    except ValueError as e:
        raise CommandError(f"--pcr {text!r}: bank {bank!r}: {e}")
    if value[:2] in ("0x", "0X"):
        value = value[2:]
    if value.strip(string.hexdigits):
        raise CommandError(f"--pcr {text!r}: the value is not hex")
    if len(value) != 2 * size:
        raise CommandError(f"--pcr {text!r}: a {bank} PCR value is {size} bytes "
                           f"({2 * size} hex digits), this one has {len(value)} digits")
    return bank, int(n), bytes.fromhex(value)


def _run(args) -> int:
    from imafs.ima import verifylog
    from imafs.ima.keys import Keyring, KeyringError

    expected: dict[str, dict[int, bytes]] = {}
    for spec in args.pcrs or []:
        bank, path = _pcr_arg(spec)
        try:
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
            text = raw.decode("ascii")
        except OSError as e:
            raise CommandError(f"{path}: {e.strerror}")
        except UnicodeDecodeError:
            raise CommandError(f"{path}: not a PCR file (binary data; expected lines "
                               f"\"PCR-NN: <hex>\", as MNT/.imafs/pcrs/{bank} has)")
        try:
            expected.setdefault(bank, {}).update(verifylog.parse_pcr_file(text))
        except ValueError as e:
            raise CommandError(f"{path}: {e}")
    for spec in args.pcr or []:
        bank, n, value = _pcr_value(spec)
        expected.setdefault(bank, {})[n] = value
    # every bank named must be one we can compute, and every bank with expected values
    # is replayed: a misspelt bank must never make a list "match" unchecked
    from imafs.ima.template_lib import new_hash
    banks = [b for b in args.banks.split(",") if b]
    for b in [args.bank, *banks, *expected]:
        try:
            new_hash(b)
        except ValueError as e:
            raise CommandError(f"bank {b!r}: {e}")
    banks += [b for b in expected if b not in banks]
    keyring = None
    if args.keys or args.key:
        keyring = Keyring(require_digsig=False)
        try:
            for d in args.keys or []:
                _, refused = keyring.load_dir(d)
                for fp, why in refused:
                    print(f"imafs verify-log: key {fp} not loaded: {why}", file=sys.stderr)
            for k in args.key or []:
                with open(k, "rb") as f:
                    keyring.add(f.read())
        except (OSError, KeyringError) as e:
            raise CommandError(f"keys: {e}")
    rep = _replay(args.list, args, banks, expected, keyring)
    name = os.path.basename(args.list)
    for p in rep.problems:
        print(f"imafs verify-log: {name}: {p}", file=sys.stderr)
    links_ok, tied = True, []
    if rep.ok and args.child:
        children = []
        for child in args.child:
            path = _child_list(child)
            crep = _replay(path, args, banks, {}, keyring)
            for p in crep.problems:
                print(f"imafs verify-log: {child}: {p}", file=sys.stderr)
            if not crep.ok:
                links_ok = False
                continue
            children.append((child, crep))
        for lk in verifylog.link(rep, children):
            for p in lk.problems:
                print(f"imafs verify-log: {lk.child}: {p}", file=sys.stderr)
                links_ok = False
            if not lk.problems:
                gone = (f"; removed at entry {lk.removed_at}: its length and PCR 10 match"
                        if lk.removed_at is not None else "; not removed yet")
                tied.append(f"{lk.child}: namespace {lk.name} (id {lk.id}) created at "
                            f"entry {lk.created_at} of {name}{gone}")
    if rep.ok and links_ok:
        checked = "; ".join(
            f"{b} PCR {', '.join(str(i) for i in sorted(r) if i in rep.used_pcrs or any(r[i]))}"
            f" match" for b, r in expected.items()) or "no PCR values given"
        print(f"{name}: OK: {rep.entries} entries ({rep.violations} violations), "
              f"{rep.signatures_checked} signatures verified; {checked}")
        if rep.ns_events:
            counts: dict[str, int] = {}
            for _, ev, _, _ in rep.ns_events:
                counts[ev] = counts.get(ev, 0) + 1
            print(f"{name}: namespace events: " + ", ".join(
                f"{n} {ev}" for ev, n in counts.items()) + " (each explained by the list)")
        for line in tied:
            print(line)
        if args.show_pcrs:
            for b, regs in rep.pcrs.items():
                for i in sorted(rep.used_pcrs):
                    print(f"{b} PCR-{i:02d}: {regs[i].hex()}")
        return 0
    return 1


def _child_list(path: str) -> str:
    """A child list named by its file, or by an archive directory (imafs ns remove
    --archive, the OCI hook's poststop): its binary_runtime_measurements."""
    if os.path.isdir(path):
        return os.path.join(path, "binary_runtime_measurements")
    return path


def _replay(path: str, args, banks, expected, keyring):
    from imafs.ima import verifylog
    try:
        stream = open(path, "rb")
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}")
    with stream:
        fmt = args.format
        if fmt == "auto":
            head = stream.read(32)
            stream.seek(0) if stream.seekable() else None
            fmt = verifylog.detect_format(head)
            if not stream.seekable():
                raise CommandError("give --format for a list that cannot be re-read")
        return verifylog.verify(verifylog.entries_of(stream, fmt, args.bank), bank=args.bank,
                                banks=banks, expected=expected,
                                keyring=keyring, all_problems=args.all)


def register(sub) -> None:
    p = sub.add_parser("verify-log", help="replay a measurement list offline and check it",
                       description="Check every template hash, replay the list into the PCR "
                                   "banks and compare with the values given; with keys, "
                                   "verify ima-sig signatures; check that every namespace "
                                   "event (ns-create, ns-remove, ...) is well formed and "
                                   "explained by the list, and with --child that child lists "
                                   "are the ones its events name. Reports the first bad entry "
                                   "(--all: every one). Exit 0 when the list is good.")
    p.add_argument("list", metavar="LIST", help="ascii or binary list (a file, or MNT/.imafs/...)")
    p.add_argument("--pcrs", action="append", metavar="BANK,FILE",
                   help="expected PCRs from a pcrs/ file (PCR-NN: <hex> lines); repeatable")
    p.add_argument("--pcr", action="append", metavar="BANK:N=HEX", help="one expected PCR value")
    p.add_argument("--bank", default="sha1",
                   help="bank of the template hashes in LIST (binary lists; default sha1)")
    p.add_argument("--banks", default="sha1,sha256", help="banks to replay (default sha1,sha256)")
    p.add_argument("--format", choices=["auto", "ascii", "binary"], default="auto")
    p.add_argument("--keys", action="append", metavar="DIR", help="certificates to check signatures")
    p.add_argument("--key", action="append", metavar="CERT", help="one certificate")
    p.add_argument("--all", action="store_true", help="report every bad entry, not only the first")
    p.add_argument("--show-pcrs", action="store_true", help="print the replayed PCR values")
    p.add_argument("--child", action="append", metavar="LIST|DIR",
                   help="a child namespace's list (or its archive directory): its ns-init "
                        "must be an ns-create of LIST and, once LIST recorded its removal, "
                        "its length and PCR 10 must be the removal's; repeatable")
    p.set_defaults(func=_run)
