"""imafs/ctl/client.py without a daemon: the client's side of one request, over a
socket pair whose other end plays the daemon."""
from __future__ import annotations

import errno
import socket

import pytest

from imafs.ctl import protocol as P
from imafs.ctl.client import Client, CtlError


def _refused_then_closed() -> socket.socket:
    """A connection the daemon refused at its limit: the answer sent, the socket closed
    before the client's request was written (so writing it fails EPIPE)."""
    ours, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon.sendall(P.encode(P.refusal("the daemon serves 16 control connections at once: "
                                      "try again", errno.EAGAIN)))
    daemon.close()
    return ours


def test_a_refusal_sent_before_the_request_is_read_is_reported():
    with Client(_refused_then_closed(), {}, timeout=5) as c:
        with pytest.raises(CtlError) as e:
            c.call("hello")
    assert "at once: try again" in str(e.value) and e.value.errno == "EAGAIN"


def test_a_daemon_gone_without_an_answer_is_an_error():
    ours, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon.close()
    with Client(ours, {}, timeout=5) as c:
        with pytest.raises(CtlError) as e:
            c.call("hello")
    assert "hello: control socket" in str(e.value)


def test_an_answer_is_returned():
    ours, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with daemon, Client(ours, {}, timeout=5) as c:
        daemon.sendall(P.encode({"v": P.VERSION, "ok": True, "dev": "0:42"}))
        assert c.call("hello")["dev"] == "0:42"
        assert P.decode(daemon.recv(4096).rstrip(b"\n"))["op"] == "hello"
