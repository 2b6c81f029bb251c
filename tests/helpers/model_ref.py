"""An independent recomputation of behaviour-model coefficients, task identities, the
state and the measurement, to check imafs's with (tests/unit/ima/test_model.py and
tests/mount/test_model.py).

Written from docs/models.md only (TSEM's formats: the byte layout of the COE and CELL
parts, the coefficient, the task identity, the state and the measurement), from the
JSON records ``trajectory`` and ``forensics`` print. Nothing from imafs is imported
here: a reference that called imafs's own encoders could not catch them wrong."""
from __future__ import annotations

import hashlib
import struct

__all__ = ["H", "LAYOUT", "v_cell", "v_coefficient", "v_state", "v_measurement"]


def H(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def v_inode(d):
    return struct.pack("<III", d["uid"], d["gid"], d["mode"])


def v_path(d):
    name = d["pathname"].encode("utf-8", "surrogateescape")
    if "instance" in d:
        return (b"\x01" + struct.pack("<I", len(name)) + name
                + struct.pack("<Q", d["instance"]) + bytes.fromhex(d["owner"]))
    return b"\x00" + struct.pack("<I", len(name)) + name


_FILE = [("access", "u32"), ("inode", "inode"), ("path", "path"), ("digest", "digest")]
# every event type a record may carry, and its CELL's fields in order
LAYOUT = {
    "file_open": _FILE, "bprm_check": _FILE,
    "mmap_file": [("inode", "inode"), ("path", "path"), ("digest", "digest"),
                  ("prot", "u32"), ("flags", "u32")],
    "inode_create": [("dir", "inode"), ("path", "path"), ("mode", "u32")],
    "inode_mkdir": [("dir", "inode"), ("path", "path"), ("mode", "u32")],
    "inode_unlink": [("dir", "inode"), ("inode", "inode"), ("path", "path")],
    "inode_rmdir": [("dir", "inode"), ("inode", "inode"), ("path", "path")],
    "inode_rename": [("old_dir", "inode"), ("inode", "inode"), ("old_path", "path"),
                     ("new_dir", "inode"), ("target", "opt_inode"), ("new_path", "path")],
    "inode_link": [("inode", "inode"), ("old_path", "path"), ("new_dir", "inode"),
                   ("new_path", "path")],
    "inode_symlink": [("dir", "inode"), ("path", "path"), ("target", "str")],
    "inode_setattr": [("inode", "inode"), ("path", "path"), ("valid", "u32"),
                      ("mode", "u32"), ("uid", "u32"), ("gid", "u32"), ("size", "u64")],
    "inode_setxattr": [("inode", "inode"), ("path", "path"), ("name", "str"),
                       ("value", "blob"), ("flags", "u32")],
    "inode_removexattr": [("inode", "inode"), ("path", "path"), ("name", "str")],
}


def v_cell(etype, cell):
    """The CELL bytes of one record's event of type ``etype``."""
    out = b""
    for name, kind in LAYOUT[etype]:
        v = cell[name]
        if kind == "u32":
            out += struct.pack("<I", v)
        elif kind == "u64":
            out += struct.pack("<Q", v)
        elif kind == "inode":
            out += v_inode(v)
        elif kind == "opt_inode":
            out += b"\x00" if v is None else b"\x01" + v_inode(v)
        elif kind == "path":
            out += v_path(v)
        elif kind == "digest":
            out += bytes.fromhex(v)
        elif kind == "str":
            s = v.encode("utf-8", "surrogateescape")
            out += struct.pack("<I", len(s)) + s
        elif kind == "blob":
            out += struct.pack("<I", len(bytes.fromhex(v))) + bytes.fromhex(v)
    return out


def v_coefficient(rec):
    """One record's coefficient; asserts the record's new task identity on the way,
    when it has one."""
    e, c = rec["event"], rec["COE"]
    coe = struct.pack("<8IQ", c["uid"], c["euid"], c["suid"], c["gid"], c["egid"],
                      c["sgid"], c["fsuid"], c["fsgid"], c["capeff"])
    cell = v_cell(e["type"], rec[e["type"]])
    coef = H(e["type"].encode() + bytes.fromhex(e["p_task_id"]) + bytes.fromhex(e["task_id"])
             + H(coe) + H(cell))
    if "new_task_id" in e:
        ident = H(b"bprm_committing_creds" + bytes.fromhex(e["p_task_id"]) + bytes(32)
                  + H(coe) + H(cell))
        assert ident.hex() == e["new_task_id"]
    return coef


def v_state(aggregate: bytes, points, base=bytes(32)):
    """The state: the aggregate, then the distinct coefficients in sorted order."""
    state = H(bytes(32) + H(base + aggregate))
    for p in sorted(set(points)):
        state = H(state + H(base + p))
    return state


def v_measurement(aggregate: bytes, coefficients, base=bytes(32)):
    """The measurement: the aggregate, then each coefficient (hex) in the order given
    (the order of first occurrence)."""
    meas = H(bytes(32) + H(base + aggregate))
    for c in coefficients:
        meas = H(meas + H(base + bytes.fromhex(c)))
    return meas
