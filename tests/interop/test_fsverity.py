"""`imafs digest --verity` and MerkleTree against fsverity-utils' `fsverity digest`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from imafs.ima import hashing as H
from imafs.ima.verity import VeritySpec

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(shutil.which("fsverity") is None, reason="fsverity-utils not installed"),
]

SIZES = {"empty": 0, "one": 1, "b4096": 4096, "b4097": 4097, "m1p1": (1 << 20) + 1,
         "m100": 100 << 20}

PARAMS = [
    [],
    ["--hash-alg=sha512"],
    ["--block-size=1024"],
    ["--block-size=65536"],
    ["--salt=0123456789abcdef"],
    ["--hash-alg=sha512", "--block-size=1024", "--salt=" + "a5" * 32],
    ["--hash-alg=sha256", "--block-size=65536", "--salt=00"],
    ["--block-size=64"],                       # the smallest fsverity-utils allows
    ["--hash-alg=sha512", "--block-size=128"],
    ["--block-size=1048576"],
]


def test_block_sizes_fsverity_refuses_are_refused(files):
    for params in (["--block-size=32"], ["--hash-alg=sha512", "--block-size=64"],
                   ["--block-size=3000"]):
        assert subprocess.run(["fsverity", "digest", *params, files[1]],
                              capture_output=True).returncode != 0
        r = subprocess.run([*imafs_cmd(), "digest", "--verity", *params, files[1]],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "block size" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("verity")
    out = []
    for name, size in SIZES.items():
        p = d / name
        with open(p, "wb") as f:
            left = size
            while left:
                n = min(left, 8 << 20)
                f.write(os.urandom(n))
                left -= n
        out.append(str(p))
    return out


def imafs_cmd():
    exe = os.path.join(os.path.dirname(sys.executable), "imafs")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "imafs"]


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: " ".join(p) or "default")
def test_imafs_digest_verity_equals_fsverity(files, params):
    want = run(["fsverity", "digest", *params, *files])
    got = run([*imafs_cmd(), "digest", "--verity", *params, *files])
    assert got == want
    assert len(got.splitlines()) == len(files)


def test_module_entry_point(files):
    want = run(["fsverity", "digest", files[1]])
    assert run([sys.executable, "-m", "imafs", "digest", "--verity", files[1]]) == want


@pytest.mark.parametrize("params", [
    ("sha256", 4096, b""), ("sha512", 1024, b"\x01\x02"), ("sha256", 65536, b"salt" * 8),
])
def test_tree_and_descriptor_bytes_equal_fsverity(files, tmp_path, params):
    """The whole Merkle tree (fs-verity storage order) and the descriptor, byte for byte."""
    alg, bs, salt = params
    spec = VeritySpec(alg, bs, salt)
    for path in files[:-1]:          # the 100 MiB file is covered by the digest test
        tree_out, desc_out = tmp_path / "tree", tmp_path / "desc"
        cmd = ["fsverity", "digest", path, f"--hash-alg={alg}", f"--block-size={bs}",
               f"--out-merkle-tree={tree_out}", f"--out-descriptor={desc_out}"]
        if salt:
            cmd.append(f"--salt={salt.hex()}")
        line = run(cmd)
        fd = os.open(path, os.O_RDONLY)
        try:
            t = H.hash_fd(fd, ["sha256"], verity=spec, chunk=1 << 16).tree
        finally:
            os.close(fd)
        assert f"{t.verity_digest_text} {path}\n" == line
        assert t.descriptor() == desc_out.read_bytes()
        assert t.tree_bytes() == tree_out.read_bytes()
