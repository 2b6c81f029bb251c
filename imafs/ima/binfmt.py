"""What an executable is, as the kernel's binfmt handlers see it: an ELF file and the
interpreter (``PT_INTERP``) it asks for.

The hook mapping needs it: the kernel runs BPRM_CHECK and CREDS_CHECK for the file an
exec runs and MMAP_CHECK for the ELF segments it maps with PROT_EXEC, while the ELF
interpreter (the dynamic loader) is opened with ``open_exec`` -- an open FUSE sees
with ``__FMODE_EXEC``, like the binary's -- and gets FILE_CHECK and MMAP_CHECK only
(fs/binfmt_elf.c ``load_elf_binary``). Reads here are bounded: a hostile header costs
at most a few small preads.
"""
from __future__ import annotations

import os
import struct

ELF_MAGIC = b"\x7fELF"
PT_INTERP = 3
MAX_PHNUM = 512            # the kernel refuses more program-header bytes than 64 KiB
MAX_INTERP = 4096          # PATH_MAX, as load_elf_binary checks


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC


def interpreter(fd: int) -> bytes | None:
    """The ``PT_INTERP`` path of the ELF file open at ``fd`` (without its NUL), or None
    (not ELF, no interpreter -- a static binary -- or a malformed header)."""
    try:
        hdr = os.pread(fd, 64, 0)
    except OSError:
        return None
    if len(hdr) < 52 or not is_elf(hdr):
        return None
    cls, data = hdr[4], hdr[5]
    if data not in (1, 2) or cls not in (1, 2):
        return None
    e = "<" if data == 1 else ">"
    try:
        if cls == 2:
            if len(hdr) < 64:
                return None
            phoff, = struct.unpack_from(e + "Q", hdr, 32)
            phentsize, phnum = struct.unpack_from(e + "HH", hdr, 54)
            ph = struct.Struct(e + "IIQQQQQQ")     # type, flags, offset, vaddr, paddr, filesz
        else:
            phoff, = struct.unpack_from(e + "I", hdr, 28)
            phentsize, phnum = struct.unpack_from(e + "HH", hdr, 42)
            ph = struct.Struct(e + "IIIIIIII")     # type, offset, vaddr, paddr, filesz, ...
        if phentsize < ph.size or not 0 < phnum <= MAX_PHNUM:
            return None
        table = os.pread(fd, phentsize * phnum, phoff)
        for i in range(len(table) // phentsize):
            f = ph.unpack_from(table, i * phentsize)
            if f[0] != PT_INTERP:
                continue
            off, size = (f[2], f[5]) if cls == 2 else (f[1], f[4])
            if not 2 <= size <= MAX_INTERP:
                return None
            raw = os.pread(fd, size, off)
            if len(raw) != size or raw[-1:] != b"\0":
                return None     # load_elf_binary: the path must end in a NUL
            return raw.split(b"\0", 1)[0] or None
    except (OSError, struct.error, OverflowError):
        return None
    return None
