"""Model files: imafs's text form of a behaviour model, after Quixote's export.

    aggregate <hex>            exactly once, first
    base <hex>                 at most once, not zero (absent: 32 zero bytes)
    pseudonym <hex>            any number, strictly ascending
    coefficient <hex>          any number, strictly ascending
    state <hex>                at most once: the state of this file's coefficients
    seal                       at most once: the model is sealed once loaded
    end                        last

Every ``<hex>`` is 64 lowercase hexadecimal digits (a sha256 value). The file is
ASCII, each line ends with one LF, no blank lines, no comments, no spaces but the one
after a keyword, nothing after ``end``. The order is fixed and every list sorted, so
one model has exactly one file (its signature, ``security.ima``, stays valid however
often it is exported). Quixote's ``state`` lines are called ``coefficient`` here:
imafs's ``state`` is the model's functional value, which the file may carry to be
checked. A malformed file is refused whole with the number of its first bad line.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from imafs.ima import modelmap as mm

MAX_MODEL_BYTES = 256 << 20          # about 3.3 million coefficients
_LINE = re.compile(rb"([a-z]+)(?: ([0-9a-f]{64}))?")
_ORDER = {b"aggregate": 0, b"base": 1, b"pseudonym": 2, b"coefficient": 3, b"state": 4,
          b"seal": 5, b"end": 6}
_WITH_VALUE = {b"aggregate", b"base", b"pseudonym", b"coefficient", b"state"}
_REPEATED = {b"pseudonym", b"coefficient"}


class ModelFileError(ValueError):
    def __init__(self, line: int, msg: str):
        super().__init__(f"model file line {line}: {msg}" if line else f"model file: {msg}")
        self.line = line


class ModelFile(NamedTuple):
    aggregate: bytes
    base: bytes = mm.ZERO
    pseudonyms: tuple = ()
    coefficients: tuple = ()
    state: bytes | None = None
    sealed: bool = False

    def computed_state(self) -> bytes:
        return mm.compute_state(self.aggregate, self.coefficients, self.base)


def parse_model(data: bytes) -> ModelFile:
    """Parse a model file; ModelFileError (with the line) for anything malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("a model file is bytes")
    data = bytes(data)
    if len(data) > MAX_MODEL_BYTES:
        raise ModelFileError(0, f"{len(data)} bytes, more than {MAX_MODEL_BYTES}")
    if not data:
        raise ModelFileError(1, "empty file (a model starts with 'aggregate <hex>')")
    if not data.endswith(b"\n"):
        raise ModelFileError(data.count(b"\n") + 1, "the last line does not end with LF")
    lines = data[:-1].split(b"\n")
    fields: dict[bytes, list[bytes]] = {k: [] for k in _ORDER}
    last = -1
    prev = None
    for n, line in enumerate(lines, 1):
        m = _LINE.fullmatch(line)
        if m is None:
            raise ModelFileError(n, f"not 'keyword' or 'keyword <64 lowercase hex>': "
                                    f"{line[:80]!r}")
        key, value = m.group(1), m.group(2)
        if key not in _ORDER:
            raise ModelFileError(n, f"unknown keyword {key.decode()!r}")
        if last == _ORDER[b"end"]:
            raise ModelFileError(n, "text after 'end'")
        if (value is not None) != (key in _WITH_VALUE):
            raise ModelFileError(n, f"'{key.decode()}' " + (
                "takes a 64-digit hex value" if key in _WITH_VALUE else "takes no value"))
        order = _ORDER[key]
        if n == 1 and key != b"aggregate":
            raise ModelFileError(n, "a model starts with 'aggregate <hex>'")
        if order < last or (order == last and key not in _REPEATED):
            raise ModelFileError(n, f"'{key.decode()}' out of place (order: "
                                    + ", ".join(k.decode() for k in _ORDER) + ")")
        if order == last and value <= prev:
            raise ModelFileError(n, f"{key.decode()} values must be strictly ascending "
                                    "(sorted, no duplicates)")
        fields[key].append(value)
        last, prev = order, value
    if last != _ORDER[b"end"]:
        raise ModelFileError(len(lines), "no 'end' line")
    h = bytes.fromhex
    mf = ModelFile(
        aggregate=h(fields[b"aggregate"][0].decode()),
        base=h(fields[b"base"][0].decode()) if fields[b"base"] else mm.ZERO,
        pseudonyms=tuple(h(v.decode()) for v in fields[b"pseudonym"]),
        coefficients=tuple(h(v.decode()) for v in fields[b"coefficient"]),
        state=h(fields[b"state"][0].decode()) if fields[b"state"] else None,
        sealed=bool(fields[b"seal"]))
    if fields[b"base"] and mf.base == mm.ZERO:
        raise ModelFileError(2, "a zero base is written by leaving the line out")
    if mf.state is not None and mf.state != mf.computed_state():
        n = len(lines) - 1 - bool(fields[b"seal"])
        raise ModelFileError(n, f"state {mf.state.hex()} is not the state of the file's "
                                f"coefficients ({mf.computed_state().hex()})")
    return mf


def format_model(mf: ModelFile) -> bytes:
    """The one text form of a model (lists sorted, duplicates dropped)."""
    for name in ("aggregate", "base"):
        if len(getattr(mf, name)) != mm.DIGEST_SIZE:
            raise ValueError(f"{name} is not a 32-byte value")
    out = [b"aggregate " + mf.aggregate.hex().encode()]
    if mf.base != mm.ZERO:
        out.append(b"base " + mf.base.hex().encode())
    for key, values in ((b"pseudonym ", mf.pseudonyms), (b"coefficient ", mf.coefficients)):
        for v in sorted(set(values)):
            if len(v) != mm.DIGEST_SIZE:
                raise ValueError(f"{key.decode().strip()} {v.hex()} is not 32 bytes")
            out.append(key + v.hex().encode())
    if mf.state is not None:
        if mf.state != mf.computed_state():
            raise ValueError("the state is not the state of the coefficients")
        out.append(b"state " + mf.state.hex().encode())
    if mf.sealed:
        out.append(b"seal")
    out.append(b"end")
    return b"\n".join(out) + b"\n"
