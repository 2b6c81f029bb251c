"""The control socket's protocol, shared by the daemon (server.py) and its clients
(client.py): JSON lines over a UNIX stream socket, versioned, bounded.

A request is one line, a JSON object ``{"v": 1, "op": OP, ...arguments}``; the answer
is one line ``{"v": 1, "ok": true, ...}`` or ``{"v": 1, "ok": false, "errno": NAME,
"error": MESSAGE}`` (NAME an errno name such as ``EEXIST``; MESSAGE one line for the
user). File descriptors travel as SCM_RIGHTS with a request's first bytes, named in
order by its ``fds`` argument (``["pidfd"]``, ``["archive"]``). One request at a time
per connection; a client may send several in turn. docs/cli.md ("The control
socket") lists the operations.

Bounds (what a caller can make the daemon spend): MAX_REQUEST bytes per request line,
MAX_FDS descriptors per request, MAX_CONNECTIONS connections at once, a request
complete within REQUEST_TIMEOUT of its first byte, a connection closed after
IDLE_TIMEOUT without one, WORKERS engine threads for all connections together.
"""
from __future__ import annotations

import errno as _errno
import json

VERSION = 1
VERSIONS = (1,)
SOCKET_NAME = "control.sock"
MAX_REQUEST = 4 << 20       # one request line: a policy (1 MiB) and keys fit
MAX_RESPONSE = 16 << 20     # what a client reads of one answer
MAX_FDS = 2
MAX_CONNECTIONS = 16
REQUEST_TIMEOUT = 30.0
IDLE_TIMEOUT = 60.0
WORKERS = 2
OPS = ("hello", "ns-create", "ns-list", "ns-remove", "digest-list-add", "digest-list-del",
       "model-export")


class ProtocolError(Exception):
    """A request or answer that breaks the protocol; ``errno`` names the errno."""

    def __init__(self, msg: str, err: int = _errno.EINVAL):
        super().__init__(msg)
        self.errno = err


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, "EIO")


def errno_value(name: str) -> int:
    return getattr(_errno, name, _errno.EIO) if isinstance(name, str) else _errno.EIO


def encode(obj: dict) -> bytes:
    """One line: compact JSON, ASCII only (so no byte of it is a newline but the last)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def decode(line: bytes, *, limit: int = MAX_REQUEST) -> dict:
    """A line (without its newline) -> its JSON object; ProtocolError otherwise."""
    if len(line) > limit:
        raise ProtocolError(f"a line of {len(line)} bytes (at most {limit})", _errno.EMSGSIZE)
    try:
        obj = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"not a JSON line: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("a line must hold a JSON object")
    return obj


def check_request(obj: dict) -> tuple[str, dict]:
    """A decoded request -> (op, arguments); ProtocolError for a version this side
    does not speak, an unknown op or a malformed ``fds``."""
    v = obj.get("v")
    if v not in VERSIONS:
        raise ProtocolError(f"protocol version {v!r} not spoken here (this daemon speaks "
                            f"{', '.join(map(str, VERSIONS))})", _errno.EPROTONOSUPPORT)
    op = obj.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown operation {op!r} (operations: {', '.join(OPS)})",
                            _errno.EOPNOTSUPP)
    fds = obj.get("fds", [])
    if not isinstance(fds, list) or len(fds) > MAX_FDS or \
            not all(isinstance(n, str) for n in fds) or len(set(fds)) != len(fds):
        raise ProtocolError(f"fds must name at most {MAX_FDS} descriptors, each once")
    args = {k: val for k, val in obj.items() if k not in ("v", "op")}
    return op, args


def reply(**fields) -> dict:
    return {"v": VERSION, "ok": True, **fields}


def refusal(msg: str, err: int = _errno.EINVAL) -> dict:
    return {"v": VERSION, "ok": False, "errno": errno_name(err), "error": msg}
