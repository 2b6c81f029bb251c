"""The keyrings of a real mount (the keys themselves: tests/unit/ima/test_keys.py)."""
from __future__ import annotations

import os
import struct

import pytest

from imafs.store import Store

from helpers.mounts import readable


# --- the root namespace's keyring: per mount ------------------------------------------
def _stored(store, ns_id):
    prefix = struct.pack(">I", ns_id)
    with store.begin(db="keys") as txn:
        return [bytes(k) for k, _ in txn.cursor() if bytes(k).startswith(prefix)]


# --- through a mount -------------------------------------------------------------
def _keygen(d, *extra):
    from imafs.cli import main
    assert main(["keygen", "--out", str(d), *extra]) == 0
    return d / "signing_key.pem", d / "signing_cert.der"


def _root_epoch(state):
    store = Store(str(state / "lmdb"), readonly=True)
    try:
        raw = store.get_meta(b"keys-epoch:" + struct.pack(">I", 0))
        return struct.unpack(">Q", raw)[0], len(_stored(store, 0))
    finally:
        store.close()


@pytest.mark.mount
def test_root_keyring_is_the_command_lines_at_each_mount(make_mount, world_tmp):
    """Sign with key A: a mount with --key A passes the file; a remount with --key B
    only refuses it (A was never given to that mount), and a key written to the keys
    file at run time is gone at the next mount too. The epoch only grows."""
    from imafs.cli import main
    ka, ca = _keygen(world_tmp / "a")
    kb, cb = _keygen(world_tmp / "b", "--type", "ec")
    kc, cc = _keygen(world_tmp / "c", "--type", "ec", "--bits", "384")
    b = world_tmp / "backing1"
    b.mkdir()
    for n, k in (("by-a", ka), ("by-b", kb), ("by-c", kc)):
        (b / n).write_bytes(os.urandom(5000))
        assert main(["sign", "-q", "--key", str(k), str(b / n)]) == 0
    pol = world_tmp / "policy"
    pol.write_text("appraise func=FILE_CHECK mask=MAY_READ appraise_type=imasig\n")
    m = make_mount(["--policy", str(pol), "--key", str(ca)], backing=b)
    assert readable(m.mnt / "by-a")
    assert not readable(m.mnt / "by-b") and not readable(m.mnt / "by-c")
    with open(m.ctl("keys"), "wb") as f:                   # run time: this mount only
        f.write(cc.read_bytes())
    assert readable(m.mnt / "by-c")
    assert len(m.ctl("keys").read_text().splitlines()) == 2
    m.stop()
    e1, stored = _root_epoch(m.state)
    assert stored == 0                                    # root keys are never stored

    m.restart(["--policy", str(pol), "--key", str(cb)])
    assert not readable(m.mnt / "by-a"), "a key not given to this mount was trusted"
    assert not readable(m.mnt / "by-c"), "a key added at run time outlived its mount"
    assert readable(m.mnt / "by-b")
    lines = m.ctl("keys").read_text().splitlines()
    assert len(lines) == 1 and lines[0].split()[1] == "ecdsa-nist-p256", lines
    m.stop()
    e2, _ = _root_epoch(m.state)
    assert e2 > e1

    m.restart(["--policy", str(pol), "--keys", str(world_tmp / "a")])     # A is back
    assert readable(m.mnt / "by-a") and not readable(m.mnt / "by-b")
    m.stop()
    assert _root_epoch(m.state)[0] > e2
