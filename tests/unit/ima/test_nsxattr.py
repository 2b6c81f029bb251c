"""imafs.ima.nsxattr without a mount: which security.ima and security.evm each
namespace reads, writes and lists (XattrView), and the values EVM sees for it."""
from __future__ import annotations

from imafs.ima.nsxattr import PRIVATE_XATTR_PREFIX, XattrView

from helpers.namespaces import make_tree

HOST_PID, CHILD_PID, NOBODY_PID = 1001, 1002, 4242
CAPS = bytes.fromhex("0100000200200000000000000000000000000000")


def tree_with_child():
    where = {HOST_PID: 0}
    t = make_tree(resolver=where.get)
    c = t.create(t.root, "c", {})
    where[CHILD_PID] = c.id
    return t, c


def test_each_namespace_sees_its_own_ima_and_evm():
    t, c = tree_with_child()
    v = XattrView(t)
    assert c.evm_xattr_name == f"security.imafs.ns{c.id}.evm"
    assert v.stored_name(c, b"security.evm") == c.evm_xattr_name.encode()
    assert v.stored_name(t.root, b"security.evm") is None
    assert v.read_name(CHILD_PID, b"security.evm") == c.evm_xattr_name.encode()
    assert v.read_name(CHILD_PID, c.evm_xattr_name.encode()) == v.UNKNOWN
    names = [b"security.evm", c.evm_xattr_name.encode(), b"user.x"]
    assert v.listed(CHILD_PID, names) == [b"user.x", b"security.evm"]
    assert v.listed(HOST_PID, [c.evm_xattr_name.encode(), b"user.x"]) == [b"user.x"]
    vals = {"security.evm": b"\x05host", "security.ima": b"host-ima",
            "security.capability": CAPS}
    get = vals.get
    # a child with nothing of its own sees the file's security.evm (an image's)
    assert v.value(c, "security.evm", get) == b"\x05host"
    assert v.value(c, "security.capability", get) == CAPS
    # ... not once it has its own security.ima, which the file's does not cover
    vals[c.xattr_name] = b"own-ima"
    assert v.value(c, "security.evm", get) is None
    vals[c.evm_xattr_name] = b"\x02own"
    assert v.value(c, "security.evm", get) == b"\x02own"
    assert v.value(t.root, "security.evm", get) == b"\x05host"


def test_a_childs_security_ima_falls_back_to_the_files():
    t, c = tree_with_child()
    v = XattrView(t)
    own = c.xattr_name.encode()
    assert own.startswith(PRIVATE_XATTR_PREFIX.encode()) and v.is_private(own)
    assert v.stored_name(c, b"security.ima") == own
    assert v.stored_name(c, b"user.x") is None
    # a read inside the child: its own, else the file's (the image's)
    assert v.read_name(CHILD_PID, b"security.ima") == (own, b"security.ima")
    assert v.read_name(HOST_PID, b"security.ima") is None
    assert v.read_name(CHILD_PID, b"user.x") is None
    # listed inside the child whether its own or the file's is there; never by the
    # private name, to anybody
    assert v.listed(CHILD_PID, [b"security.ima"]) == [b"security.ima"]
    assert v.listed(CHILD_PID, [own]) == [b"security.ima"]
    assert v.listed(HOST_PID, [own]) == []
    vals = {"security.ima": b"image"}
    assert v.value(c, "security.ima", vals.get) == b"image"
    vals[c.xattr_name] = b"own"
    assert v.value(c, "security.ima", vals.get) == b"own"
    assert v.value(t.root, "security.ima", vals.get) == b"image"


def test_a_process_no_namespace_holds_reads_nothing_of_them():
    t, _c = tree_with_child()
    v = XattrView(t)
    assert v.read_name(NOBODY_PID, b"security.ima") == v.UNKNOWN
    assert v.read_name(NOBODY_PID, b"security.evm") == v.UNKNOWN
    assert v.listed(NOBODY_PID, [b"security.ima", b"user.x"]) == [b"user.x"]
