"""imafs.fs.sysio.fs_uuid: the backing file system's s_uuid (FS_IOC_GETFSUUID), what EVM
hashes into HMACs and type-3 signatures, once per device."""
from __future__ import annotations

import os

import pytest

from imafs.fs import sysio


def test_fs_uuid_once_per_device_and_never_from_an_o_path_descriptor(tmp_path, monkeypatch):
    monkeypatch.setattr(sysio, "_fs_uuids", {})
    f = tmp_path / "f"
    f.write_bytes(b"x")
    dev = os.stat(f).st_dev
    opath = os.open(f, os.O_PATH)
    try:
        # an O_PATH descriptor cannot be asked (EBADF): unknown, and not remembered
        assert sysio.fs_uuid(opath, dev) is None
        assert dev not in sysio._fs_uuids
    finally:
        os.close(opath)
    fd = os.open(f, os.O_RDONLY)
    try:
        u = sysio.fs_uuid(fd, dev)
    finally:
        os.close(fd)
    if u is None:
        pytest.skip("a kernel without FS_IOC_GETFSUUID (before 6.5)")
    assert len(u) == 16 and sysio._fs_uuids[dev] == u
    fd = os.open(f, os.O_RDONLY)
    try:
        assert sysio.fs_info(fd, dev).s_uuid == u
    finally:
        os.close(fd)


def test_fs_uuid_of_a_file_system_without_one_is_zero(monkeypatch):
    """/proc has no UUID (ENOTTY): the kernel hashes its zero-filled s_uuid."""
    monkeypatch.setattr(sysio, "_fs_uuids", {})
    fd = os.open("/proc/self/status", os.O_RDONLY)
    try:
        u = sysio.fs_uuid(fd, os.fstat(fd).st_dev)
    finally:
        os.close(fd)
    assert u == (bytes(16) if sysio._kernel_has_getfsuuid() else None)
