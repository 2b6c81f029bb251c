"""imafs.ctl.protocol: the control socket's lines, versions and bounds."""
from __future__ import annotations

import errno
import json

import pytest

from imafs.ctl import protocol as P


def test_encode_is_one_ascii_line():
    line = P.encode({"v": 1, "op": "hello", "x": "caf\u00e9\nnew line"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and line.isascii()
    assert P.decode(line[:-1])["x"] == "caf\u00e9\nnew line"


@pytest.mark.parametrize("obj,err,why", [
    ({"op": "hello"}, errno.EPROTONOSUPPORT, "protocol version None"),
    ({"v": 2, "op": "hello"}, errno.EPROTONOSUPPORT, "this daemon speaks 1"),
    ({"v": 1, "op": "rm-rf"}, errno.EOPNOTSUPP, "unknown operation"),
    ({"v": 1, "op": "ns-list", "fds": ["a", "b", "c"]}, errno.EINVAL, "at most 2"),
    ({"v": 1, "op": "ns-list", "fds": ["a", "a"]}, errno.EINVAL, "each once"),
    ({"v": 1, "op": "ns-list", "fds": "pidfd"}, errno.EINVAL, "fds must name"),
])
def test_bad_requests(obj, err, why):
    with pytest.raises(P.ProtocolError) as e:
        P.check_request(obj)
    assert e.value.errno == err and why in str(e.value)


def test_good_request_and_answers():
    op, args = P.check_request({"v": 1, "op": "ns-remove", "name": "web", "fds": ["archive"]})
    assert op == "ns-remove" and args == {"name": "web", "fds": ["archive"]}
    assert P.refusal("no", errno.EEXIST) == {"v": 1, "ok": False, "errno": "EEXIST",
                                             "error": "no"}
    assert P.errno_value("EBUSY") == errno.EBUSY and P.errno_value(3) == errno.EIO


@pytest.mark.parametrize("line,why", [
    (b"[1]", "JSON object"), (b"{", "not a JSON line"), (b"\xff", "not a JSON line"),
    (b"x" * (P.MAX_REQUEST + 1), "at most"),
])
def test_undecodable_lines(line, why):
    with pytest.raises(P.ProtocolError) as e:
        P.decode(line)
    assert why in str(e.value)


def test_bounds_hold_a_full_policy_and_keys():
    """A request with the largest policy (1 MiB) and 256 certificates of 4 KiB (as
    base64) fits the request bound."""
    from imafs.ima.hostns import MAX_CERTS
    from imafs.ima.policy import MAX_POLICY_BYTES
    req = {"v": 1, "op": "ns-create", "policy": "x" * MAX_POLICY_BYTES,
           "certs": ["A" * 5500] * MAX_CERTS}
    assert len(json.dumps(req)) < P.MAX_REQUEST
