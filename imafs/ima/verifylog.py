"""Offline verification of a measurement list: what a remote verifier does before it
trusts a list (``imafs verify-log``).

For every entry: the recorded template hash must equal the hash of the entry's data
(the bank the list was printed for); an ``ima-sig``/``ima-sigv2`` signature, when
keys are given, must verify over the recorded file digest. The list is replayed into
every bank (a violation extends 0xff.., as the kernel does) and the result compared
with the PCR values given. The first bad entry is reported with its number and byte
offset. Works on binary and ascii lists of any bank, streamed: a list of a million
entries is never held in memory.

Namespace events (the ``ima-buf`` entries ns-create, ns-init, ns-remove, ns-join,
ns-join-failed: namespaces.py) are checked too, because a keylime policy excludes
them (docs/attestation.md): each must parse; an ``ns-init`` only as a child list's
second entry; a removal, join or failed join must name a namespace an earlier
``ns-create`` of the same list made (same name, id, UUID), and one namespace is
created once. :func:`link` then ties child lists to their parent: a child's
``ns-init`` must carry exactly the data of an ``ns-create`` of the parent, and when
the parent recorded the child's removal, its ``entries=`` and ``pcr10=`` must be
the child list's length and replayed PCR 10 (an archived list is complete).
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

from imafs.ima import appraise as ap
from imafs.ima.nsevents import NS_CREATE, NS_EVENTS, NS_INIT, NS_REMOVE, parse_event
from imafs.ima.template_lib import TemplateError, hash_size, new_hash
from imafs.ima.templates import TemplateEntry, parse_ascii, parse_binary

NUM_PCRS = 24


@dataclass
class Problem:
    entry: int | None          # 0-based entry number (None: not about one entry)
    kind: str                  # template-hash | signature | pcr-mismatch | parse
    detail: str
    name: str = ""

    def __str__(self) -> str:
        where = f"entry {self.entry}" if self.entry is not None else "list"
        name = f" ({self.name})" if self.name else ""
        return f"{where}{name}: {self.kind}: {self.detail}"


@dataclass
class Report:
    entries: int = 0
    violations: int = 0
    signatures_checked: int = 0
    pcrs: dict = field(default_factory=dict)     # bank -> list of NUM_PCRS digests
    used_pcrs: set = field(default_factory=set)
    problems: list = field(default_factory=list)
    ns_events: list = field(default_factory=list)   # (entry, event, data, fields)
    ns_created: dict = field(default_factory=dict)  # id -> (name, id, uuid)

    @property
    def ok(self) -> bool:
        return not self.problems


def detect_format(head: bytes) -> str:
    """"ascii" when the data starts like "10 <hex> ", else "binary"."""
    stripped = head.lstrip(b" ")
    digits = len(stripped) - len(stripped.lstrip(b"0123456789"))
    if 0 < digits <= 10 and stripped[digits:digits + 1] == b" ":
        return "ascii"
    return "binary"


def parse_pcr_file(text: str) -> dict[int, bytes]:
    """``PCR-NN: <hex>`` lines (``pcrs/<bank>``, the evmctl format)."""
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        head, sep, value = line.partition(":")
        if not sep or not head.startswith("PCR-") or not head[4:].isdigit():
            raise ValueError(f"line {n}: expected 'PCR-NN: <hex>', got {line[:40]!r}")
        try:
            out[int(head[4:])] = bytes.fromhex(value.strip())
        except ValueError:
            raise ValueError(f"line {n}: PCR value is not hex") from None
    return out


def entries_of(stream: BinaryIO, fmt: str, bank: str) -> Iterator[TemplateEntry]:
    if fmt == "ascii":
        return parse_ascii(stream)
    return parse_binary(stream, bank)


def verify(entries: Iterable[TemplateEntry], *, bank: str = "sha1",
           banks: Iterable[str] = ("sha1", "sha256"),
           expected: dict[str, dict[int, bytes]] | None = None,
           keyring=None, all_problems: bool = False) -> Report:
    """Replay ``entries`` (whose recorded template hashes are of ``bank``) into
    ``banks`` and compare with ``expected`` ({bank: {pcr: value}})."""
    banks = list(dict.fromkeys([bank, *banks]))
    rep = Report(pcrs={b: [bytes(hash_size(b))] * NUM_PCRS for b in banks})

    def problem(p: Problem) -> bool:
        rep.problems.append(p)
        return not all_problems

    sizes = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}
    try:
        for i, e in enumerate(entries):
            if i == 0 and e.recorded_hash is not None and len(e.recorded_hash) != hash_size(bank):
                # an ascii list of another bank (ascii_runtime_measurements_sha256)
                bank = sizes.get(len(e.recorded_hash), bank)
                if bank not in rep.pcrs:
                    rep.pcrs[bank] = [bytes(hash_size(bank))] * NUM_PCRS
                    banks.append(bank)
            rep.entries += 1
            name = (e.name or b"").decode("utf-8", "replace")
            if e.pcr >= NUM_PCRS:
                if problem(Problem(i, "parse", f"PCR {e.pcr} out of range", name)):
                    return rep
                continue
            rep.used_pcrs.add(e.pcr)
            if e.violation:
                rep.violations += 1
            elif e.recorded_hash is not None and e.recorded_hash != e.template_hash(bank):
                if problem(Problem(i, "template-hash",
                                   f"recorded {e.recorded_hash.hex()}, data hashes to "
                                   f"{e.template_hash(bank).hex()}", name)):
                    return rep
            for b in banks:
                h = new_hash(b)
                h.update(rep.pcrs[b][e.pcr])
                h.update(e.extend_value(b))
                regs = rep.pcrs[b]
                regs[e.pcr] = h.digest()
            if e.template == "ima-buf" and name in NS_EVENTS and not e.violation:
                why = _ns_event(rep, i, name, e.get("buf") or b"")
                if why and problem(Problem(i, "ns-event", why, name)):
                    return rep
            if keyring is not None and not e.violation:
                why = _check_sig(e, keyring)
                if why is not None:
                    rep.signatures_checked += 1
                    if why and problem(Problem(i, "signature", why, name)):
                        return rep
    except TemplateError as err:
        rep.problems.append(Problem(err.entry, "parse", err.msg))
        return rep
    for b, regs in (expected or {}).items():
        if b not in rep.pcrs:
            continue
        for idx, value in sorted(regs.items()):
            if not 0 <= idx < NUM_PCRS:
                problem(Problem(None, "pcr-mismatch", f"{b} PCR {idx}: there is no such PCR "
                                                      f"(0-{NUM_PCRS - 1})"))
                continue
            if len(value) != hash_size(b):
                problem(Problem(None, "pcr-mismatch",
                                f"{b} PCR {idx}: expected value {value.hex() or '(empty)'} is "
                                f"{len(value)} bytes, a {b} PCR is {hash_size(b)}"))
                continue
            if idx in rep.used_pcrs or any(value):
                got = rep.pcrs[b][idx]
                if got != value:
                    problem(Problem(None, "pcr-mismatch",
                                    f"{b} PCR {idx}: list replays to {got.hex()}, "
                                    f"expected {value.hex()}"))
    return rep


def _ns_event(rep: Report, i: int, event: str, data: bytes) -> str:
    """Record a namespace event of entry ``i``; "" or why it is malformed or
    unexplained by the list before it."""
    try:
        f = parse_event(data)
    except ValueError as err:
        return str(err)
    if event == NS_INIT:
        if f["event"] != NS_CREATE:
            return f"its data is a {f['event']}, not the ns-create it repeats"
        if i != 1:
            return "ns-init is a child list's second entry, after its boot aggregate"
    elif f["event"] != event:
        return f"its data says {f['event']}"
    key = (f["name"], f["id"], f["uuid"])
    if event == NS_CREATE:
        if f["id"] in rep.ns_created:
            return f"namespace id {f['id']} created twice"
        rep.ns_created[f["id"]] = key
    elif event != NS_INIT and rep.ns_created.get(f["id"]) != key:
        return (f"{event} of namespace {f['name']} (id {f['id']}, uuid {f['uuid']}) that "
                f"no earlier ns-create of this list made")
    rep.ns_events.append((i, event, data, f))
    return ""


@dataclass
class Link:
    """How a child list ties to its parent's (link())."""
    child: str
    name: str = ""
    id: str = ""
    created_at: int | None = None       # the parent's ns-create entry
    removed_at: int | None = None       # the parent's ns-remove entry, if any
    problems: list = field(default_factory=list)


def link(parent: Report, children: list[tuple[str, Report]]) -> list[Link]:
    """Tie each (label, report) child list to the parent's namespace events."""
    creates = {data: (i, f) for i, ev, data, f in parent.ns_events if ev == NS_CREATE}
    removes = {(f["name"], f["id"], f["uuid"]): (i, f) for i, ev, _, f in parent.ns_events
               if ev == NS_REMOVE}
    out = []
    for label, rep in children:
        lk = Link(label)
        out.append(lk)
        init = [(i, data, f) for i, ev, data, f in rep.ns_events if ev == NS_INIT]
        if not init:
            lk.problems.append("no ns-init entry: not a child namespace's list")
            continue
        _, data, f = init[0]
        lk.name, lk.id = f["name"], f["id"]
        hit = creates.get(data)
        if hit is None:
            lk.problems.append(f"its ns-init (namespace {f['name']}, id {f['id']}, uuid "
                               f"{f['uuid']}) is no ns-create of the parent list")
            continue
        lk.created_at = hit[0]
        gone = removes.get((f["name"], f["id"], f["uuid"]))
        if gone is None:
            continue
        lk.removed_at, g = gone
        if g.get("entries") != str(rep.entries):
            lk.problems.append(f"the parent recorded its removal with {g.get('entries')} "
                               f"entries, the list has {rep.entries}")
        bank, _, value = g.get("pcr10", "").partition(":")
        if bank in rep.pcrs:
            if rep.pcrs[bank][10].hex() != value:
                lk.problems.append(f"the parent recorded its removal with {bank} PCR 10 "
                                   f"{value}, the list replays to "
                                   f"{rep.pcrs[bank][10].hex()}")
        elif bank:
            lk.problems.append(f"the removal's PCR 10 is of bank {bank}, not replayed")
    return out


def _check_sig(e: TemplateEntry, keyring) -> str | None:
    """None: no signature to check; "": verified; else why it failed."""
    sig = e.get("sig")
    if not sig:
        return None
    fd = e.file_digest
    if fd is None:
        return "entry has a signature but no digest"
    dtype, algo, digest = fd
    try:
        res = ap.appraise(
            sig, lambda a: digest if a == algo else _no_digest(a, algo), keyring,
            require_sig=True, verity_required=dtype == "verity",
            verity_digest=(lambda a: digest if a == algo else None) if dtype == "verity" else None,
            default_algo=algo)
    except ValueError as err:
        return str(err)
    return "" if res.passed else str(res)


def _no_digest(want: str, have: str):
    raise ValueError(f"the signature is over {want}, the entry records {have}")


def verify_bytes(data: bytes, **kw) -> Report:
    fmt = detect_format(data[:32])
    return verify(entries_of(io.BytesIO(data), fmt, kw.get("bank", "sha1")), **kw)
