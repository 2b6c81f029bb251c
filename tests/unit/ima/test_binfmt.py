"""imafs.ima.binfmt: ELF files and their PT_INTERP, as load_elf_binary reads them,
with bounded reads of hostile headers."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess

import pytest

from imafs.ima import binfmt


def interp_of(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return binfmt.interpreter(fd)
    finally:
        os.close(fd)


def elf64(interp: bytes | None, *, phnum=1, nul=True) -> bytes:
    """A little-endian ELF64 header with one program header (PT_INTERP when given)."""
    body = interp + (b"\0" if nul else b"") if interp is not None else b""
    hdr = bytearray(64)
    hdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", hdr, 32, 64)                       # e_phoff
    struct.pack_into("<HH", hdr, 54, 56, phnum)               # e_phentsize, e_phnum
    ph = struct.pack("<IIQQQQQQ", binfmt.PT_INTERP if interp is not None else 1, 4,
                     64 + 56, 0, 0, len(body), len(body), 1)
    return bytes(hdr) + ph + body


def test_the_interpreter_of_real_binaries(tmp_path):
    true = shutil.which("true")
    got = interp_of(true)
    readelf = shutil.which("readelf")
    if readelf:
        out = subprocess.run([readelf, "-l", true], capture_output=True, text=True).stdout
        want = [ln.split(":", 1)[1].strip(" ]").encode() for ln in out.splitlines()
                if "Requesting program interpreter" in ln]
        assert [got] == want if want else got is None
    else:
        assert got is None or got.startswith(b"/")
    script = tmp_path / "s"
    script.write_bytes(b"#!/bin/sh\necho\n")
    assert interp_of(script) is None
    with open(true, "rb") as f:
        assert binfmt.is_elf(f.read(4)) and not binfmt.is_elf(b"#!/b")


@pytest.mark.parametrize("blob, want", [
    (elf64(b"/lib/ld.so"), b"/lib/ld.so"),
    (elf64(None), None),                                 # static: no PT_INTERP
    (elf64(b"/lib/ld.so", nul=False), None),             # the path must end in a NUL
    (elf64(b"/lib/ld.so", phnum=0), None),
    (elf64(b"/lib/ld.so", phnum=binfmt.MAX_PHNUM + 1), None),
    (elf64(b"/lib/ld.so")[:60], None),                   # truncated header
    (elf64(b"x" * (binfmt.MAX_INTERP + 1)), None),       # longer than PATH_MAX
])
def test_hostile_headers_are_not_elf_with_an_interpreter(tmp_path, blob, want):
    p = tmp_path / "e"
    p.write_bytes(blob)
    assert interp_of(p) == want
