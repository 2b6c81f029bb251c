"""Checks of a measurement list the crash and load tests share: read it, check it
whole, replay it with evmctl."""
from __future__ import annotations

import io
import subprocess
from pathlib import Path

from imafs.ima.templates import parse_ascii, parse_binary
from imafs.ima.verifylog import parse_pcr_file, verify


def read_list(d: Path) -> dict:
    """Everything a verifier reads from one namespace's control directory."""
    return {
        "binary": (d / "binary_runtime_measurements").read_bytes(),
        "binary_sha256": (d / "binary_runtime_measurements_sha256").read_bytes(),
        "ascii": (d / "ascii_runtime_measurements").read_bytes(),
        "pcrs_sha1": (d / "pcrs" / "sha1").read_text(),
        "pcrs_sha256": (d / "pcrs" / "sha256").read_text(),
        "count": int((d / "runtime_measurements_count").read_text()),
    }


def check_list(lst: dict, what: str) -> set[tuple[int, bytes, str]]:
    """The list replays to its PCRs in both banks, its views agree; returns the
    (PCR, name, sha256 hex) of its entries."""
    expected = {"sha1": parse_pcr_file(lst["pcrs_sha1"]),
                "sha256": parse_pcr_file(lst["pcrs_sha256"])}
    entries = list(parse_binary(io.BytesIO(lst["binary"]), "sha1"))
    rep = verify(iter(entries), bank="sha1", banks=("sha1", "sha256"), expected=expected)
    assert rep.ok, f"{what}: {[str(p) for p in rep.problems]}"
    rep256 = verify(parse_binary(io.BytesIO(lst["binary_sha256"]), "sha256"), bank="sha256",
                    banks=("sha1", "sha256"), expected=expected)
    assert rep256.ok, f"{what} (sha256 view): {[str(p) for p in rep256.problems]}"
    asc = list(parse_ascii(lst["ascii"]))
    assert len(entries) == len(asc) == rep256.entries == lst["count"], what
    assert [e.recorded_hash for e in asc] == [e.recorded_hash for e in entries], what
    assert [e.pcr for e in asc] == [e.pcr for e in entries], what
    # a file version is recorded once per PCR (README: as the kernel does)
    seen = set()
    for i, e in enumerate(entries):
        if not e.violation:
            key = (e.pcr, e.recorded_hash)
            assert key not in seen, f"{what}: entry {i} ({e.name!r}) is there twice"
            seen.add(key)
    return entry_keys(entries)


def entry_keys(entries) -> set[tuple[int, bytes, str]]:
    out = set()
    for e in entries:
        fd = e.file_digest
        if fd is not None and e.name is not None:
            out.add((e.pcr, e.name, fd[2].hex()))
    return out


def evmctl_check(lst: dict, tmp: Path) -> None:
    (tmp / "bin").write_bytes(lst["binary"])
    (tmp / "p1").write_text(lst["pcrs_sha1"])
    (tmp / "p256").write_text(lst["pcrs_sha256"])
    r = subprocess.run(["evmctl", "ima_measurement", "--pcrs", f"sha1,{tmp / 'p1'}",
                        "--pcrs", f"sha256,{tmp / 'p256'}", str(tmp / "bin")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
