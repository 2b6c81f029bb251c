"""Log lines that quote what a process sent (a path, a name, policy text) or what
the backing tree holds (file names): escaped so that such text cannot start a new,
forged line or carry terminal control sequences, and so that names that are not
UTF-8 do not make the line unwritable."""
from __future__ import annotations

import logging


def printable(text) -> str:
    """``text`` (str, or bytes taken as os.fsdecode would) with every character that
    is not printable escaped as Python's repr escapes it (\\n, \\r, \\t, \\x1b,
    \\u2028, ...; a byte that is not UTF-8, kept by surrogateescape, as \\xNN), so a
    log line that quotes what a writer sent stays one line and carries no terminal
    control sequence. Printable text, backslashes included, is left as it is."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "surrogateescape")
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
            continue
        o = ord(c)
        if c in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c])
        elif 0xDC80 <= o <= 0xDCFF:                # an undecodable byte
            out.append(f"\\x{o - 0xDC00:02x}")
        elif o < 0x100:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    return "".join(out)


class PrintableLogFilter(logging.Filter):
    """Escapes the message of every record it sees with :func:`printable` (the daemon's
    log handler has one: every line, whoever logs it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        esc = printable(msg)
        if esc != msg:
            record.msg, record.args = esc, ()
        return True
