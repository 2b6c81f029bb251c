"""Offline verification of a measurement list: what a remote verifier does before it
trusts a list (``imafs verify-log``).

For every entry: the recorded template hash must equal the hash of the entry's data
(the bank the list was printed for); an ``ima-sig``/``ima-sigv2`` signature, when
keys are given, must verify over the recorded file digest. The list is replayed into
every bank (a violation extends 0xff.., as the kernel does) and the result compared
with the PCR values given. The first bad entry is reported with its number and byte
offset. Works on binary and ascii lists of any bank, streamed: a list of a million
entries is never held in memory.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import BinaryIO, Iterable, Iterator

from imafs.ima import appraise as ap
from imafs.ima.templates import TemplateEntry, TemplateError, hash_size, new_hash, \
    parse_ascii, parse_binary

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
