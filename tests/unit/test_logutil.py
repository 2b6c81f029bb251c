"""imafs.logutil: quoted text cannot forge a log line or carry terminal control."""
from __future__ import annotations

import logging

from imafs.logutil import PrintableLogFilter, printable


def test_printable_escapes_what_could_break_a_line():
    assert printable("plain /path with spaces\\and backslash") == \
        "plain /path with spaces\\and backslash"
    assert printable("a\nforged line\r\t") == "a\\nforged line\\r\\t"
    assert printable("\x1b[31mred") == "\\x1b[31mred"
    assert printable("\u2028sep\U000e0001") == "\\u2028sep\\U000e0001"
    assert printable(b"caf\xe9\n") == "caf\\xe9\\n"                 # not UTF-8
    assert printable("caf\u00e9") == "caf\u00e9"                     # printable: as it is


def test_the_filter_escapes_every_record():
    rec = logging.LogRecord("imafs", logging.INFO, __file__, 1, "write of %r: %s", None, None)
    rec.args = ("x", "line\ninjected")
    assert PrintableLogFilter().filter(rec)
    assert rec.getMessage() == "write of 'x': line\\ninjected"
    assert "\n" not in rec.getMessage()
