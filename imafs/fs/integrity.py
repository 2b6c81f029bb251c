"""Transitional: the FUSE adapter is imafs/fs/adapter.py, ``fs_info`` lives in
imafs/fs/sysio.py. commands/verify.py still imports ``fs_info`` from here; delete
this module once the commands split imports it from imafs.fs.sysio."""
from imafs.fs.sysio import fs_info  # noqa: F401
